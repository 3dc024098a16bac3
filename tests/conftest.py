"""Shared fixtures: the real shared CT data, small editable copies of the LIDC series, the default data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from common.default_data import DEFAULT_OUT, shared_data_dir  # noqa: E402

SHARED = shared_data_dir()
LIDC_DIR = SHARED / "lidc_idri_1011_dicom"
TOTALSEG_A = SHARED / "totalseg_chest_crops" / "chest_crop_a.nii.gz"
TOTALSEG_B = SHARED / "totalseg_chest_crops" / "chest_crop_b.nii.gz"
DEEPLESION = SHARED / "deeplesion_png"


def pytest_configure(config):
    if not LIDC_DIR.is_dir():
        raise pytest.UsageError(f"shared real CT data not found at {SHARED}: clone the project with ../shared beside it")


@pytest.fixture(scope="session")
def lidc_files_by_position() -> list[Path]:
    """The LIDC files sorted from feet to head (by ImagePositionPatient z)."""
    import pydicom

    files = sorted(LIDC_DIR.glob("*.dcm"))
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    return [f for _, f in sorted(zip(z, files))]


@pytest.fixture
def lidc_subset(tmp_path, lidc_files_by_position) -> Path:
    """12 consecutive mid-lung LIDC slices copied into a folder a test may edit."""
    folder = tmp_path / "lidc_subset"
    folder.mkdir()
    mid = len(lidc_files_by_position) // 2
    for f in lidc_files_by_position[mid - 6 : mid + 6]:
        shutil.copy(f, folder / f.name)
    return folder


def sorted_by_position(folder: Path) -> list[Path]:
    import pydicom

    files = sorted(folder.glob("*.dcm"))
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    return [f for _, f in sorted(zip(z, files))]


def edit_dicom(path: Path, **tags) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


@pytest.fixture(scope="session")
def default_manifest() -> dict:
    from common.default_data import load_manifest

    return load_manifest(DEFAULT_OUT)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --------------------------------------------------------------------------- SA-1 (foundation_clip) fixtures

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
TINY_CLIP_OVERLAY = Path(__file__).resolve().parent / "configs" / "foundation_clip_tiny.json"


@pytest.fixture(scope="session")
def tiny_phantom_manifest(tmp_path_factory) -> Path:
    """A manifest of three small phantoms (64 x 64 x 32 at 5 x 5 x 7.5 mm) and one real NIfTI crop."""
    from common.io import write_json_atomic
    from common.phantom import generate_phantom, write_phantom

    out = tmp_path_factory.mktemp("tiny_manifest")
    cases = []
    for seed in range(3):
        case_id = f"tiny_phantom_{seed}"
        paths = write_phantom(generate_phantom(shape=(64, 64, 32), spacing=(5.0, 5.0, 7.5), seed=seed), out, case_id)
        cases.append({"id": case_id, "path": paths["ct"], "label": paths["label"], "lungs": paths["lungs"], "report": paths["report"], "kind": "phantom", "format": "nifti"})
    cases.insert(0, {"id": "totalseg_chest_crop_b", "path": str(TOTALSEG_B), "kind": "real", "format": "nifti"})
    path = out / "manifest.json"
    write_json_atomic(path, {"cases": cases, "notes": []})
    return path


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """A tiny random BERT directory (tokenizer + config + weights) for fast text-encoder tests."""
    from tests.test_networks import _tiny_bert_dir

    return _tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"))
