"""SA-3 pseudo labels: prompts, Eq. 9-10, Algorithm 2 literal vs production, the bundle, resume after a kill, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.classes import CLASS_NAMES, LABEL_OF
from common.prompts import (
    component_box_prompts,
    grid_dot_prompts,
    grid_intersections,
    negative_point_prompts,
    overlap_ratio,
    union_of_selected,
)

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "pseudolabel"
CONFIG = BUNDLE / "configs" / "inference.json"
MULTI = BUNDLE / "configs" / "multi_gpu_inference.json"
TOTALSEG_B = REPO.parent / "shared" / "data" / "totalseg_chest_crops" / "chest_crop_b.nii.gz"


# --------------------------------------------------------------------------- prompts and the vote


def test_grid_intersections_are_every_g_pixels_and_centred():
    pts = grid_intersections((10, 21), 5)
    xs, ys = np.unique(pts[:, 0]), np.unique(pts[:, 1])
    assert list(xs) == [0, 5, 10, 15, 20] and list(ys) == [2, 7]
    assert len(pts) == 10
    with pytest.raises(ValueError, match="grid_size"):
        grid_intersections((4, 4), 0)


def test_dot_prompts_fall_inside_the_map_only():
    region = np.zeros((40, 40), bool)
    region[10:20, 5:35] = True
    dots = grid_dot_prompts(region, 4)
    assert len(dots) > 0
    assert region[dots[:, 1].astype(int), dots[:, 0].astype(int)].all()
    everywhere = grid_dot_prompts(np.ones((40, 40), bool), 4)
    inside = {tuple(p) for p in everywhere if region[int(p[1]), int(p[0])]}
    assert inside == {tuple(p) for p in dots}
    assert grid_dot_prompts(np.zeros((40, 40), bool), 4).shape == (0, 2)


def test_box_prompts_one_per_component_with_margin_clipped():
    region = np.zeros((50, 60), bool)
    region[10:20, 5:15] = True  # rows 10..19, cols 5..14
    region[30:48, 40:60] = True  # touches the right border
    region[0, 0] = True  # a speck under min_area
    boxes = component_box_prompts(region, margin=3, min_area=4)
    assert boxes.tolist() == [[2, 7, 17, 22], [37, 27, 59, 49]]
    assert component_box_prompts(np.zeros((5, 5), bool)).shape == (0, 4)


def test_negative_points_sit_deepest_inside_each_other_class():
    heart = np.zeros((40, 40), bool)
    heart[8:33, 8:33] = True
    pts = negative_point_prompts(heart[None], grid_size=2, per_region=1)
    assert pts.shape == (1, 2)
    assert abs(pts[0, 0] - 20) <= 1 and abs(pts[0, 1] - 20) <= 1
    assert negative_point_prompts(np.zeros((2, 10, 10), bool), 2).shape == (0, 2)


def test_overlap_ratio_is_eq9_and_union_is_eq10():
    ref = torch.zeros(10, 10, dtype=torch.bool)
    ref[:, :5] = True
    c = torch.zeros(3, 10, 10, dtype=torch.bool)
    c[0, :2, :] = True  # 20 px, 10 inside -> 0.5
    c[1, :4, :4] = True  # 16 px all inside -> 1.0
    ratios = overlap_ratio(c, ref)  # c[2] empty -> 0
    assert torch.allclose(ratios, torch.tensor([0.5, 1.0, 0.0]))
    keep = ratios > 0.5
    assert torch.equal(union_of_selected(c, keep), c[1])
    assert not union_of_selected(c, torch.zeros(3, dtype=torch.bool)).any()


# --------------------------------------------------------------------------- SAM side


@pytest.fixture(scope="module")
def litemedsam():
    from common.networks import load_sam_family

    return load_sam_family("litemedsam")


@pytest.fixture(scope="module")
def real_slice():
    """A real CT slice (TotalSegmentator crop b, middle of the lung) in the radiological view, windowed,
    and its classical HU-threshold lung mask."""
    from common.io import read_ct
    from common.lungmask import hu_threshold_lung_mask
    from common.transforms.intensity import HUWindow

    vol = read_ct(TOTALSEG_B, axcodes="LPS")
    lungs = hu_threshold_lung_mask(vol.hu, vol.spacing)
    ks = np.flatnonzero(lungs.any(axis=(0, 1)))
    k = int(ks[len(ks) // 2])
    slice01 = HUWindow()(torch.from_numpy(np.ascontiguousarray(vol.hu[:, :, k].T))).numpy()
    return slice01, np.ascontiguousarray(lungs[:, :, k].T), vol.spacing


def test_batched_prompt_decoding_matches_one_prompt_at_a_time(litemedsam, real_slice):
    slice01, region, _ = real_slice
    hw = slice01.shape
    emb = litemedsam.encode(slice01[None])
    dots = grid_dot_prompts(region, 12)[:6]
    pts = litemedsam.points_to_input(dots[:, None], hw)
    labels = torch.ones(len(dots), 1, dtype=torch.int64)
    with torch.no_grad():
        batched, iou_b = litemedsam.decode_prompts(emb, points=(pts, labels))
        single = [litemedsam.decode(emb, points=(pts[i : i + 1], labels[i : i + 1]))[0] for i in range(len(dots))]
    assert torch.allclose(batched, torch.cat(single), atol=1e-3)
    assert iou_b.shape == (len(dots), 1)
    with pytest.raises(ValueError, match="one image"):
        litemedsam.decode_prompts(emb.expand(2, -1, -1, -1), points=(pts, labels))


@pytest.mark.parametrize("multimask", [False, True])
def test_shared_image_decoding_equals_sams_own_mask_decoder(litemedsam, real_slice, multimask):
    """decode_prompts feeds the image once and lets the prompts broadcast; SAM's MaskDecoder copies the
    image per prompt. Same numbers, for boxes, points and both."""
    slice01, region, _ = real_slice
    hw = slice01.shape
    emb = litemedsam.encode(slice01[None])
    boxes = litemedsam.box_to_input(component_box_prompts(region, margin=4, min_area=50), hw)
    dots = grid_dot_prompts(region, 12)[: len(boxes)]
    points = (litemedsam.points_to_input(dots[:, None], hw), torch.ones(len(dots), 1, dtype=torch.int64))
    pe = litemedsam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        for kw in ({"boxes": boxes}, {"points": points}, {"boxes": boxes, "points": points}):
            ours, ours_iou = litemedsam.decode_prompts(emb, multimask_output=multimask, **kw)
            sparse, dense = litemedsam.prompt_encoder(
                points=kw.get("points"), boxes=None if "boxes" not in kw else kw["boxes"].reshape(-1, 1, 4), masks=None
            )
            ref, ref_iou = litemedsam.mask_decoder(
                image_embeddings=emb,
                image_pe=pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense.expand(len(sparse), -1, -1, -1),
                multimask_output=multimask,
            )
            assert ours.shape == ref.shape == (len(boxes), 3 if multimask else 1, 256, 256)
            assert torch.allclose(ours, ref, atol=1e-4) and torch.allclose(ours_iou, ref_iou, atol=1e-5)
            assert torch.equal(ours > 0, ref > 0)


def test_literal_algorithm2_and_production_give_the_same_mask_on_real_ct(litemedsam, real_slice):
    """The real offline default model (LiteMedSAM) on a real CT slice: both paths, same pseudo label,
    and that label is the lung (Dice against the HU-threshold lung mask)."""
    from common.inferers import algorithm2_literal, pseudo_label_slice
    from common.metrics import dice_score

    slice01, region, spacing = real_slice
    grid = int(round(25.0 / spacing[0]))
    literal = algorithm2_literal(litemedsam, slice01, region, grid, overlap_threshold=0.5)
    with torch.no_grad():
        res = pseudo_label_slice(
            litemedsam,
            litemedsam.encode(slice01[None]),
            slice01.shape,
            region,
            prompts="dots",
            grid_size=grid,
            overlap_threshold=0.5,
        )
    assert res.n_dots == len(grid_dot_prompts(region, grid)) >= 3
    assert int((literal != res.mask).sum()) == 0
    boxes = pseudo_label_slice(
        litemedsam,
        litemedsam.encode(slice01[None]),
        slice01.shape,
        region,
        prompts="boxes",
        box_margin=5,
        min_box_area=50,
    )
    assert boxes.n_boxes >= 1 and boxes.n_kept >= 1
    # what is kept is lung (Eq. 9 made sure of the precision) and covers a large part of it; on this
    # crop SAM's mask for one of the two boxes fails the vote (one lung of two, 37 % of the field, is kept)
    precision = (boxes.mask & region).sum() / boxes.mask.sum()
    assert precision > 0.9 and (boxes.mask & region).sum() > 0.3 * region.sum(), (
        precision,
        dice_score(boxes.mask, region),
    )
    assert all(0.0 < q <= 1.2 for q in boxes.kept_iou)


def test_veto_drops_candidates_lying_on_another_class(litemedsam, real_slice):
    from common.inferers import pseudo_label_slice

    slice01, region, _ = real_slice
    emb = litemedsam.encode(slice01[None])
    kw = dict(prompts="boxes", box_margin=5, min_box_area=50)
    plain = pseudo_label_slice(litemedsam, emb, slice01.shape, region, **kw)
    vetoed = pseudo_label_slice(
        litemedsam, emb, slice01.shape, region, aux_regions=region[None], aux="veto", veto_threshold=0.2, **kw
    )
    assert plain.n_kept >= 1 and vetoed.n_kept == 0 and not vetoed.mask.any()
    neg = pseudo_label_slice(
        litemedsam, emb, slice01.shape, region, aux_regions=(~region)[None], aux="negative_points", grid_size=8, **kw
    )
    assert neg.n_candidates == plain.n_candidates
    with pytest.raises(ValueError, match="prompts"):
        pseudo_label_slice(litemedsam, emb, slice01.shape, region, prompts="circles")


def test_map_fallback_fills_in_the_map_where_a_box_is_rejected(litemedsam, real_slice):
    """A box whose candidate fails the vote gives its part of the map instead (fallback="map");
    kept candidates are untouched, and without the fallback a rejected box gives nothing."""
    from common.inferers import pseudo_label_slice

    slice01, region, _ = real_slice
    emb = litemedsam.encode(slice01[None])
    kw = dict(prompts="boxes", box_margin=5, min_box_area=50, aux_regions=region[None], aux="veto", veto_threshold=0.2)
    rejected = pseudo_label_slice(litemedsam, emb, slice01.shape, region, **kw)  # the veto rejects every box
    filled = pseudo_label_slice(litemedsam, emb, slice01.shape, region, fallback="map", **kw)
    big = np.zeros_like(region)
    for x0, y0, x1, y1 in component_box_prompts(region, margin=5, min_area=50).astype(int):
        big[y0 : y1 + 1, x0 : x1 + 1] = True
    assert not rejected.mask.any() and rejected.n_fallback == 0
    assert filled.n_kept == 0 and filled.n_fallback == filled.n_boxes >= 1
    assert np.array_equal(filled.mask, region & big)
    kept = pseudo_label_slice(
        litemedsam, emb, slice01.shape, region, prompts="boxes", box_margin=5, min_box_area=50, fallback="map"
    )
    plain = pseudo_label_slice(litemedsam, emb, slice01.shape, region, prompts="boxes", box_margin=5, min_box_area=50)
    assert kept.n_fallback == kept.n_boxes - kept.n_kept
    assert (kept.mask >= plain.mask).all()
    with pytest.raises(ValueError, match="fallback"):
        pseudo_label_slice(litemedsam, emb, slice01.shape, region, fallback="hu")


# --------------------------------------------------------------------------- 3D clean-up, confidence, merge


def test_remove_inconsistent_slices_drops_isolated_and_leaking_slices():
    from common.transforms import RemoveInconsistentSlices, RemoveInconsistentSlicesd

    m = np.zeros((1, 20, 20, 8), np.uint8)
    m[0, 5:10, 5:10, 1:5] = 1  # a lung over 4 slices
    m[0, 0:20, 0:20, 3] = 1  # slice 3 leaks into the whole field
    m[0, 12:15, 12:15, 7] = 1  # an isolated slice
    out = RemoveInconsistentSlices(0.5)(m)[0]
    assert out[:, :, [1, 2, 4]].sum() == 3 * 25
    assert not out[:, :, 3].any() and not out[:, :, 7].any()
    d = RemoveInconsistentSlicesd("pred", min_overlap=0.0)({"pred": m})
    assert np.array_equal(np.asarray(d["pred"]), m)
    with pytest.raises(ValueError, match="min_overlap"):
        RemoveInconsistentSlices(1.5)


def test_case_confidence_flags_each_reason():
    from common.metrics import case_confidence

    ref = np.zeros((10, 10, 4), bool)
    ref[2:8, 2:8] = True
    good = case_confidence(ref, ref, {"candidates": 10, "kept": 9, "mean_predicted_iou": 0.93}, 2500.0)
    assert good["passed"] and good["agreement_dice"] == 1.0 and good["kept_share"] == 0.9 and not good["reasons"]
    bad = case_confidence(np.zeros_like(ref), ref, {"candidates": 10, "kept": 1, "mean_predicted_iou": 0.4}, 50.0)
    assert not bad["passed"] and len(bad["reasons"]) == 4
    assert any("predicted IoU" in r for r in bad["reasons"]) and any("mL" in r for r in bad["reasons"])


def _fake_report(out: Path, case_id: str, passed: bool):
    from common.transforms import pseudolabel_outputs
    from common.io import write_json_atomic

    p = pseudolabel_outputs(out, case_id)
    write_json_atomic(
        p["report"],
        {
            "case_id": case_id,
            "image": f"/data/{case_id}.nii.gz",
            "label": str(p["label"]),
            "lung_ml": {"total": 3000.0},
            "confidence": {
                "passed": passed,
                "reasons": [] if passed else ["too small"],
                "mean_predicted_iou": 0.9,
                "agreement_dice": 0.95,
                "kept_share": 0.9,
            },
            "inferer": {"candidates": 10, "kept": 9},
        },
    )


def test_merge_splits_included_cases_and_lists_the_rest(tmp_path):
    from common.data import merge_pseudolabels
    from common.io import write_json_atomic

    for i in range(5):
        _fake_report(tmp_path, f"case_{i}", passed=i != 3)
    write_json_atomic(tmp_path / "failed_rank1.json", {"failed": [{"case": "case_9", "reason": "no SA-2 probmap"}]})
    summary = merge_pseudolabels(tmp_path, validation_fraction=0.25, seed=0)
    dl = json.loads((tmp_path / "datalist.json").read_text())
    assert summary == {"cases": 6, "done": 5, "included": 4, "excluded": 2, "training": 3, "validation": 1}
    ids = sorted(e["case_id"] for e in dl["training"] + dl["validation"])
    assert ids == ["case_0", "case_1", "case_2", "case_4"]
    assert {e["case_id"] for e in dl["excluded"]} == {"case_3", "case_9"}
    csv_text = (tmp_path / "qc.csv").read_text()
    assert "no SA-2 probmap" in csv_text and "too small" in csv_text and csv_text.count("\n") == 7
    again = merge_pseudolabels(tmp_path, validation_fraction=0.25, seed=0)
    assert again == summary and json.loads((tmp_path / "datalist.json").read_text()) == dl


# --------------------------------------------------------------------------- the bundle


def _write_probmap_outputs(
    probmap_dir: Path,
    case_id: str,
    ct_path: Path,
    label_path: Path | None,
    lung_mask: np.ndarray | None = None,
    affine=None,
):
    """What the probmap bundle leaves for a case: here the phantom's own lung field stands in for the SA-2 mask."""
    from common.transforms import probmap_outputs
    from common.io.nifti import save_nifti_array
    from common.io import write_json_atomic

    ct = nib.load(str(ct_path))
    affine = ct.affine if affine is None else affine
    if lung_mask is None:
        label = np.asarray(nib.load(str(label_path)).dataobj)
        lung_mask = np.isin(label, [LABEL_OF["lung"], LABEL_OF["blood vessel"], LABEL_OF["airway"]])
    onehot = np.stack(
        [lung_mask.astype(np.float32)] + [np.zeros(lung_mask.shape, np.float32)] * (len(CLASS_NAMES) - 1), axis=-1
    )
    p = probmap_outputs(probmap_dir, case_id)
    save_nifti_array(onehot, affine, p["probmap"], np.float32)
    save_nifti_array(lung_mask.astype(np.uint8), affine, p["lung_mask"], np.uint8)
    write_json_atomic(p["report"], {"case_id": case_id})


