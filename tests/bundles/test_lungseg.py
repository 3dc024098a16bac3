"""``lungseg``, the CLI a hospital team runs: series choice in a PACS export, right/left labels, DICOM-SEG and
RTSTRUCT that read back to the NIfTI labels, statistics, resuming batches, and one clear line for bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from common.apps.lungseg import EXIT_INPUT, EXIT_OK, EXIT_OUTPUT, EXIT_QC, main
from common.io import CTReadError, choose_ct_series, read_ct, read_rtstruct, scan_dicom_folder
from common.io.dicom_out import (
    STRUCTURES,
    _axis_aligned_frame,
    _nearest_voxel_frame,
    labels_on_series_grid,
    pixel_to_ras,
    read_series_headers,
    write_dicom_seg,
    write_rtstruct,
)
from tests.conftest import edit_dicom, sorted_by_position

LUNGS = [STRUCTURES["right lung"], STRUCTURES["left lung"]]
REPO = Path(__file__).resolve().parents[2]


def _copy_series(files, dst: Path, prefix: str, **tags) -> str:
    """Copy DICOM files into ``dst`` as one new series (new UIDs), with ``tags`` set on every file."""
    uid = generate_uid()
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(dst / f"{prefix}_{Path(f).name}")
    return uid


def _dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


# --------------------------------------------------------------------------- series choice


def test_the_axial_ct_series_with_most_slices_is_chosen_and_the_others_say_why(lidc_subset, tmp_path):
    files = sorted(lidc_subset.glob("*.dcm"))
    thin = _copy_series(files[:11], tmp_path / "x", "thin")
    localiser = _copy_series(files[:2], tmp_path / "x", "loc", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    mr = _copy_series(files, tmp_path / "x", "mr", Modality="MR")
    sagittal = _copy_series(files, tmp_path / "x", "sag", ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    for f in (tmp_path / "x").iterdir():
        shutil.move(str(f), lidc_subset / f.name)
    series = scan_dicom_folder(lidc_subset).series
    chosen, skipped = choose_ct_series(series)
    assert len(chosen) == 12 and chosen.uid not in (thin, localiser, mr, sagittal)
    assert "fewer slices (11)" in skipped[thin] and "localiser" in skipped[localiser]
    assert "modality MR" in skipped[mr] and "not axial" in skipped[sagittal]
    assert choose_ct_series(series, thin)[0].uid == thin  # the user's choice wins when it is a CT scan
    with pytest.raises(CTReadError, match="is modality MR, not CT"):
        choose_ct_series(series, mr)
    with pytest.raises(CTReadError, match="series 1.2.3 not found; present: .*12 files"):
        choose_ct_series(series, "1.2.3")


# --------------------------------------------------------------------------- DICOM out


def test_labels_land_on_each_dicom_pixel_they_came_from(lidc_subset):
    """Mapping a volume onto the series' own pixels gives back each file's stored HU exactly, whatever the order."""
    vol = read_ct(lidc_subset)
    datasets = read_series_headers(list(lidc_subset.glob("*.dcm"))[::-1])
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == sorted(z)  # slice order along the normal, as rt-utils orders them
    frames = labels_on_series_grid(vol.hu, vol.affine, datasets)
    for ds, frame in zip(datasets, frames):
        full = pydicom.dcmread(Path(ds.filename))
        stored = full.pixel_array * float(full.RescaleSlope) + float(full.RescaleIntercept)
        assert np.array_equal(frame, stored.astype(np.float32))


def test_axis_aligned_frames_equal_the_nearest_voxel_lookup():
    """Pixels on the label grid (any axis order and direction) are sliced out; anything else is looked up."""
    labels = np.random.default_rng(0).integers(0, 5, size=(7, 9, 5)).astype(np.uint8)
    cases = {
        "columns along -x, rows along z": np.array([[-1, 0, 0, 6], [0, 0, 1, 4], [0, 1, 0, 0], [0, 0, 0, 1.0]]),
        "columns along y, rows along x": np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 3], [0, 0, 0, 1.0]]),
    }
    for name, m in cases.items():
        rows, cols = (5, 7) if "rows along z" in name else (7, 9)
        fast = _axis_aligned_frame(labels, m, rows, cols)
        assert fast is not None and np.array_equal(fast, _nearest_voxel_frame(labels, m, rows, cols)), name
    half_voxel = np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 0, 2], [0, 0, 0, 1.0]])
    oblique = np.array([[0.9, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 2], [0, 0, 0, 1.0]])
    beyond = np.array([[1, 0, 0, 3], [0, 1, 0, 0], [0, 0, 0, 2], [0, 0, 0, 1.0]])  # columns run past the grid
    for m in (half_voxel, oblique, beyond):
        assert _axis_aligned_frame(labels, m, 7, 9) is None
    assert _nearest_voxel_frame(labels, beyond, 7, 9)[:, -3:].max() == 0


@pytest.mark.real
def test_dicom_seg_and_rtstruct_of_a_real_series_read_back_to_the_labels(tmp_path, lidc_files_by_position):
    """On the whole LIDC series: the DICOM-SEG reads back voxel for voxel (highdicom), the RTSTRUCT's contours
    rasterise to the same lungs (our own RTSTRUCT reader, not rt-utils'), and both reference the series."""
    import highdicom as hd

    folder = lidc_files_by_position[0].parent
    vol = read_ct(folder)
    labels = np.zeros(vol.shape, np.uint8)
    air = vol.hu < -400
    x = np.arange(vol.shape[0])[:, None, None]
    labels[air & (x < vol.shape[0] // 2)] = 1  # two halves, one label each (which is right does not matter here)
    labels[air & (x >= vol.shape[0] // 2)] = 2
    labels[:40], labels[-40:], labels[:, :60], labels[:, -60:] = 0, 0, 0, 0  # air outside the body gone
    datasets = read_series_headers(lidc_files_by_position)
    frames = labels_on_series_grid(labels, vol.affine, datasets)
    to_voxel = np.linalg.inv(vol.affine)
    for n in (0, 70, len(datasets) - 1):  # the slice of the array is the per-pixel lookup's answer
        assert _axis_aligned_frame(labels, to_voxel @ pixel_to_ras(datasets[n]), 512, 512) is not None
        assert np.array_equal(frames[n], _nearest_voxel_frame(labels, to_voxel @ pixel_to_ras(datasets[n]), 512, 512))
    seg_path = write_dicom_seg(tmp_path / "seg.dcm", frames, datasets, LUNGS, "test")
    rt_path = write_rtstruct(tmp_path / "rtstruct.dcm", frames, datasets, LUNGS)
    seg = hd.seg.segread(seg_path)
    assert [s.segment_label for s in seg.SegmentSequence] == ["Right lung", "Left lung"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    back = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in datasets], combine_segments=True, relabel=True
    )
    assert np.array_equal(back, frames)
    rois = read_rtstruct(rt_path, vol)
    assert (
        pydicom.dcmread(rt_path).StructureSetROISequence[0].ReferencedFrameOfReferenceUID
        == vol.meta["frame_of_reference_uid"]
    )
    for name, value in (("Right lung", 1), ("Left lung", 2)):
        assert _dice(rois[name], labels == value) > 0.99, name
    with pytest.raises(ValueError, match="no structure in the label map"):
        write_dicom_seg(tmp_path / "empty.dcm", np.zeros_like(frames), datasets, LUNGS, "test")
    assert not (tmp_path / "empty.dcm").exists()


# --------------------------------------------------------------------------- the CLI on real CT, shipped models


@pytest.mark.real
@pytest.mark.timeout(600)
def test_lungseg_on_a_pacs_export_writes_right_left_labels_dicom_seg_rtstruct_and_statistics(
    lidc_subset, tmp_path, capsys, caplog
):
    """The shipped models on 12 real LIDC slices in a folder that also holds a localiser, as PACS exports them."""
    import highdicom as hd

    files = sorted(lidc_subset.glob("*.dcm"))
    localiser = _copy_series(files[:2], lidc_subset, "loc", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    out = tmp_path / "out"
    caplog.set_level("INFO")
    rc = main(["-i", str(lidc_subset), "-o", str(out)])
    printed = capsys.readouterr()
    stats = json.loads((out / "statistics.json").read_text())
    assert rc == (EXIT_OK if stats["qc"]["passed"] else EXIT_QC), printed.err
    assert f"skipped series {localiser}" in caplog.text and "localiser" in caplog.text
    assert {p.name for p in out.iterdir()} == {
        "labels.nii.gz",
        "lung_mask.nii.gz",
        "report.json",
        "statistics.json",
        "seg.dcm",
        "rtstruct.dcm",
        "overlay.png",
    }
    assert list(stats["models"]) == ["hsam_finetune"]  # SA-2 runs only with --probmap
    vol = read_ct(lidc_subset, series_uid=stats["input"]["series_instance_uid"])
    img = nib.load(str(out / "labels.nii.gz"))
    labels = np.asarray(img.dataobj)
    assert labels.shape == vol.shape and np.allclose(img.affine, vol.affine) and set(np.unique(labels)) == {0, 1, 2}
    ras_x = (nib.affines.apply_affine(img.affine, np.argwhere(labels > 0)))[:, 0]
    assert (
        ras_x[labels[labels > 0] == 1].mean() > ras_x[labels[labels > 0] == 2].mean() + 50
    )  # the right lung lies to the patient's right (RAS +x)
    assert np.array_equal(np.asarray(nib.load(str(out / "lung_mask.nii.gz")).dataobj) > 0, labels > 0)

    # statistics: the input's UIDs, the localiser listed, volumes and HU that the label map gives
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert (
        stats["input"]["study_instance_uid"] == src.StudyInstanceUID
        and stats["input"]["series_instance_uid"] == src.SeriesInstanceUID
    )
    assert "localiser" in stats["input"]["skipped_series"][localiser]
    right = stats["structures"]["right lung"]
    assert right["label"] == 1 and right["voxels"] == int((labels == 1).sum())
    assert right["volume_ml"] == pytest.approx((labels == 1).sum() * vol.voxel_volume_ml, abs=0.1)
    assert right["mean_hu"] == pytest.approx(float(vol.hu[labels == 1].mean()), abs=0.1) and right["mean_hu"] < -600
    assert 0 <= right["percent_below_950_hu"] <= 100
    assert stats["models"]["hsam_finetune"]["bundle_version"] and len(stats["models"]["hsam_finetune"]["sha256"]) == 12

    # DICOM-SEG and RTSTRUCT read back to labels.nii.gz
    datasets = read_series_headers(files)
    seg = hd.seg.segread(out / "seg.dcm")
    back = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in datasets], combine_segments=True, relabel=True
    )
    assert np.array_equal(back, labels_on_series_grid(labels, img.affine, datasets))
    rois = read_rtstruct(out / "rtstruct.dcm", vol)
    assert _dice(rois["Right lung"], labels == 1) > 0.97 and _dice(rois["Left lung"], labels == 2) > 0.97

    # a second run into the same folder: nothing redone, nothing touched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["-i", str(lidc_subset), "-o", str(out)]) == EXIT_OK
    assert "already done" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


# --------------------------------------------------------------------------- bad input: one line, an exit code


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lungseg: "), err  # one line, no traceback
    return err[0]


def test_bad_input_gets_one_line_naming_the_file_and_an_exit_code(tmp_path, lidc_subset, capsys):
    assert main(["-i", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")]) == EXIT_INPUT
    assert "nowhere: no such file or folder" in _err(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == EXIT_INPUT
    assert "empty: no CT found" in _err(capsys)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.dcm").write_text("not a DICOM file")
    assert main(["-i", str(tmp_path / "text"), "-o", str(tmp_path / "o")]) == EXIT_INPUT
    assert "notes.dcm: not a readable DICOM file" in _err(capsys)
    (tmp_path / "scan.txt").write_text("hello")
    assert main(["-i", str(tmp_path / "scan.txt"), "-o", str(tmp_path / "o")]) == EXIT_INPUT
    assert "scan.txt: not a CT file" in _err(capsys)
    one = tmp_path / "one"
    _copy_series(sorted(lidc_subset.glob("*.dcm"))[:1], one, "single")
    assert main(["-i", str(one), "-o", str(tmp_path / "o")]) == EXIT_INPUT
    assert "1 slice(s), fewer than 10" in _err(capsys)
    mr = tmp_path / "mr"
    _copy_series(sorted(lidc_subset.glob("*.dcm")), mr, "mr", Modality="MR")
    assert main(["-i", str(mr), "-o", str(tmp_path / "o")]) == EXIT_INPUT
    assert "no axial CT series to segment" in (line := _err(capsys)) and "modality MR, not CT" in line
    assert main(["-i", str(lidc_subset), "-o", str(tmp_path / "o"), "--classes", "liver"]) == EXIT_INPUT
    assert "--classes liver: unknown ['liver']" in _err(capsys)
    assert main(["-i", str(lidc_subset), "-o", str(tmp_path / "o"), "--slice-search-step", "0"]) == EXIT_INPUT
    assert "--slice-search-step 0: must be 1 (every slice) or more" in _err(capsys)
    assert main(["-i", str(lidc_subset), "-o", str(tmp_path / "o"), "--series", "1.2.3"]) == EXIT_INPUT
    assert "series 1.2.3 not found; present:" in _err(capsys)
    assert (
        main(["-i", str(lidc_subset), "-o", str(tmp_path / "o"), "--hsam-ckpt", str(tmp_path / "none.pt")])
        == EXIT_INPUT
    )
    assert "none.pt: no H-SAM (hsam_finetune) checkpoint" in _err(capsys)
    gap = tmp_path / "gap"
    _copy_series(sorted(lidc_subset.glob("*.dcm")), gap, "gap")
    sorted_by_position(gap)[5].unlink()  # a slice lost in transfer
    assert main(["-i", str(gap), "-o", str(tmp_path / "o")]) == EXIT_INPUT
    assert "gap: not segmented: missing_slices: 1 missing slice(s)" in _err(capsys)
    mixed = tmp_path / "mixed"
    _copy_series(sorted(lidc_subset.glob("*.dcm")), mixed, "mixed")
    edit_dicom(sorted_by_position(mixed)[3], PixelSpacing=[0.5, 0.5])
    assert main(["-i", str(mixed), "-o", str(tmp_path / "o")]) == EXIT_INPUT
    assert "pixel_spacing: in-plane pixel spacing differs between slices" in _err(capsys)
    (tmp_path / "file").write_text("")
    assert main(["-i", str(lidc_subset), "-o", str(tmp_path / "file" / "out")]) == EXIT_OUTPUT
    assert "the output folder cannot be written" in _err(capsys)
    assert not any((tmp_path / "o").rglob("*.nii.gz"))  # nothing written for input that was refused


# --------------------------------------------------------------------------- a batch that resumes


@pytest.fixture
def tiny_models(tiny_clip, tiny_hsam):
    return ["--clip-ckpt", str(tiny_clip[1]), "--hsam-ckpt", str(tiny_hsam)]


def test_a_batch_segments_every_case_reports_the_broken_one_and_resumes(
    tmp_path, tiny_phantom_manifest, tiny_models, capsys
):
    phantoms = [c for c in json.loads(Path(tiny_phantom_manifest).read_text())["cases"] if c["kind"] == "phantom"][:2]
    cases = tmp_path / "cases"
    cases.mkdir()
    for c in phantoms:
        shutil.copy(c["path"], cases / Path(c["path"]).name)
    data = Path(phantoms[0]["path"]).read_bytes()
    (cases / "broken.nii.gz").write_bytes(data[: len(data) // 3])  # a truncated copy
    out = tmp_path / "out"
    rc = main(["-i", str(cases), "-o", str(out), "--probmap", "--classes", "heart,bone", *tiny_models])
    printed = capsys.readouterr()
    assert rc == EXIT_INPUT  # the worst case's code
    said = [line for line in printed.err.splitlines() if line.startswith("lungseg: ")]
    assert any("broken.nii.gz: not a readable NIfTI file" in line for line in said)
    # MONAI's StatsHandler keeps the stream of the first test that made its logger; its complaint is not the tool's
    err = re.sub(r"--- Logging error ---.*?\nArguments: \(.*?\)\n", "", printed.err, flags=re.S)
    assert "Traceback" not in err  # one line, no traceback
    done = sorted(p.parent.name for p in out.glob("*/statistics.json"))
    assert done == sorted(Path(c["path"]).name.removesuffix(".nii.gz") for c in phantoms)
    assert re.search(r"2 of 3 case\(s\) done( \(\d failed QC: [^)]*\))?; not done: broken", printed.out)
    for name in done:
        src = nib.load(str(cases / f"{name}.nii.gz"))
        labels = nib.load(str(out / name / "labels.nii.gz"))
        assert labels.shape == src.shape and np.allclose(labels.affine, src.affine)
        assert (
            set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2, 3, 6} and not (out / name / "seg.dcm").exists()
        )  # no DICOM from NIfTI
        assert nib.load(str(out / name / "probmap.nii.gz")).shape == (*src.shape, 5)  # --probmap: SA-2's five classes
        stats = json.loads((out / name / "statistics.json").read_text())
        assert set(stats["models"]) == {"foundation_clip", "hsam_finetune"}
        assert stats["labels"] == {
            "1": "right lung",
            "2": "left lung",
            "3": "heart",
            "6": "bone",
        }  # channel_def order, after the lungs
        assert stats["structures"]["heart"]["voxels"] == int((np.asarray(labels.dataobj) == 3).sum())
        assert not (out / name / ".work").exists()
    # the re-run after the broken file is mended does only that one
    stamps = {n: (out / n / "statistics.json").stat().st_mtime_ns for n in done}
    shutil.copy(phantoms[0]["path"], cases / "broken.nii.gz")
    rc = main(["-i", str(cases), "-o", str(out), *tiny_models])
    printed = capsys.readouterr()
    assert printed.out.count("already done") == 2 and (out / "broken" / "statistics.json").is_file()
    assert {n: (out / n / "statistics.json").stat().st_mtime_ns for n in done} == stamps
    assert rc in (EXIT_OK, EXIT_QC)  # a random H-SAM's mask may fail QC: the code says so


# --------------------------------------------------------------------------- pip install .


@pytest.mark.real
@pytest.mark.timeout(900)
def test_pip_install_gives_a_working_lungseg_outside_the_checkout(tmp_path, lidc_subset):
    """``pip install .`` (a wheel, not editable) into a fresh venv: its ``lungseg`` finds the bundles and the
    shipped models as package data and segments real CT from a folder that knows nothing of this checkout.
    The venv borrows the test environment's dependencies (a .pth line), so that only this package is installed."""
    source = tmp_path / "source"  # the tracked files a clone has: a build must not litter this checkout
    for part in ("common", "bundles"):
        shutil.copytree(REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__", "eval*"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile", "--quiet", str(source)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    where = subprocess.run(
        [str(py), "-c", "import common.segment as s; print(s.__file__); print(s.BUNDLES)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(str(site) in w for w in where)  # the installed copy, with its own bundles
    assert (Path(where[1]) / "hsam_finetune" / "models" / "model.pt").is_file()
    run = subprocess.run(
        [str(venv / "bin" / "lungseg"), "-i", str(lidc_subset), "-o", "out", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    stats = json.loads((tmp_path / "out" / "statistics.json").read_text())
    assert run.returncode == (EXIT_OK if stats["qc"]["passed"] else EXIT_QC), run.stderr[-3000:]
    assert str(site) in stats["models"]["hsam_finetune"]["checkpoint"]
    assert stats["structures"]["right lung"]["voxels"] > 0 and stats["structures"]["left lung"]["voxels"] > 0
    assert {"labels.nii.gz", "seg.dcm", "rtstruct.dcm"} <= {p.name for p in (tmp_path / "out").iterdir()}
