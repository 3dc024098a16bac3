"""SA-3 pseudo labels over a dataset: which cases, the evaluator, the writer, per-case confidence and the merge.

Inputs per case: the CT and the probmap stage's outputs for it (``<probmap_dir>/<id>/<id>_probmap.nii.gz``
and ``<id>_lung_mask.nii.gz``). Outputs go to ``output_dir/<id>/``: ``<id>_pseudo_label.nii.gz``
(uint8 on the CT's grid: 1 right lung, 2 left lung), optionally ``<id>_pseudo_overlay.png``, and
last ``<id>_pseudolabel.json`` (confidence, QC verdict, volumes): the JSON marks the case done, so a
re-run skips it. Every file goes through a temporary name, so a crash or a kill never leaves half
a case behind; temporaries left by a killed run are removed when the next run starts.

:func:`merge_pseudolabels` reads every case's JSON (and every rank's ``failed*.json``) and writes
``datalist.json`` (MONAI decathlon style: ``training`` / ``validation`` for hsam_finetune, flagged
cases left out with their reasons) and ``qc.csv``. Under ``torchrun`` each rank takes every
``world_size``-th case, writes only its own cases, and rank 0 merges after a barrier.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.engines.cases import CaseEvaluator, _as_numpy, case_paths, first_affine
from common.engines.probmap import DEFAULT_EXCLUDE, scan_datalist
from common.engines.probmap import case_outputs as probmap_outputs
from common.io.atomic import atomic_path, remove_stale_temporaries, write_json_atomic
from common.io.nifti import save_nifti_array

log = logging.getLogger(__name__)

REPORT_FORMAT = "pseudolabel_case/1"
POSTFIXES = {"label": "pseudo_label.nii.gz", "overlay": "pseudo_overlay.png", "report": "pseudolabel.json"}
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


def case_outputs(output_dir: str | Path, case_id: str) -> dict[str, Path]:
    """The paths a case's outputs go to (``POSTFIXES`` keys)."""
    return case_paths(output_dir, case_id, POSTFIXES)


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
        if not overwrite and case_outputs(output_dir, c["case_id"])["report"].is_file():
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


# --------------------------------------------------------------------------- the evaluator


