"""Readers for every CT format the project accepts, all returning a CTVolume in HU with a RAS affine.

``read_ct(path)`` picks the reader from the path; ``CTReader`` plugs the same readers into MONAI's
``LoadImage``/``LoadImaged`` (``reader="common.io.CTReader"`` in a bundle config).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from common.io.dicom import is_dicom_candidate, read_dicom_series
from common.io.volume import CTReadError, CTVolume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
NPZ_SUFFIXES = (".npz",)
PNG_SUFFIXES = (".png",)
DEEPLESION_HU_OFFSET = 32768  # DeepLesion stores HU + 32768 as uint16
RADCHEST_SPACING_MM = (0.8, 0.8, 0.8)  # RAD-ChestCT volumes were resampled to 0.8 mm isotropic


def has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def format_of(path: str | Path) -> str:
    """The format ``read_ct`` would use for ``path``: dicom, nifti, itk, radchestct, deeplesion_png."""
    path = Path(path)
    if path.is_dir():
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        if any(has_suffix(p, PNG_SUFFIXES) for p in entries):
            return "deeplesion_png"
        if any(is_dicom_candidate(p) for p in entries):
            return "dicom"
        raise CTReadError(path, "folder contains no images (no DICOM files and no PNG slices)")
    if not path.exists():
        raise CTReadError(path, "file does not exist")
    if has_suffix(path, NIFTI_SUFFIXES):
        return "nifti"
    if has_suffix(path, ITK_SUFFIXES):
        return "itk"
    if has_suffix(path, NPZ_SUFFIXES):
        return "radchestct"
    if is_dicom_candidate(path):
        return "dicom"
    raise CTReadError(
        path,
        f"unsupported file type '{''.join(path.suffixes) or path.name}' (expected a DICOM folder, .nii/.nii.gz, .nrrd/.mha/.mhd, .npz or a folder of 16-bit PNG slices)",
    )


def read_ct(path: str | Path, axcodes: str | None = None, **kwargs) -> CTVolume:
    """Read a CT scan in any supported format. Keyword arguments go to the format's reader.

    ``axcodes`` (e.g. "RAS") returns the volume in that voxel orientation; DICOM series are
    filled in it directly, other formats are reoriented after reading.
    """
    readers = {
        "dicom": read_dicom_series,
        "nifti": read_nifti,
        "itk": read_itk,
        "radchestct": read_radchestct_npz,
        "deeplesion_png": read_deeplesion_png,
    }
    fmt = format_of(path)
    if fmt == "dicom":
        return read_dicom_series(path, axcodes=axcodes, **kwargs)
    vol = readers[fmt](path, **kwargs)
    return vol.reorient(axcodes) if axcodes else vol


# --------------------------------------------------------------------------- NIfTI, NRRD/MHA


def read_nifti(path: str | Path) -> CTVolume:
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise CTReadError(path, f"not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CTReadError(path, f"expected a 3D volume, got shape {data.shape}")
    hu = data.astype(np.float32, copy=False)
    header = img.header
    return CTVolume(
        hu,
        _nifti_affine(img, path),
        {
            "source": str(path),
            "format": "nifti",
            "modality": None,
            "qform_code": int(header["qform_code"]),
            "sform_code": int(header["sform_code"]),
        },
    )


def _nifti_affine(img, path: Path) -> np.ndarray:
    from common.io.volume import check_affine

    affine = img.affine
    if affine is None:
        raise CTReadError(path, "broken affine: the header defines no voxel-to-world transform")
    return check_affine(affine, path)


def read_itk(path: str | Path) -> CTVolume:
    """NRRD / MetaImage through SimpleITK (LPS world coordinates, converted to RAS)."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except Exception as e:
        raise CTReadError(
            path,
            f"not a readable image file ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''})",
        ) from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise CTReadError(
            path,
            f"expected a 3D single-channel volume, got {img.GetDimension()}D with {img.GetNumberOfComponentsPerPixel()} components",
        )
    hu = sitk.GetArrayViewFromImage(img).transpose(2, 1, 0).astype(np.float32)  # [k, j, i] -> [i, j, k]
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return CTVolume(hu, affine, {"source": str(path), "format": "itk", "modality": None})


# --------------------------------------------------------------------------- DeepLesion PNG stacks


def _slice_number(path: Path) -> int:
    m = re.search(r"(\d+)$", path.stem)
    if not m:
        raise CTReadError(path, "DeepLesion slice file name must end in its slice number (e.g. 103.png)")
    return int(m.group(1))


