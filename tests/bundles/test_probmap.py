"""SA-2 (probmap): Algorithm 1 literal vs production, volume geometry, prompts, and the bundle end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import BUNDLES, EMBED_DIM, IMAGE_SIZE, LUNG_PET_CT_DX_8MM, PATCH_SIZE, TOTALSEG_B

CONFIG = BUNDLES / "probmap" / "configs" / "inference.json"
EVAL_CONFIG = BUNDLES / "probmap" / "configs" / "evaluate.json"
REPO = BUNDLES.parent


# --------------------------------------------------------------------------- Algorithm 1


@pytest.mark.parametrize("aggregation", ["mean", "max", "gaussian"])
def test_production_path_matches_literal_algorithm1(tiny_clip, aggregation):
    from common.inferers.similarity_maps import algorithm1_literal, class_text_embeddings, patch_similarity_maps

    model, _ = tiny_clip
    torch.manual_seed(1)
    slices = torch.rand(2, 1, 40, 40)
    text = class_text_embeddings(model)
    # batch_size 7 does not divide the 2 x 49 windows: batches straddle slices
    prod = patch_similarity_maps(
        slices,
        model,
        text,
        patch_px=12,
        stride_px=5,
        patch_size=PATCH_SIZE,
        image_size=IMAGE_SIZE,
        aggregation=aggregation,
        batch_size=7,
    )
    assert prod.shape == (2, 5, 40, 40)
    for n in range(2):
        lit = algorithm1_literal(
            slices[n, 0],
            model,
            patch_px=12,
            stride_px=5,
            patch_size=PATCH_SIZE,
            image_size=IMAGE_SIZE,
            aggregation=aggregation,
        )
        assert torch.isfinite(lit).all()
        assert float((lit - prod[n]).abs().max()) < 1e-5
    assert float(prod.abs().max()) <= 1.0 + 1e-5  # cosine similarities
    assert float(prod.std()) > 0  # the map is not flat


def test_windows_cover_every_pixel():
    from common.inferers.similarity_maps import window_index, window_starts

    assert window_starts(40, 12, 5) == [0, 5, 10, 15, 20, 25, 28]  # last window flush with the edge
    idx = window_index(40, 12, 5)
    assert idx.shape == (49, 144)
    counts = torch.bincount(idx.reshape(-1), minlength=1600)
    assert int(counts.min()) >= 1
    with pytest.raises(ValueError, match="does not fit"):
        window_starts(10, 12, 5)


def test_gaussian_aggregation_keeps_a_centre_labelled_boundary_where_mean_pulls_it_in():
    """SA-1 labels a patch by its central quarter. A classifier that does exactly that, and is surer of soft tissue
    (margin 0.3) than of lung (0.1), as a sharp one may be: the mean over the windows covering a pixel moves the
    lung's edge inwards by a good part of a window; weighting each window towards its centre keeps it where the
    classifier's own boundary is (to within the window grid)."""
    from scipy import ndimage

    from common.inferers import spread_window_scores, window_weights
    from common.inferers.similarity_maps import window_index

    size, patch_px, stride_px = 96, 16, 4
    yy, xx = np.mgrid[:size, :size]
    lung = (yy - 48) ** 2 + (xx - 48) ** 2 <= 24**2  # a 24-pixel disk in soft tissue
    index = window_index(size, patch_px, stride_px)
    core = np.zeros((patch_px, patch_px), bool)
    core[6:10, 6:10] = True  # the central quarter of the window's side
    core_is_lung = lung.reshape(-1)[index.numpy()][:, core.reshape(-1)].mean(axis=1) >= 0.5
    scores = torch.where(
        torch.from_numpy(core_is_lung)[:, None], torch.tensor([0.20, 0.10]), torch.tensor([0.05, 0.35])
    )  # (L, [lung, tissue])
    area = {}
    for aggregation in ("mean", "gaussian"):
        maps = spread_window_scores(scores[None], size, patch_px, stride_px, aggregation)
        assert maps.shape == (1, 2, size, size) and torch.isfinite(maps).all()
        mapped = (maps[0, 0] > maps[0, 1]).numpy()
        area[aggregation] = mapped.sum() / lung.sum()
        assert ndimage.label(mapped)[1] == 1
    assert area["mean"] < 0.8  # the mean shrinks the disk (to 0.73 of its area here; 0.96 with equal margins)
    assert abs(area["gaussian"] - 1.0) < 0.1  # the centre-weighted map keeps it (0.93; 1.02 with equal margins)
    w = window_weights(patch_px, "gaussian")
    assert w.shape == (patch_px, patch_px) and float(w[7:9, 7:9].min()) == float(w.max()) and float(w[0, 0]) < 0.01
    assert torch.equal(window_weights(patch_px, "mean"), torch.ones(patch_px, patch_px))
    with pytest.raises(ValueError, match="window scores"):
        spread_window_scores(scores[None, :-1], size, patch_px, stride_px, "gaussian")
    with pytest.raises(ValueError, match="sigma_scale"):
        window_weights(patch_px, "gaussian", sigma_scale=0)


