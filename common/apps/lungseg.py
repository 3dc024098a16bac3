"""``lungseg``: the lungs of chest CT, right and left, with the shipped models (the CLI over :mod:`common.segment`).

    lungseg -i <DICOM folder | .nii.gz | .nrrd | .mha | folder of cases> -o <out> [--series UID] [--device cpu|cuda]
            [--models DIR] [--classes lungs|all|heart,...] [--precision auto|float32|bfloat16] [--slice-search-step N]
            [--probmap] [--overwrite]

One scan (a CT file, or a folder holding DICOM files) writes into ``<out>``: ``labels.nii.gz`` (1 right lung,
2 left lung), ``lung_mask.nii.gz``, ``report.json``, ``statistics.json``, ``overlay.png``, for DICOM
``seg.dcm`` (DICOM-SEG) and ``rtstruct.dcm`` (RTSTRUCT), and with ``--probmap`` SA-2's ``probmap.nii.gz``. A folder of cases (CT files, or
sub-folders of DICOM) writes ``<out>/<case>/`` for each, and a re-run skips the cases whose
``statistics.json`` exists, so a killed batch resumes where it stopped.

A DICOM folder with several series: the axial CT series with the most slices, unless ``--series`` names one;
the others are listed with why they were skipped.

Exit codes: 0 every scan segmented (or already done); 1 an unexpected error; 2 bad input or a missing model
(the message names the file and the problem); 3 a mask written but failed QC (``report.json`` ``qc.reasons``);
4 the output folder cannot be written. A batch exits with its most serious case's code (1, 4, 2, 3, then 0).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.io.readers import ITK_SUFFIXES, NIFTI_SUFFIXES, NPZ_SUFFIXES

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_QC, EXIT_OUTPUT = 0, 1, 2, 3, 4
SEVERITY = (EXIT_ERROR, EXIT_OUTPUT, EXIT_INPUT, EXIT_QC, EXIT_OK)  # a batch exits with its most serious case's code
CT_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + NPZ_SUFFIXES  # the CT files common.io reads
log = logging.getLogger("lungseg")


class InputError(Exception):
    """Input a user must fix: the message names the file and the problem."""


@dataclass
class Case:
    """One scan to segment: a CT file, or one series of a DICOM folder (its files, and the series passed over)."""

    case_id: str
    path: Path
    dicom_files: list[Path] | None = None
    source: dict = field(default_factory=dict)


def dicom_case(folder: Path, series_uid: str | None, case_id: str) -> Case:
    """The series of ``folder`` to segment (:func:`common.io.choose_ct_series`) as a :class:`Case`."""
    from common.io import CTReadError, choose_ct_series, scan_dicom_folder

    scan = scan_dicom_folder(folder)
    if not scan.series:
        bad = next(iter(scan.unreadable.items()), None)
        detail = f"; {len(scan.unreadable)} unreadable file(s), e.g. {bad[0]}: {bad[1]}" if bad else ""
        raise InputError(f"{folder}: no DICOM images found{detail}")
    try:
        chosen, skipped = choose_ct_series(scan.series, series_uid, folder)
    except CTReadError as e:
        raise InputError(str(e)) from None
    for uid, why in skipped.items():
        log.info("%s: skipped series %s (%s)", folder, scan.series[uid].summary(), why)
    source = {
        "input": str(folder),
        "study_instance_uid": chosen.study_uid or None,
        "series_instance_uid": chosen.uid,
        "series_description": chosen.description,
        "slices": len(chosen),
        "skipped_series": skipped,
    }
    return Case(case_id, folder, sorted(chosen.files), source)


def find_cases(path: Path, series_uid: str | None = None) -> tuple[list[Case], bool]:
    """The scans under ``path`` and whether it is a batch (a folder of cases rather than one scan)."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        if not _is_ct_file(path):
            raise InputError(
                f"{path}: not a CT file this tool reads (NIfTI, NRRD, MHA, RAD-ChestCT .npz, or a folder of DICOM files)"
            )
        return [Case(_case_id(path), path, source={"input": str(path)})], False
    kind = _folder_kind(path)
    if kind == "dicom":
        return [dicom_case(path, series_uid, path.name)], False
    if kind == "deeplesion_png":
        return [Case(path.name, path, source={"input": str(path)})], False
    cases = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and _is_ct_file(entry):
            cases.append(Case(_case_id(entry), entry, source={"input": str(entry)}))
        elif entry.is_dir() and _folder_kind(entry) == "dicom":
            cases.append(
                Case(entry.name, entry)
            )  # its series is chosen when its turn comes (one bad folder stops no other)
        elif entry.is_dir() and _folder_kind(entry) == "deeplesion_png":
            cases.append(Case(entry.name, entry, source={"input": str(entry)}))
    if not cases:
        raise InputError(
            f"{path}: no CT found (no DICOM files, and no {', '.join(CT_SUFFIXES)} files or DICOM sub-folders)"
        )
    return cases, True