def _thin_case(c: dict, ds: Path, pm: Path, name: str, k: slice = slice(12, 18), label_dir: Path | None = None) -> dict:
    """A tiny phantom cut to a few axial slices through the lungs (real LiteMedSAM costs about 1 s a slice
    on CPU; every slice of the phantom has lung): the CT in ``ds``, its label and lung field in
    ``label_dir`` (``ds`` by default; the dataset scan leaves ``*_label`` / ``*_lungs`` out), and its
    stand-in SA-2 outputs in ``pm``. Returns ``{"image", "label", "lungs", "case_id"}``.

    Six slices (the default) keep a phantom's lung field about 1 L, inside the default QC volume range."""
    from common.io.nifti import save_nifti_array

    label_dir = ds if label_dir is None else label_dir
    label_dir.mkdir(parents=True, exist_ok=True)
    ct = nib.load(c["path"])
    case = {
        "image": str(save_nifti_array(np.asarray(ct.dataobj)[:, :, k], ct.affine, ds / f"{name}.nii.gz", np.int16)),
        "case_id": name,
    }
    for key in ("label", "lungs"):
        img = nib.load(c[key])
        case[key] = str(
            save_nifti_array(np.asarray(img.dataobj)[:, :, k], img.affine, label_dir / f"{name}_{key}.nii.gz", np.uint8)
        )
    _write_probmap_outputs(pm, name, Path(case["image"]), Path(case["label"]))
    return case