def read_deeplesion_spacing(dl_info_csv: str | Path, series: str) -> tuple[float, float, float] | None:
    """Spacing of one series (``patient_study_series``) from DeepLesion's DL_info.csv, if listed."""
    with open(dl_info_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("File_name", "").startswith(series + "_"):
                values = [float(v) for v in row["Spacing_mm_px_"].split(",")]
                return (values[0], values[1], values[2])
    return None


def read_deeplesion_png(
    folder: str | Path,
    spacing: tuple[float, float, float] | None = None,
    dl_info_csv: str | Path | None = None,
) -> CTVolume:
    """A DeepLesion key-slice stack: one 16-bit PNG per slice, HU = pixel - 32768.

    DeepLesion ships spacing in DL_info.csv, not in the PNGs: give ``dl_info_csv`` or ``spacing``;
    without either, 1 x 1 x 5 mm is assumed and ``meta['spacing_assumed']`` says so. Slices are
    axial as displayed (image right = patient left, rows run anterior to posterior); slice numbers
    are taken to increase towards the feet.
    """
    from PIL import Image

    folder = Path(folder)
    files = sorted((p for p in folder.iterdir() if has_suffix(p, PNG_SUFFIXES)), key=_slice_number)
    if not files:
        raise CTReadError(folder, "no PNG slices found")
    numbers = [_slice_number(p) for p in files]
    slices, shape = [], None
    for p in files:
        try:
            with Image.open(p) as im:
                mode = im.mode
                arr = np.asarray(im)
        except Exception as e:
            raise CTReadError(p, f"not a readable PNG ({type(e).__name__}: {e})") from None
        if mode not in ("I;16", "I;16B", "I;16L", "I") or arr.dtype.itemsize < 2:
            raise CTReadError(
                p, f"not a 16-bit grayscale PNG (mode {mode}); DeepLesion slices store HU + 32768 in 16 bits"
            )
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise CTReadError(p, f"slice size {arr.shape} differs from the stack's {shape}")
        slices.append(arr)
    hu = np.empty((shape[1], shape[0], len(files)), dtype=np.float32)
    for k, arr in enumerate(slices):
        hu[:, :, k] = arr.T.astype(np.float32) - DEEPLESION_HU_OFFSET
    assumed = False
    if spacing is None and dl_info_csv is not None:
        spacing = read_deeplesion_spacing(dl_info_csv, folder.name)
    if spacing is None:
        spacing, assumed = (1.0, 1.0, 5.0), True
    sx, sy, sz = spacing
    affine = np.diag([sx, -sy, -sz, 1.0])
    affine[2, 3] = -sz * numbers[0]
    return CTVolume(
        hu,
        affine,
        {
            "source": str(folder),
            "format": "deeplesion_png",
            "modality": "CT",
            "slice_numbers": numbers,
            "slice_positions_mm": [-sz * n for n in numbers][::-1],
            "slice_gaps_mm": [float(sz * (b - a)) for a, b in zip(numbers, numbers[1:])],
            "spacing_assumed": assumed,
        },
    )


# --------------------------------------------------------------------------- RAD-ChestCT


def read_radchestct_labels(labels_csv: str | Path, volume_id: str) -> list[str]:
    """Positive ``abnormality*location`` labels of one volume from a RAD-ChestCT label CSV."""
    labels_csv = Path(labels_csv)
    with open(labels_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "NoteAcc_DEID" not in reader.fieldnames:
            raise CTReadError(labels_csv, "not a RAD-ChestCT label CSV (no NoteAcc_DEID column)")
        for row in reader:
            if row["NoteAcc_DEID"] == volume_id:
                return [k for k, v in row.items() if k != "NoteAcc_DEID" and v not in ("", "0", "0.0")]
    raise CTReadError(labels_csv, f"volume {volume_id} is not listed")


def read_radchestct_npz(
    path: str | Path,
    labels_csv: str | Path | None = None,
    spacing: tuple[float, float, float] = RADCHEST_SPACING_MM,
) -> CTVolume:
    """A RAD-ChestCT volume: ``np.load(path)['ct']``, int16 HU ordered [slice, row, column].

    With ``labels_csv`` (an ``img*_Abnormality_and_Location_Labels.csv``) the volume's positive
    labels are returned in ``meta['labels']``.
    """
    path = Path(path)
    try:
        with np.load(path) as npz:
            if "ct" not in npz.files:
                raise CTReadError(path, f"no 'ct' array in the npz (arrays: {npz.files})")
            ct = npz["ct"]
    except CTReadError:
        raise
    except Exception as e:
        raise CTReadError(path, f"not a readable npz file ({type(e).__name__}: {e})") from None
    if ct.ndim != 3:
        raise CTReadError(path, f"'ct' must be 3D [slices, rows, columns], got shape {ct.shape}")
    hu = np.ascontiguousarray(ct.transpose(2, 1, 0), dtype=np.float32)
    sx, sy, sz = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    meta = {"source": str(path), "format": "radchestct", "modality": "CT", "volume_id": path.stem}
    if labels_csv is not None:
        meta["labels"] = read_radchestct_labels(labels_csv, path.stem)
    return CTVolume(hu, affine, meta)
