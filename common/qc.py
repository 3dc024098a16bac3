"""Automated quality control of CT scans: each check says pass or fail, and why.

``run_qc(folder, out_dir)`` finds every scan under a folder (each DICOM series, NIfTI, NRRD/MHA,
RAD-ChestCT npz, DeepLesion PNG stack), checks it, and writes ``qc_report.json`` and
``qc_report.csv``. Failed scans are excluded and listed with their reasons; a scan that cannot
be read is a failed case, never a crash of the run.

    python -m common.qc DATA_DIR --out OUT_DIR
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from common.io import CTReadError, CTVolume, read_ct, write_json_atomic, write_text_atomic
from common.io.dicom import scan_dicom_folder, read_dicom_series
from common.io.readers import ITK_SUFFIXES, NIFTI_SUFFIXES, NPZ_SUFFIXES, PNG_SUFFIXES, has_suffix
from common.lungmask import hu_threshold_lung_mask

log = logging.getLogger(__name__)


@dataclass
class QCThresholds:
    """Limits of every check; defaults suit diagnostic chest CT."""

    allowed_modalities: tuple[str, ...] = ("CT",)
    min_slices: int = 10
    gap_factor: float = 1.5  # a gap > 1.5x the median slice step means missing slices
    spacing_tolerance: float = 0.05  # relative variation of the slice step allowed
    max_gantry_tilt_deg: float = 0.5
    air_percentile_max_hu: float = -800.0  # the 0.5th percentile must be air or lung
    bone_percentile_min_hu: float = 0.0  # the 99.5th percentile must reach soft tissue
    max_hu: float = 4000.0  # beyond this (after clipping metal), the rescale is wrong
    min_lung_ml: float = 500.0
    min_lung_slice_fraction: float = 0.3
    max_noise_hu: float = 60.0


@dataclass
class CheckResult:
    name: str
    passed: bool
    reason: str
    value: float | str | None = None


@dataclass
class QCRecord:
    case_id: str
    path: str
    format: str | None
    passed: bool
    checks: list[CheckResult] = field(default_factory=list)
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    lung_ml: float | None = None
    seconds: float = 0.0

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.reason}" for c in self.checks if not c.passed]


# --------------------------------------------------------------------------- individual checks


def check_modality(vol: CTVolume, t: QCThresholds) -> CheckResult:
    modality = vol.meta.get("modality")
    if modality is None:
        return CheckResult("modality", True, "format carries no modality; assumed CT", None)
    ok = modality in t.allowed_modalities
    return CheckResult(
        "modality",
        ok,
        f"modality {modality}" + ("" if ok else f", expected one of {list(t.allowed_modalities)}"),
        modality,
    )


def check_slices(vol: CTVolume, t: QCThresholds) -> list[CheckResult]:
    """Missing, duplicated and unevenly spaced slices, from the slice positions the reader found."""
    out = []
    n = vol.shape[2]
    out.append(
        CheckResult(
            "slice_count",
            n >= t.min_slices,
            f"{n} slices" + ("" if n >= t.min_slices else f", fewer than {t.min_slices}"),
            n,
        )
    )
    dups = vol.meta.get("duplicate_slices") or []
    out.append(
        CheckResult(
            "duplicate_slices",
            not dups,
            f"{len(dups)} duplicated slice position(s)" + (f", e.g. {Path(dups[0]).name}" if dups else ""),
            len(dups),
        )
    )
    gaps = np.asarray(vol.meta.get("slice_gaps_mm") or [], dtype=float)
    if gaps.size == 0:
        out.append(CheckResult("missing_slices", True, "no slice positions recorded in this format", None))
        out.append(CheckResult("slice_spacing", True, "no slice positions recorded in this format", None))
        return out
    step = float(np.median(gaps))
    missing = int(np.sum(np.round(gaps[gaps > t.gap_factor * step] / step) - 1))
    where = np.flatnonzero(gaps > t.gap_factor * step)
    out.append(
        CheckResult(
            "missing_slices",
            missing == 0,
            f"{missing} missing slice(s)"
            + (
                f" after slice index {where.tolist()[:5]} (gap {gaps[where[0]]:.2f} mm vs step {step:.2f} mm)"
                if missing
                else ""
            ),
            missing,
        )
    )
    regular = gaps[gaps <= t.gap_factor * step]
    variation = float((regular.max() - regular.min()) / step) if regular.size else 0.0
    ok = variation <= t.spacing_tolerance
    out.append(
        CheckResult(
            "slice_spacing",
            ok,
            f"slice step {step:.3f} mm, varies by {variation:.1%}" + ("" if ok else f" (> {t.spacing_tolerance:.0%})"),
            variation,
        )
    )
    spacings = vol.meta.get("pixel_spacings") or []
    if len(spacings) > 1:
        out.append(
            CheckResult(
                "pixel_spacing", False, f"in-plane pixel spacing differs between slices: {spacings}", len(spacings)
            )
        )
    return out


def check_gantry_tilt(vol: CTVolume, t: QCThresholds) -> CheckResult:
    tag = vol.meta.get("gantry_tilt_tag_deg")
    geometric = vol.meta.get("gantry_tilt_geometric_deg")
    values = [abs(v) for v in (tag, geometric) if v is not None]
    if not values:
        return CheckResult("gantry_tilt", True, "no tilt information in this format", None)
    tilt = max(values)
    ok = tilt <= t.max_gantry_tilt_deg
    return CheckResult(
        "gantry_tilt",
        ok,
        f"gantry tilt {tilt:.2f} deg" + ("" if ok else f" (> {t.max_gantry_tilt_deg} deg; resample before use)"),
        tilt,
    )


def check_hu_range(vol: CTVolume, t: QCThresholds, sample: np.ndarray) -> CheckResult:
    """Air/lung, soft tissue and bone must sit where HU puts them.

    Scanners pad outside the circular field of view with one constant (often -2048 or -3024, or
    -1024 when the intercept is missing); that padding is left out so it cannot pass for air.
    """
    values = sample.ravel()
    floor = float(values.min())
    padding = np.count_nonzero(values == floor) / values.size
    padded = padding > 0.01
    if padded:
        values = values[values != floor]
    if values.size == 0:
        return CheckResult("hu_range", False, f"every voxel is {floor:.0f}: an empty (constant) volume", floor)
    lo, med, hi = np.percentile(values, [0.5, 50, 99.5])
    problems = []
    if float(values.min()) >= 0:
        problems.append("no negative values: not HU (rescale intercept missing?)")
    elif lo > t.air_percentile_max_hu:
        problems.append(f"0.5th percentile {lo:.0f} HU: no air or lung (rescale intercept missing?)")
    if hi < t.bone_percentile_min_hu:
        problems.append(f"99.5th percentile {hi:.0f} HU: no soft tissue or bone")
    if hi > t.max_hu:
        problems.append(f"99.5th percentile {hi:.0f} HU above {t.max_hu:.0f}")
    reason = f"HU 0.5/50/99.5 percentiles {lo:.0f}/{med:.0f}/{hi:.0f}" + (
        f" (padding {floor:.0f} on {padding:.0%} left out)" if padded else ""
    )
    return CheckResult("hu_range", not problems, reason + ("; " + "; ".join(problems) if problems else ""), float(med))


def check_lung_coverage(vol: CTVolume, t: QCThresholds, stride: int) -> tuple[CheckResult, float]:
    """Lung volume and the share of slices showing lung, from the HU-threshold lung mask."""
    hu = vol.hu[::stride, ::stride, :]
    spacing = (vol.spacing[0] * stride, vol.spacing[1] * stride, vol.spacing[2])
    mask = hu_threshold_lung_mask(hu, spacing)
    lung_ml = float(mask.sum() * np.prod(spacing) / 1000.0)
    fraction = float(mask.any(axis=(0, 1)).mean())
    ok = lung_ml >= t.min_lung_ml and fraction >= t.min_lung_slice_fraction
    reason = f"lung {lung_ml:.0f} mL on {fraction:.0%} of slices (HU threshold)"
    if not ok:
        reason += f"; insufficient lung coverage (need >= {t.min_lung_ml:.0f} mL on >= {t.min_lung_slice_fraction:.0%} of slices)"
    return CheckResult("lung_coverage", ok, reason, lung_ml), lung_ml


def noise_sigma_hu(plane: np.ndarray) -> float | None:
    """Noise sigma (HU) of one slice from neighbour differences inside soft tissue.

    Air, padding and bone would hide or inflate noise, so only eroded soft tissue (-300..300 HU)
    is used; the median absolute difference is robust to the few organ edges that remain.
    """
    from scipy import ndimage

    tissue = ndimage.binary_erosion((plane > -300) & (plane < 300), iterations=2)
    both = tissue[1:, :] & tissue[:-1, :]
    if both.sum() < 500:
        return None
    diff = (plane[1:, :] - plane[:-1, :])[both]
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def check_noise(vol: CTVolume, t: QCThresholds, n_slices: int = 5) -> CheckResult:
    """Image noise on a few central slices, against ``max_noise_hu``."""
    nz = vol.shape[2]
    ks = np.unique(np.linspace(nz * 0.3, nz * 0.7, n_slices).astype(int).clip(0, nz - 1))
    sigmas = [s for s in (noise_sigma_hu(vol.hu[:, :, k]) for k in ks) if s is not None]
    if not sigmas:
        return CheckResult("noise", True, "too little soft tissue to measure noise", None)
    sigma = float(np.median(sigmas))
    ok = sigma <= t.max_noise_hu
    return CheckResult(
        "noise",
        ok,
        f"noise sigma {sigma:.1f} HU in soft tissue" + ("" if ok else f" (> {t.max_noise_hu:.0f} HU: excessive noise)"),
        sigma,
    )


def qc_volume(vol: CTVolume, thresholds: QCThresholds | None = None) -> list[CheckResult]:
    """Every check on a volume that could be read."""
    t = thresholds or QCThresholds()
    stride = max(1, int(round(min(vol.shape[:2]) / 256)))
    sample = vol.hu[::stride, ::stride, :]
    checks = [check_modality(vol, t), *check_slices(vol, t), check_gantry_tilt(vol, t), check_hu_range(vol, t, sample)]
    coverage, _ = check_lung_coverage(vol, t, stride)
    checks += [coverage, check_noise(vol, t)]
    return checks


# --------------------------------------------------------------------------- folders


@dataclass
class CaseRef:
    """One scan found on disk: how to read it, or why it cannot be."""

    case_id: str
    path: Path
    format: str
    series_uid: str | None = None
    error: str | None = None

    def read(self) -> CTVolume:
        if self.error:
            raise CTReadError(self.path, self.error)
        if self.format == "dicom":
            return read_dicom_series(self.path, series_uid=self.series_uid)
        return read_ct(self.path)


def discover_cases(root: str | Path) -> list[CaseRef]:
    """Every scan under ``root``: each DICOM series (split by SeriesInstanceUID), image file and PNG stack."""
    root = Path(root)
    if not root.exists():
        raise CTReadError(root, "folder does not exist")
    cases: list[CaseRef] = []
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir()) if root.is_dir() else []
    if root.is_file():
        return [CaseRef(_case_id(root, root.parent), root, "file")]
    for folder in folders:
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if any(has_suffix(p, PNG_SUFFIXES) for p in entries):
            cases.append(CaseRef(_case_id(folder, root), folder, "deeplesion_png"))
        for p in entries:
            if has_suffix(p, NIFTI_SUFFIXES + ITK_SUFFIXES + NPZ_SUFFIXES):
                cases.append(CaseRef(_case_id(p, root), p, "file"))
        scan = scan_dicom_folder(folder)
        many = len(scan.series) > 1
        for uid, series in scan.series.items():
            cid = _case_id(folder, root) + (f"__{uid[-12:]}" if many else "")
            cases.append(CaseRef(cid, folder, "dicom", series_uid=uid))
        for f, why in scan.unreadable.items():
            cases.append(CaseRef(_case_id(f, root), f, "dicom", error=why))
    return cases


def _case_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path != root else Path(root.name)
    name = str(rel).replace("/", "__")
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".npz", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def qc_case(case: CaseRef, thresholds: QCThresholds | None = None) -> tuple[QCRecord, CTVolume | None]:
    start = time.perf_counter()
    try:
        vol = case.read()
    except CTReadError as e:
        check = CheckResult("readable", False, str(e))
        return QCRecord(
            case.case_id, str(case.path), case.format, False, [check], seconds=time.perf_counter() - start
        ), None
    except Exception as e:  # an unexpected reader failure is still one failed case, not a stopped run
        log.exception("unexpected error reading %s", case.path)
        check = CheckResult("readable", False, f"{case.path}: {type(e).__name__}: {e}")
        return QCRecord(
            case.case_id, str(case.path), case.format, False, [check], seconds=time.perf_counter() - start
        ), None
    checks = [CheckResult("readable", True, f"read as {vol.meta.get('format')}")]
    try:
        checks += qc_volume(vol, thresholds)
    except Exception as e:  # a check that cannot run on this scan fails the scan, not the run
        log.exception("QC checks failed on %s", case.path)
        checks.append(CheckResult("checks", False, f"{case.path}: QC could not run ({type(e).__name__}: {e})"))
    lung = next((c.value for c in checks if c.name == "lung_coverage"), None)
    record = QCRecord(
        case.case_id,
        str(case.path),
        vol.meta.get("format"),
        all(c.passed for c in checks),
        checks,
        shape=vol.shape,
        spacing=tuple(round(s, 4) for s in vol.spacing),
        lung_ml=float(lung) if lung is not None else None,
        seconds=time.perf_counter() - start,
    )
    return record, vol


def iter_qc(
    root: str | Path, thresholds: QCThresholds | None = None, progress: bool = True
) -> Iterator[tuple[CaseRef, QCRecord, CTVolume | None]]:
    """QC every case under ``root``, yielding each with its volume (None when it failed to read)."""
    from tqdm.auto import tqdm

    cases = discover_cases(root)
    for case in tqdm(cases, desc="QC", unit="scan", disable=not progress):
        record, vol = qc_case(case, thresholds)
        yield case, record, vol


def write_qc_report(records: list[QCRecord], out_dir: str | Path) -> tuple[Path, Path]:
    """``qc_report.json`` (every check of every case) and ``qc_report.csv`` (one row a case)."""
    out_dir = Path(out_dir)
    passed = [r for r in records if r.passed]
    failed = [r for r in records if not r.passed]
    report = {
        "n_cases": len(records),
        "n_passed": len(passed),
        "n_failed": len(failed),
        "passed": [r.case_id for r in passed],
        "excluded": [{"case_id": r.case_id, "path": r.path, "reasons": r.reasons} for r in failed],
        "cases": [{**asdict(r), "reasons": r.reasons} for r in records],
    }
    json_path = write_json_atomic(out_dir / "qc_report.json", report)
    present = {c.name for r in records for c in r.checks}
    check_names = [n for n in _CHECK_ORDER if n in present] + sorted(present - set(_CHECK_ORDER))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["case_id", "path", "format", "passed", "shape", "spacing_mm", "lung_ml", "seconds", *check_names, "reasons"]
    )
    for r in records:
        by_name = {c.name: c for c in r.checks}
        writer.writerow(
            [
                r.case_id,
                r.path,
                r.format or "",
                "pass" if r.passed else "FAIL",
                "x".join(map(str, r.shape)) if r.shape else "",
                "x".join(f"{s:g}" for s in r.spacing) if r.spacing else "",
                f"{r.lung_ml:.0f}" if r.lung_ml is not None else "",
                f"{r.seconds:.2f}",
                *[("pass" if by_name[n].passed else "FAIL") if n in by_name else "" for n in check_names],
                " | ".join(r.reasons),
            ]
        )
    csv_path = write_text_atomic(out_dir / "qc_report.csv", buf.getvalue())
    return json_path, csv_path


_CHECK_ORDER = [
    "readable",
    "modality",
    "slice_count",
    "duplicate_slices",
    "missing_slices",
    "slice_spacing",
    "pixel_spacing",
    "gantry_tilt",
    "hu_range",
    "lung_coverage",
    "noise",
]


def run_qc(
    root: str | Path, out_dir: str | Path, thresholds: QCThresholds | None = None, progress: bool = True
) -> list[QCRecord]:
    """QC a folder and write the JSON and CSV reports; returns one record per case."""
    records = [record for _, record, _ in iter_qc(root, thresholds, progress)]
    write_qc_report(records, out_dir)
    for r in records:
        if not r.passed:
            log.warning("QC excluded %s: %s", r.case_id, "; ".join(r.reasons))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Automated CT quality control over a folder.")
    parser.add_argument("root", help="folder of scans (DICOM series folders, NIfTI, NRRD/MHA, npz, PNG stacks)")
    parser.add_argument("--out", required=True, help="folder for qc_report.json and qc_report.csv")
    parser.add_argument("--max-noise-hu", type=float, default=QCThresholds.max_noise_hu)
    parser.add_argument("--min-lung-ml", type=float, default=QCThresholds.min_lung_ml)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    records = run_qc(args.root, args.out, QCThresholds(max_noise_hu=args.max_noise_hu, min_lung_ml=args.min_lung_ml))
    n_fail = sum(not r.passed for r in records)
    print(
        f"QC: {len(records) - n_fail} passed, {n_fail} excluded; report in {args.out}/qc_report.json and qc_report.csv"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --------------------------------------------------------------------------- output QC (a mask, not a scan)

# A whole adult lung pair holds about 2-8 L; a crop or a thick-slice series less. Below this there is
# no lung to speak of: an empty or near-empty mask is a failure, never a result.
MIN_LUNG_ML = 200.0
MIN_SIDE_SHARE = 0.1  # the smaller side's share of the total: one missing lung is a finding to flag


def lung_mask_qc(report: dict, min_lung_ml: float = MIN_LUNG_ML, min_side_share: float = MIN_SIDE_SHARE) -> dict:
    """``{"passed", "reasons"}`` for a lung mask's report (``lung_volume_ml`` with total / right / left,
    ``mean_lung_hu``): too little lung, one side (nearly) missing, or a mask whose mean HU is not air-like."""
    vol = report.get("lung_volume_ml") or {}
    total = float(vol.get("total") or 0.0)
    reasons = []
    if total < min_lung_ml:
        reasons.append(f"lung mask holds {total:.0f} mL (< {min_lung_ml:.0f} mL): no plausible lung found")
    elif "right" in vol and "left" in vol and min(float(vol["right"]), float(vol["left"])) < min_side_share * total:
        reasons.append(
            f"one side holds {min(float(vol['right']), float(vol['left'])):.0f} of {total:.0f} mL (< {100 * min_side_share:.0f} %): "
            "a lung is missing from the mask (pneumonectomy, collapse, effusion, or a failed segmentation)"
        )
    hu = report.get("mean_lung_hu")
    if total >= min_lung_ml and hu is not None and float(hu) > -400.0:
        reasons.append(
            f"mean HU inside the mask is {float(hu):.0f} (> -400): the mask covers soft tissue, not aerated lung"
        )
    return {"passed": not reasons, "reasons": reasons}