@pytest.fixture
def pseudo_dataset(tmp_path, tiny_phantom_manifest):
    """Three tiny phantoms (thinned to six slices) with SA-2 outputs, one without, one whose map is on
    another grid, one with an empty map."""
    ds, pm = tmp_path / "dataset", tmp_path / "probmap"
    ds.mkdir()
    cases = [c for c in json.loads(tiny_phantom_manifest.read_text())["cases"] if c["kind"] == "phantom"]
    for c in cases:
        _thin_case(c, ds, pm, Path(c["path"]).name.replace(".nii.gz", ""), label_dir=tmp_path / "labels")
    src = ds / (Path(cases[0]["path"]).name.replace(".nii.gz", "") + ".nii.gz")
    for name in ("no_probmap_ct", "other_grid_ct", "empty_map_ct"):
        os.symlink(src, ds / f"{name}.nii.gz")
    ct = nib.load(str(src))
    _write_probmap_outputs(pm, "other_grid_ct", src, None, lung_mask=np.ones((32, 32, 16), bool), affine=ct.affine)
    _write_probmap_outputs(pm, "empty_map_ct", src, None, lung_mask=np.zeros(ct.shape, bool))
    return ds, pm


def _overrides(ds: Path, pm: Path, out: Path, **extra) -> dict:
    return {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(ds),
        "probmap_dir": str(pm),
        "output_dir": str(out),
        "device": "cpu",
        "progress": False,
        "slice_batch": 8,
        **extra,
    }


