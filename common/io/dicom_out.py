"""Results back to DICOM: a label map resampled onto a CT series' own slices, written as a DICOM-SEG
(highdicom) and as an RTSTRUCT (rt-utils), both referencing the source series so that PACS, 3D Slicer and
planning systems place them on the scan.

The label map comes on the project's voxel grid (RAS affine); the DICOM objects need it frame by frame on
the series' pixel grid. :func:`labels_on_series_grid` maps each DICOM pixel centre through the two affines
(nearest voxel), so any orientation or slice order of the series is handled the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.io.atomic import atomic_path
from common.io.dicom import LPS_TO_RAS
from common.io.volume import CTReadError


@dataclass(frozen=True)
class Structure:
    """One label of the map as DICOM names it: SNOMED CT code of what it is, and a display colour."""

    label: int
    name: str
    snomed: str
    snomed_meaning: str
    color: tuple[int, int, int]


# SNOMED CT codes as TotalSegmentator's and dcmqi's templates use them (Right lung 3341006, Left lung 44029006, ...)
STRUCTURES: dict[str, Structure] = {
    "right lung": Structure(1, "Right lung", "3341006", "Right lung", (128, 174, 128)),
    "left lung": Structure(2, "Left lung", "44029006", "Left lung", (241, 214, 145)),
    "heart": Structure(3, "Heart", "80891009", "Heart", (206, 110, 84)),
    "blood vessel": Structure(4, "Blood vessel", "59820001", "Blood vessel", (216, 101, 79)),
    "airway": Structure(5, "Airway", "89187006", "Airway structure", (183, 156, 220)),
    "bone": Structure(6, "Bone", "272673000", "Bone", (241, 241, 241)),
}


def read_series_headers(files: Sequence[str | Path]) -> list:
    """The series' datasets (headers only), in slice order along the slice normal, as rt-utils orders them."""
    import pydicom
    from rt_utils.image_helper import get_slice_position

    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception as e:  # pydicom raises several types for corrupt files
            raise CTReadError(f, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    return sorted(datasets, key=get_slice_position)


def pixel_to_ras(ds) -> np.ndarray:
    """4x4 map from (column, row, 0, 1) of one DICOM image to RAS millimetres (DICOM PS3.3 C.7.6.2.1.1)."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    m = np.eye(4)
    m[:3, 0] = iop[:3] * col_spacing  # along a row: the column index grows
    m[:3, 1] = iop[3:] * row_spacing
    m[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    return LPS_TO_RAS @ m


def labels_on_series_grid(labels: np.ndarray, affine: np.ndarray, datasets: Sequence) -> np.ndarray:
    """``labels`` (X, Y, Z on ``affine``) as ``(frames, rows, columns)`` on ``datasets``' pixels, nearest voxel."""
    labels = np.asarray(labels)
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    out = np.zeros((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=labels.dtype)
    for n, ds in enumerate(datasets):
        rows, cols = int(ds.Rows), int(ds.Columns)
        m = to_voxel @ pixel_to_ras(ds)
        frame = _axis_aligned_frame(labels, m, rows, cols)
        out[n] = _nearest_voxel_frame(labels, m, rows, cols) if frame is None else frame
    return out


def _nearest_voxel_frame(labels: np.ndarray, m: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The (rows, cols) image whose pixel (column c, row r) takes the label of the voxel nearest ``m @ (c, r, 0, 1)``."""
    r, c = np.mgrid[0:rows, 0:cols]
    ijk = np.rint(m[:3, 0, None] * c.ravel() + m[:3, 1, None] * r.ravel() + m[:3, 3, None]).astype(np.int64)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(labels.shape)[:, None]), axis=0)
    frame = np.zeros(rows * cols, dtype=labels.dtype)
    frame[inside] = labels[ijk[0, inside], ijk[1, inside], ijk[2, inside]]
    return frame.reshape(rows, cols)


def _axis_aligned_frame(labels: np.ndarray, m: np.ndarray, rows: int, cols: int) -> np.ndarray | None:
    """:func:`_nearest_voxel_frame` where the image's pixels are the label grid's voxels (the usual case: labels
    written on the series' own grid), as a slice of the array instead of a lookup per pixel; None otherwise."""
    col_axis, row_axis = (int(np.argmax(np.abs(m[:3, j]))) for j in (0, 1))
    offset = np.rint(m[:3, 3])
    if col_axis == row_axis or np.abs(m[:3, 3] - offset).max() > 1e-3:
        return None
    for j, axis in ((0, col_axis), (1, row_axis)):
        unit = np.zeros(3)
        unit[axis] = np.sign(m[axis, j])
        if np.abs(m[:3, j] - unit).max() > 1e-6:
            return None
    o = offset.astype(np.int64)
    index: list = [int(o[0]), int(o[1]), int(o[2])]
    for axis, j, n in ((col_axis, 0, cols), (row_axis, 1, rows)):
        step = int(np.sign(m[axis, j]))
        last = o[axis] + step * (n - 1)
        if min(o[axis], last) < 0 or max(o[axis], last) >= labels.shape[axis]:
            return None  # partly outside the label grid: the general lookup pads with 0
        index[axis] = slice(int(o[axis]), int(last) + step if last + step >= 0 else None, step)
    slice_axis = 3 - col_axis - row_axis
    if not 0 <= o[slice_axis] < labels.shape[slice_axis]:
        return None
    plane = labels[tuple(index)]  # a view; its axes are col_axis and row_axis, in axis order
    return plane.T if col_axis < row_axis else plane


def _present(frames: np.ndarray, structures: Sequence[Structure]) -> list[Structure]:
    return [
        s for s in structures if (frames == s.label).any()
    ]  # one comparison each: np.unique sorts 35 M voxels on LIDC


def write_dicom_seg(
    path: str | Path,
    frames: np.ndarray,
    datasets: Sequence,
    structures: Sequence[Structure],
    software_version: str,
    series_description: str = "lungseg",
) -> Path:
    """A binary DICOM-SEG of every structure present in ``frames`` (one segment each), referencing ``datasets``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    present = _present(frames, structures)
    if not present:
        raise ValueError(f"{path}: no structure in the label map; a DICOM-SEG needs at least one segment")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="lungseg H-SAM", version=software_version, family=codes.cid7162.ArtificialIntelligence
    )
    # a label map of segment numbers: highdicom encodes it as binary segments without a one-hot copy (0.3 s on
    # LIDC's 133 frames against 3.3 s for the (frames, rows, columns, segments) stack)
    descriptions, segment_of_label = (
        [],
        np.zeros(max(int(frames.max()), max(s.label for s in present)) + 1, dtype=np.uint8),
    )
    for number, s in enumerate(present, start=1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=s.name,
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=hd.sr.CodedConcept(s.snomed, "SCT", s.snomed_meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*s.color),
            )
        )
        segment_of_label[s.label] = number
    seg = hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=segment_of_label[frames],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="lungseg-fm",
        manufacturer_model_name="lungseg H-SAM",
        software_versions=software_version,
        device_serial_number="0",
        series_description=series_description,
    )
    with atomic_path(Path(path)) as tmp:
        seg.save_as(tmp)
    return Path(path)


def write_rtstruct(
    path: str | Path,
    frames: np.ndarray,
    datasets: Sequence,
    structures: Sequence[Structure],
    series_description: str = "lungseg",
) -> Path:
    """An RTSTRUCT with one closed-planar ROI per structure present in ``frames``, referencing ``datasets``."""
    from rt_utils import RTStruct
    from rt_utils.ds_helper import create_rtstruct_dataset

    present = _present(frames, structures)
    if not present:
        raise ValueError(f"{path}: no structure in the label map; an RTSTRUCT needs at least one ROI")
    datasets = list(datasets)
    quiet = logging.getLogger("pydicom")
    level, quiet.level = (
        quiet.level,
        logging.ERROR,
    )  # rt-utils sets attributes pydicom 3 calls deprecated: not the user's concern
    try:
        rt = RTStruct(datasets, create_rtstruct_dataset(datasets))
    finally:
        quiet.setLevel(level)
    rt.set_series_description(series_description)
    for s in present:
        # rt-utils wants (rows, columns, slices) in its own slice order, which read_series_headers used
        rt.add_roi(mask=np.moveaxis(frames == s.label, 0, -1), color=list(s.color), name=s.name)
    with atomic_path(Path(path)) as tmp:
        rt.ds.save_as(tmp, enforce_file_format=True)
    return Path(path)
