"""QC verdicts on real scans and on real scans broken in each way the issue names."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from common.io import CTVolume, read_ct
from common.qc import QCThresholds, qc_volume, run_qc
from tests.conftest import LIDC_DIR, TOTALSEG_A, edit_dicom, sorted_by_position


def verdicts(vol):
    return {c.name: c for c in qc_volume(vol)}


def failed(vol):
    return sorted(name for name, c in verdicts(vol).items() if not c.passed)


def test_real_lidc_passes_every_check():
    checks = verdicts(read_ct(LIDC_DIR))
    assert all(c.passed for c in checks.values()), {n: c.reason for n, c in checks.items() if not c.passed}
    assert checks["lung_coverage"].value > 3000
    assert 5 < checks["noise"].value < 40


def test_real_crop_passes():
    assert failed(read_ct(TOTALSEG_A)) == []


def test_subset_passes(lidc_subset):
    assert failed(read_ct(lidc_subset)) == []


def test_non_ct_modality(lidc_subset):
    for f in lidc_subset.glob("*.dcm"):
        edit_dicom(f, Modality="MR")
    checks = verdicts(read_ct(lidc_subset))
    assert not checks["modality"].passed and "MR" in checks["modality"].reason


def test_missing_slice(lidc_subset):
    sorted_by_position(lidc_subset)[6].unlink()
    checks = verdicts(read_ct(lidc_subset))
    assert failed(read_ct(lidc_subset)) == ["missing_slices"]
    assert checks["missing_slices"].value == 1 and "5.00 mm" in checks["missing_slices"].reason


def test_duplicated_slice(lidc_subset):
    src = sorted_by_position(lidc_subset)[4]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(lidc_subset / "copy_of_slice.dcm")
    vol = read_ct(lidc_subset)
    assert vol.shape[2] == 12  # the duplicate is not stacked
    assert failed(vol) == ["duplicate_slices"]


def test_inconsistent_spacing(lidc_subset):
    files = sorted_by_position(lidc_subset)
    for f in files[8:]:  # the upper slices drift 0.6 mm: a step of 3.1 mm once
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 0.6]
        ds.save_as(f)
    assert failed(read_ct(lidc_subset)) == ["slice_spacing"]


def test_gantry_tilt_from_header_and_geometry(lidc_subset):
    for f in lidc_subset.glob("*.dcm"):
        edit_dicom(f, GantryDetectorTilt=15.0)
    checks = verdicts(read_ct(lidc_subset))
    assert not checks["gantry_tilt"].passed and checks["gantry_tilt"].value == pytest.approx(15.0)
    # Geometric tilt: slices shifted along y as they go up, with the tag left at 0.
    for n, f in enumerate(sorted_by_position(lidc_subset)):
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + n * 2.5 * np.tan(np.radians(10)), z]
        ds.GantryDetectorTilt = 0.0
        ds.save_as(f)
    checks = verdicts(read_ct(lidc_subset))
    assert not checks["gantry_tilt"].passed and checks["gantry_tilt"].value == pytest.approx(10.0, abs=0.1)


def test_implausible_hu_missing_intercept(lidc_subset):
    for f in lidc_subset.glob("*.dcm"):
        edit_dicom(f, RescaleIntercept=0)
    checks = verdicts(read_ct(lidc_subset))
    assert not checks["hu_range"].passed and "intercept missing" in checks["hu_range"].reason


def test_insufficient_lung_coverage():
    # A water cylinder in air: CT-like values, no lungs.
    i, j = np.mgrid[:128, :128]
    body = ((i - 64) ** 2 + (j - 64) ** 2) < 50**2
    hu = np.where(body[..., None], 20.0, -1000.0) * np.ones((1, 1, 40)) + np.random.default_rng(0).normal(
        0, 10, (128, 128, 40)
    )
    hu[60:68, 60:68, :] = 900  # a bone rod
    vol = CTVolume(hu.astype(np.float32), np.diag([-2.0, -2.0, 2.5, 1.0]), {"source": "cylinder", "modality": "CT"})
    checks = verdicts(vol)
    assert failed(vol) == ["lung_coverage"] and "insufficient lung coverage" in checks["lung_coverage"].reason


def test_excessive_noise():
    vol = read_ct(TOTALSEG_A)
    noisy = CTVolume(
        vol.hu + np.random.default_rng(1).normal(0, 120, vol.shape).astype(np.float32), vol.affine, dict(vol.meta)
    )
    checks = verdicts(noisy)
    assert not checks["noise"].passed and checks["noise"].value > 60
    assert verdicts(vol)["noise"].passed


def test_thresholds_are_configurable():
    vol = read_ct(TOTALSEG_A)
    checks = {c.name: c for c in qc_volume(vol, QCThresholds(max_noise_hu=5.0))}
    assert not checks["noise"].passed


def test_run_qc_over_folder_keeps_going_and_reports(lidc_subset, tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    shutil.copytree(lidc_subset, root / "good_series")
    bad_series = root / "truncated_series"
    shutil.copytree(lidc_subset, bad_series)
    victim = sorted_by_position(bad_series)[3]
    victim.write_bytes(victim.read_bytes()[:2000])
    (root / "good_series" / "garbage.dcm").write_bytes(b"not dicom at all" * 20)
    shutil.copy(TOTALSEG_A, root / "crop.nii.gz")
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (root / "README.txt").write_text("not a scan")
    mr = root / "mr_series"
    shutil.copytree(lidc_subset, mr)
    for f in mr.glob("*.dcm"):
        edit_dicom(f, Modality="MR")

    out = tmp_path / "qc"
    records = run_qc(root, out, progress=False)
    by_id = {r.case_id: r for r in records}
    assert set(by_id) == {"good_series", "good_series__garbage", "truncated_series", "crop", "broken", "mr_series"}
    assert {r.case_id for r in records if r.passed} == {"good_series", "crop"}
    assert victim.name in " ".join(by_id["truncated_series"].reasons)
    assert "broken.nii.gz" in " ".join(by_id["broken"].reasons)
    assert any("modality MR" in r for r in by_id["mr_series"].reasons)

    report = json.loads((out / "qc_report.json").read_text())
    assert report["n_cases"] == 6 and report["n_passed"] == 2 and report["n_failed"] == 4
    assert {e["case_id"] for e in report["excluded"]} == {
        "good_series__garbage",
        "truncated_series",
        "broken",
        "mr_series",
    }
    assert all(e["reasons"] for e in report["excluded"])
    rows = (out / "qc_report.csv").read_text().splitlines()
    assert rows[0].startswith("case_id,path,format,passed") and len(rows) == 7
    assert not list(out.glob(".*tmp*")), "no temporary files are left behind"


def test_qc_cli(tmp_path):
    import subprocess
    import sys

    shutil.copy(TOTALSEG_A, tmp_path / "a.nii.gz")
    res = subprocess.run(
        [sys.executable, "-m", "common.qc", str(tmp_path), "--out", str(tmp_path / "qc")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "1 passed, 0 excluded" in res.stdout
    assert (tmp_path / "qc" / "qc_report.csv").exists()


def test_lung_mask_qc_never_passes_an_empty_or_implausible_mask():
    from common.qc import lung_mask_qc

    good = {"lung_volume_ml": {"total": 4200.0, "right": 2300.0, "left": 1900.0}, "mean_lung_hu": -810.0}
    assert lung_mask_qc(good) == {"passed": True, "reasons": []}
    empty = lung_mask_qc({"lung_volume_ml": {"total": 0.0}, "mean_lung_hu": None})
    assert not empty["passed"] and "no plausible lung" in empty["reasons"][0]
    one_side = lung_mask_qc(
        {"lung_volume_ml": {"total": 2000.0, "right": 1950.0, "left": 50.0}, "mean_lung_hu": -800.0}
    )
    assert not one_side["passed"] and "a lung is missing" in one_side["reasons"][0]
    tissue = lung_mask_qc(
        {"lung_volume_ml": {"total": 5200.0, "right": 2600.0, "left": 2600.0}, "mean_lung_hu": -150.0}
    )
    assert not tissue["passed"] and "soft tissue" in tissue["reasons"][0]