def _run_cli(configs: list[Path], overrides: dict, launcher: list[str] | None = None, **popen) -> subprocess.Popen:
    cmd = (launcher or [sys.executable]) + [
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps([str(c) for c in configs]),
    ]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def test_bundle_writes_labels_qc_datalist_skips_bad_cases_and_resumes(pseudo_dataset, tmp_path):
    from monai.bundle import run

    ds, pm = pseudo_dataset
    out = tmp_path / "out"
    run(config_file=str(CONFIG), **_overrides(ds, pm, out, progress=False))
    qc = {r["case_id"]: r for r in json.loads((out / "qc.json").read_text())["cases"]}
    assert qc["no_probmap_ct"]["status"] == "skipped" and "run the probmap bundle" in qc["no_probmap_ct"]["reasons"]
    assert "another grid" in qc["other_grid_ct"]["reasons"]
    assert "empty" in qc["empty_map_ct"]["reasons"]
    done = sorted(k for k, r in qc.items() if r["status"] == "done")
    assert done == [f"tiny_phantom_{s}_ct" for s in range(3)]
    case = out / "tiny_phantom_0_ct"
    label = nib.load(str(case / "tiny_phantom_0_ct_pseudo_label.nii.gz"))
    src = nib.load(str(ds / "tiny_phantom_0_ct.nii.gz"))
    assert label.shape == src.shape and np.allclose(label.affine, src.affine, atol=1e-4)
    values = set(np.unique(np.asarray(label.dataobj)).tolist())
    assert values <= {0, 1, 2}
    report = json.loads((case / "tiny_phantom_0_ct_pseudolabel.json").read_text())
    assert report["settings"]["prompts"] == "boxes" and report["inferer"]["slices_with_lung"] > 0
    assert set(report["confidence"]) >= {"mean_predicted_iou", "agreement_dice", "kept_share", "passed", "reasons"}
    assert (case / "tiny_phantom_0_ct_pseudo_overlay.png").stat().st_size > 1000
    dl = json.loads((out / "datalist.json").read_text())
    listed = {e["case_id"] for e in dl["training"] + dl["validation"] + dl["excluded"]}
    assert listed == set(qc)
    for e in dl["training"] + dl["validation"]:
        assert Path(e["label"]).is_file() and Path(e["image"]).exists()
    mtime = (case / "tiny_phantom_0_ct_pseudo_label.nii.gz").stat().st_mtime_ns
    run(config_file=str(CONFIG), **_overrides(ds, pm, out, progress=False))  # re-run: nothing redone
    assert (case / "tiny_phantom_0_ct_pseudo_label.nii.gz").stat().st_mtime_ns == mtime
    assert json.loads((out / "qc.json").read_text())["summary"]["done"] == 3


