"""DICOM CT series: discovery (split by SeriesInstanceUID), geometry from the headers, HU, RTSTRUCT."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from common.io.volume import CTReadError, CTVolume

log = logging.getLogger(__name__)

# Files that may be DICOM: '.dcm', '.ima', or no suffix at all (many PACS exports).
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima", ""}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DUPLICATE_TOL_MM = 1e-3
MIN_SLICES = 10  # fewer is a localiser, a key image or a single slice, not a chest scan
AXIAL_MIN_COSINE = (
    0.8  # |cos| of the slice normal with the patient's head-foot axis (gantry tilt up to about 35 degrees)
)


def _pydicom():
    import pydicom

    return pydicom


def is_dicom_candidate(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in DICOM_SUFFIXES and not path.name.startswith(".")


@dataclass
class DicomSeries:
    """The files of one series, as found on disk (headers only, pixels not read yet)."""

    uid: str
    files: list[Path]
    modality: str | None = None
    description: str = ""
    folder: Path | None = None
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient of its first file
    image_type: tuple[str, ...] = ()
    study_uid: str = ""

    def __len__(self):
        return len(self.files)

    def summary(self) -> str:
        return f"{self.uid} ({len(self.files)} files, modality {self.modality}, '{self.description}')"

    def not_a_ct_scan(self) -> str | None:
        """Why this series is not an axial CT scan to segment (``None`` when it is one)."""
        if self.modality not in (None, "CT"):
            return f"modality {self.modality}, not CT"
        if any("LOCALIZER" in t or "SCOUT" in t for t in self.image_type):
            return "a localiser (ImageType " + "\\".join(self.image_type) + ")"
        if len(self.files) < MIN_SLICES:
            return f"{len(self.files)} slice(s), fewer than {MIN_SLICES}"
        if self.orientation is not None and len(self.orientation) == 6:
            normal = np.cross(np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:]))
            if abs(normal[2]) < AXIAL_MIN_COSINE:
                return f"not axial (slice normal {np.round(normal, 2).tolist()} in patient LPS)"
        return None


def choose_ct_series(
    series: dict[str, DicomSeries], series_uid: str | None = None, where: Path | str = ""
) -> tuple[DicomSeries, dict[str, str]]:
    """The series to segment and, for every other series, why it was skipped.

    ``series_uid`` picks one (an error naming the ones present when it is not there); otherwise the axial CT
    series with the most slices, as TotalSegmentator and a radiologist would take the thin axial recon.
    """
    if series_uid is not None:
        if series_uid not in series:
            raise CTReadError(
                where, f"series {series_uid} not found; present: " + "; ".join(s.summary() for s in series.values())
            )
        chosen = series[series_uid]
        reason = chosen.not_a_ct_scan()
        if reason:
            raise CTReadError(where, f"series {series_uid} is {reason}")
    else:
        ok = [s for s in series.values() if s.not_a_ct_scan() is None]
        if not ok:
            listing = "; ".join(f"{s.summary()}: {s.not_a_ct_scan()}" for s in series.values())
            raise CTReadError(
                where, f"no axial CT series to segment: {listing}" if listing else "no DICOM images found"
            )
        chosen = max(ok, key=len)
    skipped = {
        s.uid: (s.not_a_ct_scan() or f"fewer slices ({len(s)}) than the series chosen ({len(chosen)})")
        for s in series.values()
        if s is not chosen
    }
    return chosen, skipped


@dataclass
class SeriesScan:
    """Result of scanning a folder: series by UID, RTSTRUCT files, and files that are not readable DICOM."""

    series: dict[str, DicomSeries] = field(default_factory=dict)
    rtstructs: list[Path] = field(default_factory=list)
    unreadable: dict[Path, str] = field(default_factory=dict)


def scan_dicom_folder(folder: str | Path, recursive: bool = False) -> SeriesScan:
    """Read the headers of every candidate file in ``folder`` and group them by SeriesInstanceUID."""
    pydicom = _pydicom()
    folder = Path(folder)
    if not folder.is_dir():
        raise CTReadError(folder, "not a folder")
    files = sorted(folder.rglob("*") if recursive else folder.iterdir())
    out = SeriesScan()
    for f in files:
        if not is_dicom_candidate(f):
            continue
        if f.suffix == "" and not pydicom.misc.is_dicom(f):
            continue  # a README or other file without suffix: not ours to judge
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # pydicom raises several types for corrupt files
            out.unreadable[f] = f"not a readable DICOM file ({type(e).__name__}: {e})"
            continue
        modality = str(getattr(ds, "Modality", "") or "")
        if modality == "RTSTRUCT":
            out.rtstructs.append(f)
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid:
            out.unreadable[f] = "DICOM file has no SeriesInstanceUID"
            continue
        if "PixelData" not in ds and not hasattr(ds, "Rows"):
            continue  # reports, presentation states, ... carry no image
        if uid not in out.series:
            iop = getattr(ds, "ImageOrientationPatient", None)
            out.series[uid] = DicomSeries(
                uid,
                [],
                modality or None,
                str(getattr(ds, "SeriesDescription", "") or ""),
                f.parent,
                tuple(float(v) for v in iop) if iop is not None and len(iop) == 6 else None,
                tuple(str(t).upper() for t in (getattr(ds, "ImageType", None) or ())),
                str(getattr(ds, "StudyInstanceUID", "") or ""),
            )
        s = out.series[uid]
        s.files.append(f)
    return out


def _float_list(value, n: int, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except Exception as e:
        raise CTReadError(path, f"{what} is missing or not numeric ({e})") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise CTReadError(path, f"{what} must have {n} finite values, got {list(value)!r}")
    return arr


def read_dicom_series(
    source: str | Path | Sequence[str | Path],
    series_uid: str | None = None,
    axcodes: str | None = None,
) -> CTVolume:
    """Read one DICOM series into a CTVolume (HU, RAS affine).

    ``source`` is a folder or a list of files. A folder holding several series needs ``series_uid``;
    without it the error lists the series found. Slices are sorted by their position along the
    slice normal; duplicated positions keep the first file and are recorded in ``meta`` for QC.
    ``axcodes`` (e.g. "RAS") fills the volume directly in that orientation, slice by slice, so no
    second copy of the volume is ever made to reorient it.
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        folder = Path(source)
        scan = scan_dicom_folder(folder)
        if not scan.series:
            detail = (
                f"; {len(scan.unreadable)} unreadable file(s), e.g. {next(iter(scan.unreadable.items()))[0].name}: {next(iter(scan.unreadable.items()))[1]}"
                if scan.unreadable
                else ""
            )
            raise CTReadError(folder, f"no DICOM images found{detail}")
        if series_uid is None:
            if len(scan.series) > 1:
                listing = "; ".join(s.summary() for s in scan.series.values())
                raise CTReadError(
                    folder,
                    f"{len(scan.series)} series in one folder (mixed series): {listing}. Choose one with series_uid=",
                )
            series_uid = next(iter(scan.series))
        if series_uid not in scan.series:
            raise CTReadError(folder, f"series {series_uid} not found; present: {', '.join(scan.series)}")
        files = scan.series[series_uid].files
        label = folder
    else:
        files = [Path(f) for f in ([source] if isinstance(source, (str, Path)) else source)]
        label = files[0].parent if len(files) > 1 else files[0]
    return _read_files(files, label, axcodes)


