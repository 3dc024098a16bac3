"""Tests of the synthetic chest CT phantom (common.phantom): small volumes, a few seconds in all."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from common.classes import AIRWAY, BONE, CLASS_NAMES, HEART, LABEL_OF, LEFT_LUNG, LUNG, RIGHT_LUNG, VESSEL
from common.phantom import Phantom, generate_phantom, main, render_slice_png, write_phantom

SMALL = dict(shape=(64, 64, 40), spacing=(5.0, 5.0, 6.0))


@pytest.fixture(scope="module")
def small() -> Phantom:
    return generate_phantom(**SMALL, seed=3)


@pytest.fixture(scope="module")
def clean() -> Phantom:
    """Noise-free, finer phantom for HU / label consistency."""
    return generate_phantom((128, 128, 80), (2.5, 2.5, 3.0), seed=1, noise_hu=0.0)


@pytest.fixture(scope="module")
def findings() -> Phantom:
    return generate_phantom((96, 96, 60), (3.4, 3.4, 4.0), seed=5, nodules=2, emphysema=True, noise_hu=0.0)


def _world(ph: Phantom, mask: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(0)
    return (ph.ct.affine @ np.r_[ijk, 1.0])[:3]


def test_types_shapes_and_affine(small):
    ph = small
    assert ph.ct.hu.shape == SMALL["shape"] and ph.ct.hu.dtype == np.float32
    assert ph.labels.shape == SMALL["shape"] and ph.labels.dtype == np.uint8
    assert ph.lungs.shape == SMALL["shape"] and ph.lungs.dtype == np.uint8
    assert set(np.unique(ph.labels)) <= {0, LUNG, HEART, VESSEL, AIRWAY, BONE}
    assert set(np.unique(ph.lungs)) == {0, RIGHT_LUNG, LEFT_LUNG}
    # DICOM-like RAS affine diag(-sx, -sy, sz) with the given spacing
    np.testing.assert_allclose(np.diag(ph.ct.affine)[:3], [-5.0, -5.0, 6.0])
    np.testing.assert_allclose(ph.ct.spacing, SMALL["spacing"])
    assert all(isinstance(s, str) and s for s in ph.report)
    assert ph.meta["seed"] == 3 and ph.meta["shape"] == list(SMALL["shape"])


def test_deterministic_from_seed(small):
    again = generate_phantom(**SMALL, seed=3)
    np.testing.assert_array_equal(again.ct.hu, small.ct.hu)
    np.testing.assert_array_equal(again.labels, small.labels)
    np.testing.assert_array_equal(again.lungs, small.lungs)
    assert again.report == small.report
    assert json.dumps(again.captions, sort_keys=True) == json.dumps(small.captions, sort_keys=True)
    other = generate_phantom(**SMALL, seed=4)
    assert not np.array_equal(other.ct.hu, small.ct.hu)
    assert not np.array_equal(other.labels, small.labels)


def test_hu_matches_labels(clean):
    hu, lab = clean.ct.hu, clean.labels
    mean = {c: float(hu[lab == c].mean()) for c in (LUNG, HEART, VESSEL, AIRWAY, BONE)}
    assert mean[LUNG] < -700
    assert mean[AIRWAY] < -800
    assert mean[BONE] > 200
    assert -20 < mean[HEART] < 300
    assert mean[VESSEL] > -300
    for c in (LUNG, HEART, VESSEL, AIRWAY, BONE):
        assert (lab == c).sum() > 50, CLASS_NAMES[c - 1]


def test_air_around_body_and_fov(small):
    hu = small.ct.hu
    ni, nj, nk = hu.shape
    # the most anterior rows in the middle of the field of view are air in front of the chest
    strip = hu[ni // 2 - 8 : ni // 2 + 8, 1:3, :]
    assert abs(float(strip.mean()) + 1000) < 5
    assert 10 < float(strip.std()) < 30  # noise_hu = 20
    assert (small.labels[ni // 2 - 8 : ni // 2 + 8, 1:3, :] == 0).all()
    # outside the circular reconstruction field: constant padding, no labels
    assert hu[0, 0, 0] == -1024 and small.labels[0, 0, 0] == 0
    noiseless = generate_phantom((48, 48, 24), (7.0, 7.0, 10.0), seed=3, noise_hu=0.0, fov_circle=False, table=False)
    assert noiseless.ct.hu[0, 0, 0] == -1000


def test_lungs_ground_truth(clean):
    lab, lungs = clean.labels, clean.lungs
    # every lung-parenchyma voxel is inside the pleural cavity map, and so are intrapulmonary airways
    assert (lungs[lab == LUNG] > 0).all()
    airway_in = (lab == AIRWAY) & (lungs > 0)
    assert airway_in.sum() > 0
    # no bone or heart inside the lungs
    assert not ((lungs > 0) & np.isin(lab, [BONE, HEART])).any()
    right, left = lungs == RIGHT_LUNG, lungs == LEFT_LUNG
    assert right.sum() > left.sum() > 0
    # RAS+: x > 0 is the patient's right; i grows towards the patient's left
    assert _world(clean, right)[0] > 20 and _world(clean, left)[0] < -20
    assert np.argwhere(left)[:, 0].mean() > np.argwhere(right)[:, 0].mean()
    # anterior heart, posterior spine (j grows posteriorly), trachea above the heart (k superior)
    heart_j = np.argwhere(lab == HEART)[:, 1].mean()
    spine_j = np.argwhere((lab == BONE) & (np.abs(np.arange(lab.shape[0]) - lab.shape[0] / 2) < 6)[:, None, None])[
        :, 1
    ].mean()
    assert heart_j < spine_j
    trachea = [c for c in clean.captions if c["text"] == "trachea"][0]
    heart = [c for c in clean.captions if c["text"] == "heart"][0]
    assert trachea["bbox_ijk"][1][2] > heart["bbox_ijk"][1][2]
    assert _world(clean, lab == HEART)[2] < _world(clean, (lab == AIRWAY) & (lungs == 0))[2]


def test_any_shape_and_spacing_same_anatomy(small):
    finer = generate_phantom((100, 100, 60), (3.2, 3.2, 4.0), seed=3)
    for side in (RIGHT_LUNG, LEFT_LUNG):
        v_small = (small.lungs == side).sum() * small.ct.voxel_volume_ml
        v_fine = (finer.lungs == side).sum() * finer.ct.voxel_volume_ml
        assert 800 < v_fine < 4000
        assert abs(v_small - v_fine) / v_fine < 0.15
    odd = generate_phantom((50, 70, 30), (6.0, 4.5, 8.0), seed=3, noise_hu=0.0)
    assert odd.ct.hu.shape == (50, 70, 30)
    np.testing.assert_allclose(odd.ct.spacing, (6.0, 4.5, 8.0))
    assert (odd.lungs == RIGHT_LUNG).any() and (odd.lungs == LEFT_LUNG).any()
    assert "Lung volumes" in odd.report[-1]


def test_nodules_and_emphysema(findings):
    ph = findings
    text = " ".join(ph.report)
    nod_sentences = [s for s in ph.report if "nodule" in s and not s.startswith("No ")]
    assert len(nod_sentences) == 2
    for s in nod_sentences:
        assert re.match(r"^\d+ mm solid pulmonary nodule in the (right|left) (upper|middle|lower) lobe\.$", s)
    assert "emphysema" in text.lower() and "No emphysema" not in text
    nod_caps = [c for c in ph.captions if "nodule" in c["text"]]
    assert len(nod_caps) == 2
    for c in nod_caps:
        (i0, j0, k0), (i1, j1, k1) = c["bbox_ijk"]
        box = (slice(i0, i1 + 1), slice(j0, j1 + 1), slice(k0, k1 + 1))
        # a solid nodule: soft-tissue HU labelled lung, inside the lung on the reported side
        solid = (ph.labels[box] == LUNG) & (ph.ct.hu[box] > -300)
        assert solid.sum() >= 1
        side = RIGHT_LUNG if c["text"].startswith("right") else LEFT_LUNG
        assert (ph.lungs[box][solid] == side).all()
    # emphysema: many more lung voxels below -950 HU than in the same anatomy without it
    low = float((ph.ct.hu[ph.lungs > 0] < -950).mean())
    assert ph.meta["emphysema_fraction"] > 0.02 and low > 0.02
    plain = generate_phantom((96, 96, 60), (3.4, 3.4, 4.0), seed=5, nodules=0, emphysema=False, noise_hu=0.0)
    assert float((plain.ct.hu[plain.lungs > 0] < -950).mean()) < low / 4
    assert "No pulmonary nodules." in plain.report and "No emphysema." in plain.report
    # findings do not change the patient: same lungs, heart and bones
    np.testing.assert_array_equal(plain.lungs, ph.lungs)
    np.testing.assert_array_equal(np.isin(plain.labels, [HEART, BONE]), np.isin(ph.labels, [HEART, BONE]))
    assert not any("nodule" in c["text"] for c in plain.captions)


def test_captions_are_grounded(findings):
    ph = findings
    texts = {c["text"] for c in ph.captions}
    for t in ("right lung", "left lung", "heart", "trachea", "aorta", "sternum"):
        assert t in texts
    assert any("thoracic vertebra" in t for t in texts) and any(t.endswith("rib") for t in texts)
    for c in ph.captions:
        assert c["class"] in CLASS_NAMES
        (i0, j0, k0), (i1, j1, k1) = c["bbox_ijk"]
        assert (
            0 <= i0 <= i1 < ph.labels.shape[0]
            and 0 <= j0 <= j1 < ph.labels.shape[1]
            and 0 <= k0 <= k1 < ph.labels.shape[2]
        )
        box = (slice(i0, i1 + 1), slice(j0, j1 + 1), slice(k0, k1 + 1))
        assert (ph.labels[box] == LABEL_OF[c["class"]]).any(), c["text"]
        assert c["slices"] and set(c["boxes_2d"]) == set(c["slices"])
        for k, (a0, b0, a1, b1) in c["boxes_2d"].items():
            assert k0 <= k <= k1 and i0 <= a0 <= a1 <= i1 and j0 <= b0 <= b1 <= j1
            sl = (
                ph.lungs[a0 : a1 + 1, b0 : b1 + 1, k]
                if c["class"] == "lung"
                else ph.labels[a0 : a1 + 1, b0 : b1 + 1, k]
            )
            assert sl.any()
    right = [c for c in ph.captions if c["text"] == "right lung"][0]
    assert (ph.lungs[tuple(slice(a, b + 1) for a, b in zip(*right["bbox_ijk"]))] == RIGHT_LUNG).sum() == (
        ph.lungs == RIGHT_LUNG
    ).sum()


def test_write_phantom_round_trip(small, tmp_path):
    import nibabel as nib

    paths = write_phantom(small, tmp_path, "case_001")
    assert set(paths) == {"ct", "label", "lungs", "report"}
    ct = nib.load(paths["ct"])
    assert ct.get_data_dtype() == np.int16
    np.testing.assert_allclose(ct.affine, small.ct.affine)
    np.testing.assert_array_equal(
        np.asanyarray(ct.dataobj), np.clip(np.rint(small.ct.hu), -32768, 32767).astype(np.int16)
    )
    for key, arr in (("label", small.labels), ("lungs", small.lungs)):
        img = nib.load(paths[key])
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, small.ct.affine)
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), arr)
    rep = json.loads(open(paths["report"]).read())
    assert rep["report"] == small.report and rep["meta"]["seed"] == 3
    assert len(rep["captions"]) == len(small.captions)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"case_001_{s}" for s in ("ct.nii.gz", "label.nii.gz", "lungs.nii.gz", "report.json")
    )
    # re-run safe: complete outputs are kept, overwrite rewrites them
    mtimes = {k: (tmp_path / p).stat().st_mtime_ns for k, p in paths.items()}
    (tmp_path / "case_001_report.json").write_text('{"marker": 1}')
    assert write_phantom(small, tmp_path, "case_001") == paths
    assert json.loads((tmp_path / "case_001_report.json").read_text()) == {"marker": 1}
    write_phantom(small, tmp_path, "case_001", overwrite=True)
    assert json.loads((tmp_path / "case_001_report.json").read_text())["report"] == small.report
    assert mtimes  # paths existed


def test_render_and_cli(small, tmp_path):
    from PIL import Image

    png = render_slice_png(small, tmp_path / "slice.png", coronal=True)
    im = Image.open(png)
    assert im.size[0] > 600 and im.size[1] > 400
    assert len(np.unique(np.asarray(im.convert("L")))) > 20  # an image, not a blank canvas
    out = tmp_path / "cli"
    assert (
        main(["--out", str(out), "--n", "2", "--shape", "40", "40", "24", "--spacing", "8", "8", "10", "--seed", "7"])
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"phantom_{i:03d}_{s}" for i in (7, 8) for s in ("ct.nii.gz", "label.nii.gz", "lungs.nii.gz", "report.json")
    )
    before = (out / "phantom_007_ct.nii.gz").stat().st_mtime_ns
    assert (
        main(["--out", str(out), "--n", "1", "--shape", "40", "40", "24", "--spacing", "8", "8", "10", "--seed", "7"])
        == 0
    )
    assert (out / "phantom_007_ct.nii.gz").stat().st_mtime_ns == before
