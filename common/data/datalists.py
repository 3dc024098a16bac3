"""Which cases a stage runs on (MONAI-style lists of ``{"image", "case_id", ...}``), less those already done, and
the SA-3a merge that writes H-SAM's training datalist (MONAI decathlon style) with its QC table.

:func:`merge_pseudolabels` reads every case's JSON (and every rank's ``failed*.json``) and writes
``datalist.json`` (``training`` / ``validation`` for hsam_finetune, flagged cases left out with their reasons)
and ``qc.csv``. Under ``torchrun`` each rank takes every ``world_size``-th case, writes only its own cases, and
rank 0 merges after a barrier.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import logging
import random
from pathlib import Path
from typing import Sequence

from common.io.atomic import atomic_path, remove_stale_temporaries, write_json_atomic
from common.io.nifti import case_paths
from common.transforms.savers import PSEUDOLABEL_OUTPUTS, SEGMENTATION_OUTPUTS, probmap_outputs, pseudolabel_outputs

log = logging.getLogger(__name__)


DEFAULT_EXCLUDE = (
    "*_label.nii.gz",
    "*_lungs.nii.gz",
    "*_label.nrrd",
    "*_seg.nii.gz",
    "*_probmap.nii.gz",
    "*_lung_mask.nii.gz",
    "*_lung_sides.nii.gz",
)


def scan_datalist(dataset_dir: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[dict]:
    """One ``{"image", "case_id"}`` per scan under ``dataset_dir`` (DICOM series folders, NIfTI, NRRD, ...),
    leaving out files whose name matches a pattern of ``exclude`` (label maps, earlier outputs). An
    unreadable DICOM file is listed too and fails, with its reason, when loaded."""
    from common.qc import discover_cases

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.exists():
        raise FileNotFoundError(f"{dataset_dir}: dataset_dir does not exist")
    found = [
        c for c in discover_cases(dataset_dir) if not any(fnmatch.fnmatch(Path(c.path).name, pat) for pat in exclude)
    ]
    if not found:
        raise ValueError(
            f"{dataset_dir}: no CT scan found (looked for DICOM series, NIfTI, NRRD/MHA, npz and PNG stacks)"
        )
    return [{"image": str(c.path), "case_id": c.case_id} for c in found]


def probmap_datalist(
    dataset_dir: str | Path, output_dir: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE, overwrite: bool = False
) -> list[dict]:
    """:func:`scan_datalist` less the cases with a finished output in ``output_dir`` (``overwrite=True``: all)."""
    found = scan_datalist(dataset_dir, exclude)
    todo = [c for c in found if overwrite or not probmap_outputs(output_dir, c["case_id"])["report"].is_file()]
    if len(todo) < len(found):
        log.info(
            "probmap: %d of %d cases already done in %s (skipped; overwrite=True redoes them)",
            len(found) - len(todo),
            len(found),
            output_dir,
        )
    return todo


def phantom_datalist(
    phantom_dir: str | Path,
    n: int = 3,
    seed: int = 100,
    prefix: str = "heldout_phantom",
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
) -> list[dict]:
    """``n`` phantoms from seeds SA-1 never saw (generated once into ``phantom_dir``), with their label maps:
    ``{"image", "label", "lungs", "case_id"}``. ``shape``/``spacing`` (default: the standard phantom) let the
    demo use thicker, fewer slices; phantoms already in ``phantom_dir`` are reused whatever their shape."""
    from common.default_data import PHANTOM_SHAPE, PHANTOM_SPACING, make_phantoms

    cases = make_phantoms(
        Path(phantom_dir),
        int(n),
        seed=int(seed),
        prefix=prefix,
        shape=shape or PHANTOM_SHAPE,
        spacing=spacing or PHANTOM_SPACING,
    )
    return [
        {"image": str(c["path"]), "label": str(c["label"]), "lungs": str(c["lungs"]), "case_id": c["id"]} for c in cases
    ]


QC_COLUMNS = (
    "case_id",
    "status",
    "included",
    "reasons",
    "lung_ml_total",
    "lung_ml_right",
    "lung_ml_left",
    "mean_predicted_iou",
    "agreement_dice",
    "kept_share",
    "candidates",
    "kept",
    "slices_with_lung",
    "seconds",
    "image",
    "label",
)


def pseudolabel_datalist(
    dataset_dir: str | Path,
    probmap_dir: str | Path,
    output_dir: str | Path,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    cases: Sequence[dict] | None = None,
    with_probmap: bool = False,
) -> dict:
    """This rank's share of the cases still to do: ``{"todo": [{"image", "case_id", "probmap", "lung_mask"}, ...],
    "skipped": [{"case", "reason"}, ...]}``. A case whose SA-2 outputs are missing is skipped with its
    reason; a case with a finished pseudo label is left out (``overwrite=True`` redoes it). ``cases``
    (``{"image", "case_id", ...}``) replaces the scan of ``dataset_dir``; their other keys (e.g. ``lungs``) are kept.
    ``with_probmap`` adds the multi-class map (needed only for auxiliary-channel prompts)."""
    remove_stale_temporaries(output_dir)
    found = list(cases) if cases is not None else scan_datalist(dataset_dir, exclude)
    found = sorted(found, key=lambda c: c["case_id"])[int(rank) :: max(1, int(world_size))]
    todo, skipped, done = [], [], 0
    for c in found:
        if not overwrite and pseudolabel_outputs(output_dir, c["case_id"])["report"].is_file():
            done += 1
            continue
        pm = probmap_outputs(probmap_dir, c["case_id"])
        missing = [k for k in ("probmap", "lung_mask") if not pm[k].is_file()]
        if missing:
            skipped.append(
                {
                    "case": c["case_id"],
                    "reason": f"no SA-2 {' / '.join(missing)} at {pm[missing[0]]} (run the probmap bundle on this case first)",
                }
            )
            continue
        item = {
            **c,
            "lung_mask": str(pm["lung_mask"]),
            "image_path": str(c["image"]),
            "probmap_path": str(pm["probmap"]),
        }
        if with_probmap:
            item["probmap"] = str(pm["probmap"])
        todo.append(item)
    if done:
        log.info("pseudolabel: %d case(s) already done in %s (skipped; overwrite=True redoes them)", done, output_dir)
    for s in skipped:
        log.warning("pseudolabel: %s skipped: %s", s["case"], s["reason"])
    return {"todo": todo, "skipped": skipped}


def merge_pseudolabels(output_dir: str | Path, validation_fraction: float = 0.2, seed: int = 0) -> dict:
    """Gather every finished case (``*/*_pseudolabel.json``) and every rank's failures into ``qc.csv``,
    ``qc.json`` and ``datalist.json`` (training / validation split of the cases that passed QC,
    seeded, at least one validation case when two or more passed; ``excluded`` with reasons)."""
    output_dir = Path(output_dir)
    rows, datalist = [], {"training": [], "validation": [], "excluded": []}
    reports = sorted(output_dir.glob(f"*/*_{PSEUDOLABEL_OUTPUTS['report']}"))
    passed = []
    for p in reports:
        r = json.loads(p.read_text())
        c = r["confidence"]
        info = r.get("inferer", {})
        rows.append(
            {
                "case_id": r["case_id"],
                "status": "done",
                "included": c["passed"],
                "reasons": "; ".join(c["reasons"]),
                "lung_ml_total": r["lung_ml"].get("total"),
                "lung_ml_right": r["lung_ml"].get("right"),
                "lung_ml_left": r["lung_ml"].get("left"),
                "mean_predicted_iou": c["mean_predicted_iou"],
                "agreement_dice": c["agreement_dice"],
                "kept_share": c["kept_share"],
                "candidates": info.get("candidates"),
                "kept": info.get("kept"),
                "slices_with_lung": info.get("slices_with_lung"),
                "seconds": info.get("seconds"),
                "image": r["image"],
                "label": r["label"],
            }
        )
        entry = {"image": r["image"], "label": r["label"], "case_id": r["case_id"]}
        if c["passed"]:
            passed.append(entry)
        else:
            datalist["excluded"].append({**entry, "reasons": c["reasons"]})
    done_ids = {r["case_id"] for r in rows}
    for f in sorted(output_dir.glob("failed*.json")):
        for item in json.loads(f.read_text()).get("failed", []):
            case = str(item.get("case"))
            if Path(case).name in done_ids or case in done_ids:
                continue
            rows.append({"case_id": case, "status": "skipped", "included": False, "reasons": item.get("reason", "")})
            datalist["excluded"].append({"case_id": case, "reasons": [item.get("reason", "")]})
    order = sorted(range(len(passed)), key=lambda i: passed[i]["case_id"])
    random.Random(seed).shuffle(order)
    n_val = int(round(len(passed) * float(validation_fraction)))
    if len(passed) >= 2:
        n_val = min(max(n_val, 1), len(passed) - 1)
    else:
        n_val = 0
    datalist["validation"] = sorted((passed[i] for i in order[:n_val]), key=lambda e: e["case_id"])
    datalist["training"] = sorted((passed[i] for i in order[n_val:]), key=lambda e: e["case_id"])
    with atomic_path(output_dir / "qc.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(QC_COLUMNS), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)
    summary = {
        "cases": len(rows),
        "done": len(reports),
        "included": len(passed),
        "excluded": len(datalist["excluded"]),
        "training": len(datalist["training"]),
        "validation": len(datalist["validation"]),
    }
    write_json_atomic(output_dir / "qc.json", {"summary": summary, "cases": rows})
    write_json_atomic(output_dir / "datalist.json", datalist)
    log.info("pseudolabel: %s", summary)
    return summary


def segmentation_datalist(
    dataset_dir: str | Path,
    output_dir: str | Path,
    cases: Sequence[dict] | None = None,
    exclude: Sequence[str] = (),
    overwrite: bool = False,
) -> list[dict]:
    """Volumes to segment (``cases``, else the scans under ``dataset_dir``), less those already done."""
    found = list(cases) if cases is not None else scan_datalist(dataset_dir, exclude)
    todo = [
        c
        for c in found
        if overwrite or not case_paths(output_dir, c["case_id"], SEGMENTATION_OUTPUTS)["report"].is_file()
    ]
    if len(todo) < len(found):
        log.info(
            "segment: %d case(s) already done in %s (skipped; overwrite=True redoes them)",
            len(found) - len(todo),
            output_dir,
        )
    return todo


__all__ = [
    "DEFAULT_EXCLUDE",
    "QC_COLUMNS",
    "merge_pseudolabels",
    "phantom_datalist",
    "probmap_datalist",
    "pseudolabel_datalist",
    "scan_datalist",
    "segmentation_datalist",
]