def test_dense_mode_and_prompt_ensembling(tiny_clip):
    from common.inferers.similarity_maps import class_text_embeddings, dense_similarity_maps

    model, _ = tiny_clip
    text = class_text_embeddings(model, templates=["CT patch of the {}", "a {} on chest CT"])
    assert text.shape == (5, EMBED_DIM)
    assert torch.allclose(text.norm(dim=1), torch.ones(5), atol=1e-5)
    one = class_text_embeddings(model, templates=["CT patch of the {}"])
    assert not torch.allclose(one, text)
    dense = dense_similarity_maps(torch.rand(2, 1, 40, 40), model, text, patch_px=12, image_size=IMAGE_SIZE)
    assert dense.shape == (2, 5, 40, 40) and torch.isfinite(dense).all()


def test_untokenisable_class_and_bad_templates_fail_clearly(tiny_clip):
    from common.inferers.patch_similarity import PatchSimilarityInferer
    from common.inferers.similarity_maps import class_text_embeddings

    model, _ = tiny_clip
    with pytest.raises(ValueError, match="cannot be tokenised"):
        class_text_embeddings(model, class_names=["lung", "\u2603\u2603"])
    with pytest.raises(ValueError, match="empty"):
        class_text_embeddings(model, class_names=["lung", " "])
    with pytest.raises(ValueError, match=r"\{\}"):
        PatchSimilarityInferer(templates=["CT patch"])
    with pytest.raises(ValueError, match="aggregation"):
        PatchSimilarityInferer(aggregation="median")


def test_inferer_keeps_the_input_grid_and_orientation(tiny_clip):
    """A volume and its left-right flipped copy (with the flipped affine) are the same anatomy: their
    maps must be flips of each other; a constant slice maps to the empty similarity."""
    from monai.data import MetaTensor

    from common.inferers.patch_similarity import PatchSimilarityInferer
    from common.inferers.similarity_maps import EMPTY_SIMILARITY

    model, _ = tiny_clip
    rng = np.random.default_rng(0)
    hu = rng.normal(-500, 300, size=(50, 40, 6)).astype(np.float32)
    hu[:, :, 3] = 40.0  # no contrast
    affine = np.diag([-2.0, -2.0, 5.0, 1.0])  # LPS voxel axes
    flipped_affine = affine.copy()
    flipped_affine[0, 0] = 2.0
    flipped_affine[0, 3] = -2.0 * 49
    inferer = PatchSimilarityInferer(stride_mm=20.0, progress=False)
    a = inferer(MetaTensor(torch.from_numpy(hu)[None, None], affine=torch.from_numpy(affine)), model)
    b = inferer(
        MetaTensor(torch.from_numpy(hu[::-1].copy())[None, None], affine=torch.from_numpy(flipped_affine)), model
    )
    assert a.shape == (1, 5, 50, 40, 6)
    assert torch.allclose(a[0].flip(1), b[0], atol=1e-5)
    assert torch.allclose(a[0, :, :, :, 3], torch.full_like(a[0, :, :, :, 3], EMPTY_SIMILARITY), atol=1e-5)
    assert inferer.last_info["empty_slices"] == [3]
    assert float(a[0, :, :, :, 0].std()) > 0


