"""foundation_clip configs/inference.json: per-slice image embeddings and prompt text embeddings.

A tiny random LungCLIP is saved as a checkpoint; the bundle runs (CLI once, in-process for the
resume and the missing-checkpoint cases) on a real NIfTI crop, 12 real LIDC DICOM slices and one
corrupt file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import BUNDLES, EMBED_DIM, IMAGE_SIZE, SLICE_SIZE, TOTALSEG_B, build_tiny_clip

CONFIG = BUNDLES / "foundation_clip" / "configs" / "inference.json"
REPO = BUNDLES.parent


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, tiny_text_dir):
    """The shared tiny SA-1 model with a teacher head (the export keeps the distillation output's shape)."""
    return build_tiny_clip(
        tmp_path_factory.mktemp("clip_ckpt"), tiny_text_dir, teacher_shape=(256, 4, 4), preprocessing=False
    )


@pytest.fixture
def dataset(tmp_path, lidc_subset) -> Path:
    ds = tmp_path / "dataset"
    ds.mkdir()
    os.symlink(TOTALSEG_B, ds / TOTALSEG_B.name)
    shutil.move(str(lidc_subset), ds / "lidc")
    (ds / "corrupt_scan.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    return ds


def _bundle_overrides(ckpt: Path, dataset_dir: Path, out: Path) -> dict:
    return {
        "bundle_root": str(BUNDLES / "foundation_clip"),
        "ckpt_path": str(ckpt),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(out),
        "image_size": IMAGE_SIZE,
        "slice_size": SLICE_SIZE,
        "batch_size": 5,
        "device": "cpu",
        "progress": False,
    }


def _run_cli(overrides: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIG)]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _run_in_process(overrides: dict) -> None:
    from monai.bundle import run

    run(config_file=str(CONFIG), **overrides)


def _reference_slice(path, k: int) -> torch.Tensor:
    """Slice k as training cuts it (clip_pairs) and the training loader resizes it, done by hand."""
    from monai.transforms import Resize

    from common.data.clip_pairs import _resize2d, _square
    from common.io import read_ct
    from common.transforms import HUWindow

    hu = read_ct(path, axcodes="LPS").hu
    sample = np.asarray(
        HUWindow()(_resize2d(_square(hu[:, :, k].T, float(hu.min())), SLICE_SIZE, "area")), dtype=np.float32
    )
    img = np.asarray(
        Resize((IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", anti_aliasing=True)(sample[None]), dtype=np.float32
    )
    return torch.from_numpy(img)[None], hu.shape[2]


def test_inference_bundle_exports_embeddings_and_resumes(tiny_clip, dataset, tmp_path):
    from common.data import class_prompts
    from common.engines.embed import embedding_path

    model, ckpt = tiny_clip
    out = tmp_path / "out"
    proc = _run_cli(_bundle_overrides(ckpt, dataset, out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "embeddings_summary.json").read_text())
    assert sorted(w["case_id"] for w in summary["written"]) == ["chest_crop_b", "lidc"]
    assert [f["case_id"] for f in summary["failed"]] == ["corrupt_scan"]
    assert "corrupt_scan.nii.gz" in summary["failed"][0]["reason"]
    assert summary["skipped_done"] == []

    # one (n_slices, D) float32 npy per good case, equal to encode_image on the training-style slice
    for case_id, source, k in [("chest_crop_b", TOTALSEG_B, 57), ("lidc", dataset / "lidc", 6)]:
        emb = np.load(embedding_path(out, case_id))
        x, n_slices = _reference_slice(source, k)
        assert emb.dtype == np.float32 and emb.shape == (n_slices, EMBED_DIM)
        assert np.isfinite(emb).all() and emb.std(axis=0).max() > 0
        with torch.no_grad():
            expected = model.encode_image(x)[0].numpy()
        np.testing.assert_allclose(emb[k], expected, rtol=1e-4, atol=1e-5)
    assert np.load(embedding_path(out, "lidc")).shape[0] == 12

    text = json.loads((out / "text_embeddings.json").read_text())
    assert text["prompts"] == class_prompts() and len(text["prompts"]) == 7 and text["embed_dim"] == EMBED_DIM
    with torch.no_grad():
        np.testing.assert_allclose(
            np.asarray(text["embeddings"]), model.encode_text(text["prompts"]).numpy(), rtol=1e-4, atol=1e-5
        )

    # a second run skips what is done (files untouched) and retries only the failed case
    mtimes = {c: embedding_path(out, c).stat().st_mtime_ns for c in ("chest_crop_b", "lidc")}
    _run_in_process(_bundle_overrides(ckpt, dataset, out))
    summary = json.loads((out / "embeddings_summary.json").read_text())
    assert summary["written"] == []
    assert sorted(s["case_id"] for s in summary["skipped_done"]) == ["chest_crop_b", "lidc"]
    assert [f["case_id"] for f in summary["failed"]] == ["corrupt_scan"]
    assert {c: embedding_path(out, c).stat().st_mtime_ns for c in mtimes} == mtimes
    assert not list(out.rglob(".*tmp*")), "temporary files left behind"


def test_inference_bundle_missing_checkpoint_names_the_path(dataset, tmp_path):
    missing = tmp_path / "no_such_dir" / "model.pt"
    with pytest.raises(Exception) as info:
        _run_in_process(_bundle_overrides(missing, dataset, tmp_path / "out"))
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__
    assert any(isinstance(c, FileNotFoundError) and str(missing) in str(c) for c in chain), [str(c) for c in chain]
    assert not (tmp_path / "out" / "embeddings_summary.json").exists()


def test_export_without_slice_size_and_empty_dataset(tiny_clip, tmp_path):
    """The function directly: one area resize when slice_size is None; an empty folder is a clear error."""
    from common.engines.embed import embedding_path, export_clip_embeddings
    from common.io import read_ct

    model, _ = tiny_clip
    ds = tmp_path / "ds"
    ds.mkdir()
    with pytest.raises(ValueError, match="no CT scan found"):
        export_clip_embeddings(model, ds, tmp_path / "out", progress=False)
    os.symlink(TOTALSEG_B, ds / TOTALSEG_B.name)
    (ds / "chest_crop_b_label.nii.gz").write_bytes(b"a label map beside the CT, not a scan")
    summary = export_clip_embeddings(
        model, ds, tmp_path / "out", image_size=IMAGE_SIZE, batch_size=64, progress=False, exclude=["*_label.nii.gz"]
    )
    assert [w["case_id"] for w in summary["written"]] == ["chest_crop_b"] and not summary["failed"]
    assert [x["case_id"] for x in summary["excluded"]] == ["chest_crop_b_label"]
    emb = np.load(embedding_path(tmp_path / "out", "chest_crop_b"))

    from common.data.clip_pairs import _resize2d, _square
    from common.transforms import HUWindow

    hu = read_ct(TOTALSEG_B, axcodes="LPS").hu
    k = hu.shape[2] - 1  # the last slice, in the last (partial) batch
    img = np.asarray(
        HUWindow()(_resize2d(_square(hu[:, :, k].T, float(hu.min())), IMAGE_SIZE, "area")), dtype=np.float32
    )
    with torch.no_grad():
        expected = model.encode_image(torch.from_numpy(img)[None, None])[0].numpy()
    np.testing.assert_allclose(emb[k], expected, rtol=1e-4, atol=1e-5)