def test_bundle_scores_pseudo_labels_against_phantom_lungs(tmp_path, tiny_phantom_manifest):
    from monai.bundle import run

    pm, out = tmp_path / "probmap", tmp_path / "eval"
    cases = [c for c in json.loads(tiny_phantom_manifest.read_text())["cases"] if c["kind"] == "phantom"][:2]
    datalist = []
    for c in cases:  # six slices through the lungs of each phantom, its lung field cut alike
        thin = _thin_case(c, tmp_path / "data", pm, c["id"])
        datalist.append({"image": thin["image"], "lungs": thin["lungs"], "case_id": c["id"]})
    run(
        config_file=[str(CONFIG), str(BUNDLE / "configs" / "evaluate.json")],
        **_overrides(tmp_path, pm, out),
        cases=datalist,
    )
    scores = json.loads((out / "scores.json").read_text())
    assert [r["case_id"] for r in scores["cases"]] == [c["id"] for c in cases]
    for r in scores["cases"]:
        assert (
            0.0 <= r["pseudo_dice"] <= 1.0 and r["sa2_mask_dice"] > 0.95
        )  # the stand-in SA-2 mask is the lung field itself
    assert scores["summary"]["pseudo_dice"]["n"] == 2


def _outputs(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(out.glob("*/*_pseudo_label.nii.gz"))}