# --------------------------------------------------------------------------- the bundle


def _overrides(ckpt: Path, dataset_dir: Path, out: Path, **extra) -> dict:
    return {
        "bundle_root": str(BUNDLES / "probmap"),
        "ckpt_path": str(ckpt),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(out),
        "device": "cpu",
        "progress": False,
        "stride_mm": 20.0,
        **extra,
    }


def _run_cli(config, overrides: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config)]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def phantom_dataset(tmp_path, tiny_phantom_manifest) -> Path:
    ds = tmp_path / "dataset"
    ds.mkdir()
    cases = json.loads(tiny_phantom_manifest.read_text())["cases"]
    for c in cases:
        if c["kind"] == "phantom":
            os.symlink(c["path"], ds / Path(c["path"]).name)
            os.symlink(c["label"], ds / Path(c["label"]).name)  # excluded by name (*_label.nii.gz)
    (ds / "corrupt_scan.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    return ds


def test_bundle_writes_maps_masks_reports_and_resumes(tiny_clip, phantom_dataset, tmp_path):
    from monai.bundle import run

    _, ckpt = tiny_clip
    out = tmp_path / "out"
    run(config_file=str(CONFIG), **_overrides(ckpt, phantom_dataset, out))
    failed = json.loads((out / "failed.json").read_text())["failed"]
    assert len(failed) == 1 and "corrupt_scan" in failed[0]["case"]
    done = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert done == [f"tiny_phantom_{s}_ct" for s in range(3)]
    case = out / "tiny_phantom_0_ct"
    src = nib.load(str(phantom_dataset / "tiny_phantom_0_ct.nii.gz"))
    prob = nib.load(str(case / "tiny_phantom_0_ct_probmap.nii.gz"))
    mask = nib.load(str(case / "tiny_phantom_0_ct_lung_mask.nii.gz"))
    assert prob.shape == src.shape + (5,) and mask.shape == src.shape
    assert np.allclose(prob.affine, src.affine, atol=1e-4) and np.allclose(mask.affine, src.affine, atol=1e-4)
    p = np.asarray(prob.dataobj)
    assert np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1
    # softmax over the five classes and the two background ones, whose share is left out of the file
    assert (p.sum(-1) <= 1.0 + 1e-3).all() and float(p.sum(-1).min()) < 0.999
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    report = json.loads((case / "tiny_phantom_0_ct_probmap.json").read_text())
    assert (
        report["threshold"] == pytest.approx(0.6) and report["threshold_method"] == "global"
    )  # the default tau (release 0.4)
    assert set(report["lung_ml"]) >= {"total"} and report["lung_ml"]["total"] >= 0
    assert (case / "tiny_phantom_0_ct_overlay.png").stat().st_size > 1000
    assert not list(out.rglob(".*tmp*"))  # nothing half-written

    # re-run: finished cases are skipped (their files untouched), the corrupt one is tried again
    mtime = (case / "tiny_phantom_0_ct_probmap.nii.gz").stat().st_mtime_ns
    run(config_file=str(CONFIG), **_overrides(ckpt, phantom_dataset, out))
    assert (case / "tiny_phantom_0_ct_probmap.nii.gz").stat().st_mtime_ns == mtime
    assert len(json.loads((out / "failed.json").read_text())["failed"]) == 1


def test_bundle_cli_missing_checkpoint_names_the_path(phantom_dataset, tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    proc = _run_cli(CONFIG, _overrides(missing, phantom_dataset, tmp_path / "out"))
    assert proc.returncode != 0
    assert str(missing) in proc.stderr + proc.stdout


def test_bundle_rejects_a_checkpoint_of_another_architecture(phantom_dataset, tmp_path):
    from monai.bundle import run

    other = tmp_path / "unet.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(2, 1, 3, 3)}}, other)
    with pytest.raises(Exception) as info:
        run(config_file=str(CONFIG), **_overrides(other, phantom_dataset, tmp_path / "out"))
    messages, e = [], info.value
    while e is not None:  # MONAI's config wraps the loader's error
        messages.append(str(e))
        e = e.__cause__
    assert any("not a LungCLIP checkpoint" in m and str(other) in m for m in messages)


def test_volume_without_lungs_gives_an_empty_mask_and_says_so(tiny_clip, tmp_path):
    """Soft tissue only (a water cylinder in air): softmax maps, nothing passes as lung, no NaN."""
    from monai.bundle import run

    _, ckpt = tiny_clip
    ds = tmp_path / "ds"
    ds.mkdir()
    x, y = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    body = ((x - 24) ** 2 + (y - 24) ** 2) < 18**2
    hu = np.where(body[:, :, None], 30.0, -1000.0) * np.ones((1, 1, 10))
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([4.0, 4.0, 5.0, 1.0])), str(ds / "water.nii.gz"))
    flat = np.full((48, 48, 6), -1000, dtype=np.int16)
    nib.save(nib.Nifti1Image(flat, np.diag([4.0, 4.0, 5.0, 1.0])), str(ds / "air.nii.gz"))
    out = tmp_path / "out"
    run(config_file=str(CONFIG), **_overrides(ckpt, ds, out, tau=0.9))
    for name in ("water", "air"):
        rep = json.loads((out / name / f"{name}_probmap.json").read_text())
        p = np.asarray(nib.load(str(out / name / f"{name}_probmap.nii.gz")).dataobj)
        assert np.isfinite(p).all()
        assert not rep["lung_found"] and rep["lung_ml"]["total"] == 0
        assert any("no lung" in w for w in rep["warnings"])
    air = json.loads((out / "air" / "air_probmap.json").read_text())
    assert any("without contrast" in w for w in air["warnings"])