def _folder_kind(folder: Path) -> str | None:
    """``"dicom"`` or ``"deeplesion_png"`` for a folder that is one scan, else ``None`` (a folder of cases, or nothing)."""
    from common.io import CTReadError, format_of

    try:
        return format_of(folder)
    except CTReadError:
        return None


def _is_ct_file(path: Path) -> bool:
    from common.io import CTReadError, format_of

    try:
        return format_of(path) in ("nifti", "itk", "radchestct")
    except CTReadError:
        return False


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in sorted(CT_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def check_writable(out: Path) -> None:
    """``out`` exists or can be made, and a file can be written in it (else :class:`PermissionError` naming it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".lungseg-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{out}: the output folder cannot be written ({e.strerror or e})") from None


def run_case(
    case: Case,
    out: Path,
    models,
    series_uid: str | None,
    device: str | None,
    overwrite: bool,
    probmap: bool = False,
    precision: str = "auto",
    classes: tuple[str, ...] = (),
    slice_search_step: int = 4,
) -> int:
    """Segment one case into ``out``; returns its exit code and prints one line for it."""
    from common.io import CTReadError
    from common.segment import OUTPUTS, segment

    done = out / OUTPUTS["statistics"]
    if done.is_file() and not overwrite:
        print(f"{case.case_id}: already done in {out} (statistics.json exists; --overwrite redoes it)")
        return EXIT_OK
    try:
        check_writable(out)
        if case.dicom_files is None and case.path.is_dir():
            case = dicom_case(case.path, series_uid, case.case_id)
        ct = case.path
        if case.dicom_files is not None and case.source.get("skipped_series"):
            ct = _series_folder(out, case.dicom_files)  # the bundles read a folder: give them the chosen series alone
        stats = segment(
            ct,
            out,
            models,
            probmap=probmap,
            device=device,
            precision=precision,
            classes=classes,
            dicom_files=case.dicom_files,
            source=case.source,
            slice_search_step=slice_search_step,
        )
    except PermissionError as e:
        print(f"lungseg: {e}", file=sys.stderr)
        return EXIT_OUTPUT
    except (InputError, CTReadError, FileNotFoundError) as e:
        print(
            f"lungseg: {str(e).replace(str(out / '.series'), str(case.path))}", file=sys.stderr
        )  # the user's folder, not our links
        return EXIT_INPUT
    except Exception as e:  # noqa: BLE001 (one failed case must not stop a batch; the log has the traceback)
        log.exception("%s: failed", case.path)
        print(f"lungseg: {case.path}: failed ({type(e).__name__}: {e})", file=sys.stderr)
        return EXIT_ERROR
    finally:
        import shutil

        shutil.rmtree(out / ".series", ignore_errors=True)
    lungs = stats["structures"]
    line = (
        f"{case.case_id}: lungs {lungs['lungs']['volume_ml']} mL (right {lungs['right lung']['volume_ml']}, left {lungs['left lung']['volume_ml']}); "
        f"{stats['seconds']} s, peak {stats['peak_memory_gb']} GB; wrote {', '.join(stats['outputs'])} in {out}"
    )
    if stats.get("dicom_error"):
        print(f"lungseg: {out}: DICOM-SEG / RTSTRUCT not written: {stats['dicom_error']}", file=sys.stderr)
        return EXIT_ERROR
    if not (stats.get("qc") or {}).get("passed", False):
        print(
            f"lungseg: {out / OUTPUTS['labels']} failed QC: {'; '.join((stats.get('qc') or {}).get('reasons', []))}",
            file=sys.stderr,
        )
        return EXIT_QC
    print(line)
    return EXIT_OK


def _series_folder(out: Path, files: list[Path]) -> Path:
    """A folder of links to one series' files, for readers that take a folder."""
    folder = out / ".series"
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        link = folder / f"{i:05d}_{f.name}"
        if not link.exists():
            link.symlink_to(f.resolve())
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="lungseg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "-i", "--input", required=True, type=Path, help="a CT file, a folder of DICOM files, or a folder of cases"
    )
    p.add_argument(
        "-o", "--output", required=True, type=Path, help="output folder (one sub-folder per case in a batch)"
    )
    p.add_argument("--series", default=None, help="SeriesInstanceUID to segment in a DICOM folder holding several")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the first GPU when there is one)")
    p.add_argument(
        "--models",
        type=Path,
        default=None,
        help="a folder laid out as bundles/ (<bundle>/models/model.pt); default: the shipped models",
    )
    p.add_argument(
        "--clip-ckpt",
        type=Path,
        default=os.environ.get("CLIP_CKPT") or None,
        help="SA-1 checkpoint (overrides --models)",
    )
    p.add_argument(
        "--hsam-ckpt",
        type=Path,
        default=os.environ.get("HSAM_CKPT") or None,
        help="H-SAM checkpoint (overrides --models)",
    )
    p.add_argument(
        "--classes",
        default="lungs",
        help="lungs (1 right, 2 left) or, beside them, SA-2's: all, or a comma list of heart, "
        "blood vessel, airway, bone (labels 3-6; runs SA-2)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="H-SAM's arithmetic: auto = bfloat16 where the CPU or GPU computes it natively (about 2x faster), else float32",
    )
    p.add_argument(
        "--slice-search-step",
        type=int,
        default=4,
        metavar="N",
        help="H-SAM first on every N-th slice, then on every slice of the slab where it found lung (default 4); 1: every slice",
    )
    p.add_argument(
        "--probmap",
        action="store_true",
        help="also run SA-2 and write its five-class probability map, probmap.nii.gz "
        "(about twice the time on the CPU; the lung labels do not change)",
    )
    p.add_argument("--overwrite", action="store_true", help="segment again the cases whose statistics.json exists")
    p.add_argument("--quiet", action="store_true", help="warnings and errors only")
    args = p.parse_args(argv)
    # this run's log on this run's stderr, taken off again at the end (main may run many times in one process)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.WARNING if args.quiet else logging.INFO)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per copied DICOM module otherwise
    try:
        return _run(args)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _run(args) -> int:
    from common.segment import EXTRA_CLASSES, Models

    classes = (
        tuple(EXTRA_CLASSES)
        if args.classes == "all"
        else tuple(c.strip() for c in args.classes.split(",") if c.strip() and c.strip() != "lungs")
    )
    if set(classes) - set(EXTRA_CLASSES):
        print(
            f"lungseg: --classes {args.classes}: unknown {sorted(set(classes) - set(EXTRA_CLASSES))}; choose lungs, all, or of "
            f"{', '.join(EXTRA_CLASSES)}",
            file=sys.stderr,
        )
        return EXIT_INPUT
    if args.slice_search_step < 1:
        print(
            f"lungseg: --slice-search-step {args.slice_search_step}: must be 1 (every slice) or more", file=sys.stderr
        )
        return EXIT_INPUT
    models = Models.from_dir(args.models) if args.models else Models()
    models = Models(args.clip_ckpt or models.clip, args.hsam_ckpt or models.hsam)
    try:
        models.check(args.probmap or bool(classes))
        cases, batch = find_cases(args.input, args.series)
    except (InputError, FileNotFoundError) as e:
        print(f"lungseg: {e}", file=sys.stderr)
        return EXIT_INPUT
    if batch:
        log.info("%s: %d case(s)", args.input, len(cases))
    codes = []
    for n, case in enumerate(cases, start=1):
        if batch:
            log.info("case %d/%d: %s", n, len(cases), case.case_id)
        codes.append(
            run_case(
                case,
                args.output / case.case_id if batch else args.output,
                models,
                args.series,
                args.device,
                args.overwrite,
                args.probmap,
                args.precision,
                classes,
                args.slice_search_step,
            )
        )
    if batch:
        failed = [c.case_id for c, code in zip(cases, codes) if code not in (EXIT_OK, EXIT_QC)]
        qc = [c.case_id for c, code in zip(cases, codes) if code == EXIT_QC]
        print(
            f"lungseg: {len(cases) - len(failed)} of {len(cases)} case(s) done"
            + (f" ({len(qc)} failed QC: {', '.join(qc)})" if qc else "")
            + (f"; not done: {', '.join(failed)}" if failed else "")
        )
    return min(codes, key=SEVERITY.index)


if __name__ == "__main__":
    sys.exit(main())