def test_killed_run_loses_nothing_and_the_rerun_completes_identically(tmp_path, tiny_phantom_manifest):
    """A real SIGKILL to a real bundle process part-way; the re-run finishes and matches an uninterrupted run."""
    ds, pm = tmp_path / "dataset", tmp_path / "probmap"
    ds.mkdir()
    cases = [c for c in json.loads(tiny_phantom_manifest.read_text())["cases"] if c["kind"] == "phantom"]
    for i in range(4):  # four cases of three slices: the kill lands while later ones are still to do
        _thin_case(cases[i % len(cases)], ds, pm, f"case_{i}_ct", k=slice(13, 16))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _run_cli([CONFIG], _overrides(ds, pm, killed, overlay=True))
    deadline = time.time() + 300
    while time.time() < deadline and not list(killed.glob("*/*_pseudolabel.json")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    finished = {p.parent.name for p in killed.glob("*/*_pseudolabel.json")}
    assert 1 <= len(finished) < 4, finished
    for p in killed.glob("*/*"):  # every file under its final name is complete
        if p.name.startswith("."):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.name.endswith(".nii.gz"):
            np.asarray(nib.load(str(p)).dataobj)
    proc = _run_cli([CONFIG], _overrides(ds, pm, killed, overlay=True))
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "already done" in log
    proc = _run_cli([CONFIG], _overrides(ds, pm, clean, overlay=True))
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    a, b = _outputs(killed), _outputs(clean)
    assert sorted(a) == sorted(b) == [f"case_{i}_ct_pseudo_label.nii.gz" for i in range(4)]
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert not [p for p in killed.rglob(".*tmp-*")], "temporary files left behind"
    qa, qb = (json.loads((d / "qc.json").read_text())["summary"] for d in (killed, clean))
    assert qa == qb


def test_torchrun_two_ranks_shard_cases_and_rank0_merges(tmp_path, tiny_phantom_manifest):
    ds, pm, out = tmp_path / "dataset", tmp_path / "probmap", tmp_path / "out"
    ds.mkdir()
    cases = [c for c in json.loads(tiny_phantom_manifest.read_text())["cases"] if c["kind"] == "phantom"]
    for c in cases:  # four slices a case: the sharding and the merge are what is tested here
        _thin_case(c, ds, pm, Path(c["path"]).name.replace(".nii.gz", ""), k=slice(13, 17))
    os.symlink(cases[0]["path"], ds / "no_probmap_ct.nii.gz")
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
    ]
    proc = _run_cli([CONFIG, MULTI], _overrides(ds, pm, out, overlay=False), launcher=launcher)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-4000:]
    runs = {r: json.loads((out / f"pseudolabel_run_rank{r}.json").read_text()) for r in (0, 1)}
    by_rank = {r: sorted(d["case_id"] for d in runs[r]["done"]) for r in runs}
    ids = sorted(["no_probmap_ct"] + [Path(c["path"]).name.replace(".nii.gz", "") for c in cases])
    assert by_rank[0] == [i for i in ids[0::2] if i != "no_probmap_ct"] and by_rank[1] == [
        i for i in ids[1::2] if i != "no_probmap_ct"
    ]
    summary = json.loads((out / "qc.json").read_text())["summary"]
    assert summary["done"] == 3 and summary["cases"] == 4
    dl = json.loads((out / "datalist.json").read_text())
    assert len(dl["training"]) + len(dl["validation"]) + len(dl["excluded"]) == 4