def test_evaluate_scores_channels_against_phantom_labels(tiny_clip, tmp_path):
    from monai.bundle import run

    _, ckpt = tiny_clip
    out = tmp_path / "eval"
    run(
        config_file=[str(CONFIG), str(EVAL_CONFIG)],
        bundle_root=str(BUNDLES / "probmap"),
        ckpt_path=str(ckpt),
        output_dir=str(out),
        phantom_dir=str(tmp_path / "phantoms"),
        n_phantoms=1,
        device="cpu",
        progress=False,
        stride_mm=40.0,
        overlay=False,
    )
    scores = json.loads((out / "scores.json").read_text())
    row = scores["cases"][0]
    for key in (
        "lung_mask_dice",
        "lung_mask_iou",
        "lung_dice",
        "heart_dice",
        "blood_vessel_dice",
        "airway_dice",
        "bone_dice",
    ):
        assert 0.0 <= row[key] <= 1.0
    assert scores["summary"]["lung_mask_dice"]["n"] == 1
    assert (out / "scores.csv").read_text().startswith("case_id,")


def test_body_mask_drops_outside_air_but_keeps_a_lung_cut_by_the_crop():
    from common.lungmask import body_mask
    from common.transforms import RestrictToBodyd

    rng = np.random.default_rng(0)
    hu = rng.normal(-1000, 5, size=(60, 60, 4)).astype(np.float32)  # free air
    x, y = np.meshgrid(np.arange(60), np.arange(60), indexing="ij")
    body = (((x - 30) ** 2 + (y - 30) ** 2) < 25**2) | (x >= 40)  # the crop cuts the body at x = 59
    hu[body] = 40.0
    hu[(x > 45) & (abs(y - 30) < 8)] = -850.0  # a lung reaching that border
    mask = body_mask(hu, (1.0, 1.0, 1.0))
    assert mask[50, 30, 0] and mask[58, 30, 0]  # lung kept, even where it touches the border
    assert not mask[2, 2, 0] and not mask[2, 58, 0] and mask[30, 30, 0]  # air around the patient dropped
    d = RestrictToBodyd("lung_mask", image_key="image")(
        {"lung_mask": np.ones((1, 60, 60, 4), np.uint8), "image": hu[None]}
    )
    assert d["lung_mask"][0, 2, 2, 0] == 0 and d["lung_mask"][0, 50, 30, 0] == 1