def _slice_orientation(affine: np.ndarray, shape: tuple[int, int, int], axcodes: str | None):
    """(in-plane transform, flip slice order, output shape, output affine) for filling in ``axcodes``.

    Returns None when the target orientation moves the slice axis (a non-axial target): the
    caller then reorients after reading.
    """
    from nibabel import orientations as ornt

    if axcodes is None:
        return np.array([[0, 1], [1, 1], [2, 1]]), False, shape, affine
    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(tuple(axcodes)))
    if int(transform[2, 0]) != 2:
        return None
    out_shape = tuple(int(shape[i]) for i in np.argsort(transform[:, 0]))
    plane_transform = transform.copy()
    plane_transform[2] = [2, 1]
    return plane_transform, bool(transform[2, 1] < 0), out_shape, affine @ ornt.inv_ornt_aff(transform, shape)


def _read_files(files: list[Path], label: Path, axcodes: str | None = None) -> CTVolume:
    pydicom = _pydicom()
    if not files:
        raise CTReadError(label, "no DICOM files given")
    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:
            raise CTReadError(f, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
        headers.append(ds)
    first = headers[0]
    uids = {str(getattr(h, "SeriesInstanceUID", "")) for h in headers}
    if len(uids) > 1:
        raise CTReadError(label, f"files belong to {len(uids)} different series (mixed series): {sorted(uids)}")
    rows, cols = int(first.Rows), int(first.Columns)
    for f, h in zip(files, headers):
        if (int(h.Rows), int(h.Columns)) != (rows, cols):
            raise CTReadError(f, f"slice size {h.Rows}x{h.Columns} differs from the series' {rows}x{cols}")
        if int(getattr(h, "NumberOfFrames", 1) or 1) > 1:
            raise CTReadError(f, "multi-frame (enhanced) DICOM is not supported; export as one file per slice")

    iop = _float_list(
        getattr(first, "ImageOrientationPatient", None) or [1, 0, 0, 0, 1, 0], 6, "ImageOrientationPatient", files[0]
    )
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    for f, h in zip(files, headers):
        other = getattr(h, "ImageOrientationPatient", None)
        if other is not None and not np.allclose(_float_list(other, 6, "ImageOrientationPatient", f), iop, atol=1e-3):
            raise CTReadError(f, "slice orientation differs from the rest of the series")
    pixel_spacings = [
        tuple(_float_list(getattr(h, "PixelSpacing", None) or [1, 1], 2, "PixelSpacing", f))
        for f, h in zip(files, headers)
    ]

    has_position = all(getattr(h, "ImagePositionPatient", None) is not None for h in headers)
    if has_position:
        positions = np.stack(
            [_float_list(h.ImagePositionPatient, 3, "ImagePositionPatient", f) for f, h in zip(files, headers)]
        )
        along = positions @ normal
    else:
        along = np.asarray([float(getattr(h, "InstanceNumber", i) or i) for i, h in enumerate(headers)])
        positions = None
    order = np.argsort(along, kind="stable")

    keep, duplicates = [], []
    for idx in order:
        if keep and abs(along[idx] - along[keep[-1]]) < DUPLICATE_TOL_MM:
            duplicates.append(str(files[idx]))
            continue
        keep.append(int(idx))

    n = len(keep)
    thickness = float(getattr(first, "SliceThickness", 0) or 0) or 1.0
    dr, dc = pixel_spacings[keep[0]]  # PixelSpacing = (between rows, between columns)
    if positions is not None and n > 1:
        step = (positions[keep[-1]] - positions[keep[0]]) / (n - 1)
        gaps = np.diff(along[keep])
    else:
        step = normal * thickness
        gaps = np.full(max(n - 1, 0), thickness)
    origin = positions[keep[0]] if positions is not None else np.zeros(3)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * dc  # i runs along a row (column index)
    affine_lps[:3, 1] = col_dir * dr  # j runs down a column (row index)
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = origin
    affine = LPS_TO_RAS @ affine_lps

    layout = _slice_orientation(affine, (cols, rows, n), axcodes)
    reorient_after = layout is None
    if reorient_after:
        layout = _slice_orientation(affine, (cols, rows, n), None)
    plane_transform, flip_k, out_shape, out_affine = layout
    hu = np.empty(out_shape, dtype=np.float32)
    slopes, intercepts = set(), set()
    from nibabel.orientations import apply_orientation

    for k_in, idx in enumerate(keep):
        k = n - 1 - k_in if flip_k else k_in
        f = files[idx]
        try:
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array
        except Exception as e:
            raise CTReadError(
                f, f"pixel data cannot be decoded, the file may be truncated ({type(e).__name__}: {e})"
            ) from None
        if pixels.shape != (rows, cols):
            raise CTReadError(f, f"pixel array shape {pixels.shape} does not match Rows x Columns {rows}x{cols}")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        slopes.add(slope)
        intercepts.add(intercept)
        sl = hu[:, :, k]
        sl[...] = apply_orientation(pixels.T[:, :, None], plane_transform)[:, :, 0]
        if slope != 1:
            sl *= slope
        if intercept:
            sl += intercept

    tilt_tag = getattr(first, "GantryDetectorTilt", None)
    step_unit = step / (np.linalg.norm(step) or 1.0)
    geometric_tilt = float(np.degrees(np.arccos(np.clip(abs(step_unit @ normal), -1.0, 1.0)))) if n > 1 else 0.0
    meta = {
        "source": str(label),
        "format": "dicom",
        "modality": str(getattr(first, "Modality", "") or "") or None,
        "series_uid": str(getattr(first, "SeriesInstanceUID", "")),
        "study_uid": str(getattr(first, "StudyInstanceUID", "")),
        "frame_of_reference_uid": str(getattr(first, "FrameOfReferenceUID", "")),
        "series_description": str(getattr(first, "SeriesDescription", "") or ""),
        "manufacturer": str(getattr(first, "Manufacturer", "") or ""),
        "n_files": len(files),
        "slice_positions_mm": [float(along[i]) for i in keep],
        "slice_gaps_mm": [float(g) for g in gaps],
        "slice_thickness_mm": thickness,
        "positions_from_header": bool(has_position),
        "duplicate_slices": duplicates,
        "pixel_spacings": sorted({tuple(round(v, 6) for v in p) for p in pixel_spacings}),
        "gantry_tilt_tag_deg": float(tilt_tag) if tilt_tag not in (None, "") else None,
        "gantry_tilt_geometric_deg": geometric_tilt,
        "rescale_slopes": sorted(slopes),
        "rescale_intercepts": sorted(intercepts),
        "sop_instance_uids": [str(getattr(headers[i], "SOPInstanceUID", "")) for i in keep],
        "patient_id": str(getattr(first, "PatientID", "") or ""),
    }
    vol = CTVolume(hu, out_affine, meta)
    return vol.reorient(axcodes) if reorient_after else vol


def iter_dicom_series(folder: str | Path) -> Iterable[tuple[DicomSeries, CTVolume | CTReadError]]:
    """Yield every series of a folder with its volume, or the error that stopped it (one bad series never stops the rest)."""
    scan = scan_dicom_folder(folder)
    for s in scan.series.values():
        try:
            yield s, _read_files(s.files, Path(folder))
        except CTReadError as e:
            yield s, e


# --------------------------------------------------------------------------- RTSTRUCT


def read_rtstruct(
    rtstruct_path: str | Path, ct: CTVolume, roi_names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Rasterise the closed planar contours of an RTSTRUCT onto the CT's voxel grid.

    Returns ``{roi_name: bool array shaped like ct.hu}``. Contours on the same slice are combined
    with the even-odd rule (XOR), so a contour drawn inside another one is a hole, as in the
    DICOM RT convention used by planning systems.
    """
    from skimage.draw import polygon as draw_polygon

    pydicom = _pydicom()
    path = Path(rtstruct_path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise CTReadError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    if str(getattr(ds, "Modality", "")) != "RTSTRUCT":
        raise CTReadError(path, f"modality is {getattr(ds, 'Modality', None)!r}, expected RTSTRUCT")
    frame = ct.meta.get("frame_of_reference_uid")
    # ReferencedFrameOfReferenceUID is the attribute PS3.3 C.8.8.5 defines there; some writers used FrameOfReferenceUID
    rs_frames = {
        str(getattr(r, "ReferencedFrameOfReferenceUID", "") or getattr(r, "FrameOfReferenceUID", ""))
        for r in getattr(ds, "StructureSetROISequence", [])
    } - {""}
    if frame and rs_frames and frame not in rs_frames:
        raise CTReadError(path, f"RTSTRUCT frame of reference {sorted(rs_frames)} does not match the CT's {frame}")

    names = {int(r.ROINumber): str(r.ROIName) for r in getattr(ds, "StructureSetROISequence", [])}
    if roi_names is not None:
        missing = set(roi_names) - set(names.values())
        if missing:
            raise CTReadError(path, f"ROI(s) {sorted(missing)} not in the RTSTRUCT; present: {sorted(names.values())}")
    ras_to_voxel = np.linalg.inv(ct.affine)
    nx, ny, nz = ct.shape
    masks: dict[str, np.ndarray] = {}
    for roi in getattr(ds, "ROIContourSequence", []):
        name = names.get(int(roi.ReferencedROINumber), f"roi_{roi.ReferencedROINumber}")
        if roi_names is not None and name not in roi_names:
            continue
        mask = np.zeros(ct.shape, dtype=bool)
        for contour in getattr(roi, "ContourSequence", []):
            kind = str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR"))
            if kind != "CLOSED_PLANAR":
                continue  # points and open lines carry no area
            pts = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)
            ras = np.c_[pts * [-1, -1, 1], np.ones(len(pts))]
            ijk = (ras_to_voxel @ ras.T).T[:, :3]
            k = np.rint(ijk[:, 2])
            if np.ptp(ijk[:, 2]) > 0.5:
                raise CTReadError(
                    path,
                    f"ROI {name!r}: a contour is not planar on the CT's slices (spans {np.ptp(ijk[:, 2]):.2f} slices)",
                )
            k = int(k[0])
            if not 0 <= k < nz:
                raise CTReadError(path, f"ROI {name!r}: contour at slice {k} lies outside the CT (0..{nz - 1})")
            rr, cc = draw_polygon(ijk[:, 0], ijk[:, 1], shape=(nx, ny))
            plane = np.zeros((nx, ny), dtype=bool)
            plane[rr, cc] = True
            mask[:, :, k] ^= plane
        masks[name] = mask
    return masks