class PseudoLabelEvaluator(CaseEvaluator):
    """Algorithm 2 over a dataset: each case's CT and SA-2 lung map through :class:`PromptedSamInferer`,
    then ``postprocessing`` (3D clean-up, sides) and ``saver``. A case whose map is on another grid
    than its CT, or is empty, fails with that reason and the run goes on. ``skipped`` (cases without
    SA-2 outputs) are recorded as failed. ``rank`` / ``world_size`` name the per-rank files."""

    stage = "pseudolabel"

    def __init__(self, *args, skipped: Sequence[dict] = (), rank: int = 0, world_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.failed.extend(dict(s) for s in skipped)
        self.rank, self.world_size = int(rank), int(world_size)
        if self.world_size > 1:
            self.run_suffix = f"_rank{self.rank}"

    def predict(self, engine, item: dict) -> dict:
        image, region = item["image"], item["lung_mask"]
        case = item.get("case_id")
        if tuple(region.shape[1:]) != tuple(image.shape[1:]) or not np.allclose(
            first_affine(region), first_affine(image), atol=1e-3
        ):
            raise ValueError(
                f"{case}: the SA-2 lung mask {item.get('lung_mask_path', '')} is on another grid than its CT "
                f"(shape {tuple(region.shape[1:])} vs {tuple(image.shape[1:])}, or another affine)"
            )
        probmap = item.get("probmap")
        if probmap is not None and tuple(probmap.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(
                f"{case}: the SA-2 probability map {tuple(probmap.shape[1:])} is on another grid than its CT {tuple(image.shape[1:])}"
            )
        if not bool((region > 0.5).any()):
            raise ValueError(
                f"{case}: the SA-2 lung mask is empty (no lung passed the probability threshold), so there is nothing to prompt"
            )
        if probmap is not None and not bool(
            torch.isfinite(probmap.as_tensor() if hasattr(probmap, "as_tensor") else probmap).all()
        ):
            raise ValueError(f"{case}: the SA-2 probability map has non-finite values")
        with engine.mode(engine.network):
            pred = engine.inferer(
                image[None], engine.network, region=region[None], probmap=None if probmap is None else probmap[None]
            )[0]
        from monai.data import MetaTensor

        pred = MetaTensor(pred, affine=image.affine, meta=dict(image.meta))
        return {**item, "pred": pred, "pseudolabel_info": dict(engine.inferer.last_info)}


# --------------------------------------------------------------------------- confidence and writing


def case_confidence(
    pseudo: np.ndarray,
    reference: np.ndarray,
    info: dict,
    lung_ml: float,
    min_predicted_iou: float = 0.75,
    min_agreement: float = 0.875,
    min_kept_share: float = 0.5,
    lung_ml_range: Sequence[float] = (300.0, 9000.0),
) -> dict:
    """The case's confidence figures and QC verdict: SAM's mean predicted IoU of the kept candidates, the
    Dice between the pseudo label and the SA-2 lung mask, the share of candidates kept and the
    lung volume's plausibility; each figure under its bound is a reason to leave the case out."""
    from common.metrics import dice_score

    agreement = dice_score(np.asarray(pseudo) > 0, np.asarray(reference) > 0)
    candidates = int(info.get("candidates", 0))
    kept_share = float(info.get("kept", 0)) / candidates if candidates else 0.0
    iou = info.get("mean_predicted_iou")
    reasons = []
    if iou is None or iou < min_predicted_iou:
        reasons.append(f"SAM's mean predicted IoU {iou if iou is None else round(iou, 3)} < {min_predicted_iou}")
    if agreement < min_agreement:
        reasons.append(f"agreement with the SA-2 lung mask (Dice {agreement:.3f}) < {min_agreement}")
    if kept_share < min_kept_share:
        reasons.append(f"only {kept_share:.0%} of the SAM candidates passed the overlap vote (< {min_kept_share:.0%})")
    lo, hi = float(lung_ml_range[0]), float(lung_ml_range[1])
    if not lo <= lung_ml <= hi:
        reasons.append(f"lung volume {lung_ml:.0f} mL outside the plausible {lo:.0f}-{hi:.0f} mL")
    return {
        "mean_predicted_iou": None if iou is None else round(float(iou), 4),
        "agreement_dice": round(float(agreement), 4),
        "kept_share": round(kept_share, 4),
        "lung_ml_total": round(float(lung_ml), 1),
        "passed": not reasons,
        "reasons": reasons,
    }


class SavePseudoLabeld(MapTransform):
    """Write one case's pseudo label (1 right, 2 left, on the CT's grid), its overlay and (last) its JSON
    report with the confidence figures of :func:`case_confidence`."""

    def __init__(
        self,
        output_dir: str | Path,
        keys: KeysCollection = "pred",
        sides_key: str = "lung_sides",
        reference_key: str = "lung_mask",
        image_key: str = "image",
        overlay: bool = False,
        settings: dict | None = None,
        qc: dict | None = None,
    ):
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.sides_key, self.reference_key, self.image_key = sides_key, reference_key, image_key
        self.overlay, self.settings, self.qc = bool(overlay), dict(settings or {}), dict(qc or {})

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        case_id = str(d["case_id"])
        paths = case_outputs(self.output_dir, case_id)
        affine = first_affine(d[self.image_key])
        mask = _as_numpy(d[self.first_key(d)])[0] > 0
        sides = _as_numpy(d[self.sides_key])[0].astype(np.uint8) if self.sides_key in d else mask.astype(np.uint8)
        save_nifti_array(sides, affine, paths["label"], np.uint8)
        reference = _as_numpy(d[self.reference_key])[0] > 0.5
        ml = {k: round(float(v), 1) for k, v in (d.get(f"{self.sides_key}_ml") or {}).items()}
        if "total" not in ml:
            ml["total"] = round(float(mask.sum() * np.prod(np.linalg.norm(affine[:3, :3], axis=0)) / 1000.0), 1)
        info = dict(d.get("pseudolabel_info") or {})
        confidence = case_confidence(mask, reference, info, ml["total"], **self.qc)
        if self.overlay:
            from common.report import save_pseudolabel_overlay_png

            save_pseudolabel_overlay_png(
                paths["overlay"], _as_numpy(d[self.image_key])[0], reference, sides, affine, title=case_id
            )
        report = {
            "format": REPORT_FORMAT,
            "case_id": case_id,
            "image": str(d.get("image_path") or _source(d[self.image_key])),
            "label": str(paths["label"]),
            "probmap": str(d.get("probmap_path", "")),
            "shape": list(mask.shape),
            "lung_ml": ml,
            "confidence": confidence,
            "inferer": info,
            "settings": self.settings,
            "outputs": {k: str(p) for k, p in paths.items() if p.exists() and k != "report"},
        }
        d["pseudolabel_report"] = report
        write_json_atomic(paths["report"], report)  # last: its presence marks the case done
        return d


def _source(image) -> str:
    return str(getattr(image, "meta", {}).get("filename_or_obj", ""))


# --------------------------------------------------------------------------- merge


def merge_pseudolabels(output_dir: str | Path, validation_fraction: float = 0.2, seed: int = 0) -> dict:
    """Gather every finished case (``*/*_pseudolabel.json``) and every rank's failures into ``qc.csv``,
    ``qc.json`` and ``datalist.json`` (training / validation split of the cases that passed QC,
    seeded, at least one validation case when two or more passed; ``excluded`` with reasons)."""
    output_dir = Path(output_dir)
    rows, datalist = [], {"training": [], "validation": [], "excluded": []}
    reports = sorted(output_dir.glob(f"*/*_{POSTFIXES['report']}"))
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


__all__ = [
    "PseudoLabelEvaluator",
    "SavePseudoLabeld",
    "case_confidence",
    "case_outputs",
    "merge_pseudolabels",
    "pseudolabel_datalist",
    "score_pseudolabel",
]


def score_pseudolabel(
    d: dict, pred_key: str = "pred", reference_key: str = "lung_mask", lungs_key: str = "lungs"
) -> dict:
    """Dice and IoU of the pseudo label, and of the SA-2 lung mask it was prompted from, against the
    lung field (``lungs`` > 0); SAM's counts from the inferer alongside."""
    from common.metrics import dice_score, iou_score

    pseudo = _as_numpy(d[pred_key])[0] > 0
    field = _as_numpy(d[lungs_key]).reshape(pseudo.shape) > 0
    sa2 = _as_numpy(d[reference_key]).reshape(pseudo.shape) > 0.5
    info = d.get("pseudolabel_info") or {}
    return {
        "case_id": d.get("case_id"),
        "pseudo_dice": dice_score(pseudo, field),
        "pseudo_iou": iou_score(pseudo, field),
        "sa2_mask_dice": dice_score(sa2, field),
        "kept_share": (info.get("kept", 0) / info["candidates"]) if info.get("candidates") else 0.0,
        "mean_predicted_iou": info.get("mean_predicted_iou"),
    }