def test_shipped_default_model_maps_a_real_ct_crop():
    """The real offline defaults (EfficientNet-Lite0 ImageNet weights, MiniLM) through the inferer and the
    bundle's post-processing steps on real CT (TotalSegmentator crop): finite maps on the input grid."""
    from monai.data import MetaTensor

    from common.inferers import PatchSimilarityInferer
    from common.io import read_ct
    from common.networks import build_lung_clip
    from common.transforms import SimilarityToProbability

    model = build_lung_clip(teacher_shape=None).eval()
    model.preprocessing = {
        "slice_size": 64,
        "image_size": 64,
        "patch_size": 32,
        "patch_mm": 40.0,
        "hu_window": [-1000.0, 400.0],
    }
    vol = read_ct(TOTALSEG_B)
    hu = vol.hu[:, :, 50:53]
    inferer = PatchSimilarityInferer(stride_mm=20.0, progress=False)
    sims = inferer(
        MetaTensor(torch.from_numpy(np.ascontiguousarray(hu))[None, None], affine=torch.from_numpy(vol.affine)), model
    )
    assert sims.shape == (1, 5) + hu.shape
    assert torch.isfinite(sims).all() and float(sims.abs().max()) <= 1.0 + 1e-5 and float(sims.std()) > 0
    prob = SimilarityToProbability("softmax", scale=float(model.temperature_scale()))(sims[0])
    assert torch.allclose(prob.sum(0), torch.ones(hu.shape), atol=1e-4)


def test_shipped_sa1_map_puts_the_lungs_inside_the_body_on_real_ct():
    """The shipped SA-1 model with SA-2's prompts (the bundle's anatomical and background classes) on three
    slices of a full-field real scan (Lung-PET-CT-Dx, Siemens, 8 mm): the raw map, before any clean-up,
    calls lung where the HU threshold finds lung and not in the air around the patient. The SA-1 file of
    release 0.3 (no background classes) put 48 % of its lung outside the body on these slices (Dice 0.548);
    release 0.4's: 15 % (Dice 0.734) with mean window aggregation, 17 % (Dice 0.752) with the centre-weighted one."""
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    from common.inferers import PatchSimilarityInferer
    from common.io import read_ct
    from common.lungmask import body_mask, hu_threshold_lung_mask
    from common.metrics import dice_score
    from common.networks import load_network
    from common.transforms import SimilarityToProbability

    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    classes, background = parser["class_names"], parser["background_names"]
    model = load_network(BUNDLES / "foundation_clip" / "models" / "model.pt").eval()
    vol = read_ct(LUNG_PET_CT_DX_8MM)
    hu_mask = hu_threshold_lung_mask(vol.hu, vol.spacing)
    inside = body_mask(vol.hu, vol.spacing)
    ks = [8, 15, 22]  # base, middle, apex side of the 30 slices
    hu = vol.hu[:, :, ks]
    inferer = PatchSimilarityInferer(
        class_names=classes + background,
        stride_mm=parser["stride_mm"],
        aggregation=parser["aggregation"],
        progress=False,
    )
    sims = inferer(
        MetaTensor(torch.from_numpy(np.ascontiguousarray(hu))[None, None], affine=torch.from_numpy(vol.affine)), model
    )
    prob = SimilarityToProbability("softmax", scale=float(model.temperature_scale()), num_classes=len(classes))(sims[0])
    assert prob.shape == (len(classes),) + hu.shape
    lung = (prob.argmax(0) == 0) & (prob[0] > 0.5)
    lung = lung.numpy()
    outside = float((lung & ~inside[:, :, ks]).sum()) / max(int(lung.sum()), 1)
    dice = dice_score(lung, hu_mask[:, :, ks])
    print(f"raw map: {outside:.3f} of its lung outside the body, Dice {dice:.3f} with the HU threshold")
    assert outside < 0.25, f"{outside:.2f} of the raw map's lung lies outside the body"  # release 0.3: 0.48
    assert dice > 0.68, f"raw map lung vs HU threshold Dice {dice:.3f}"
