"""SA-2 over a dataset: which cases to map, a fault-tolerant MONAI evaluator, the writer and the scores.

Outputs of case ``<id>`` go to ``output_dir/<id>/`` (MONAI SaveImaged's folder-per-case layout):
``<id>_probmap.nii.gz`` (float32, one channel per class, 4D on the input grid and affine),
``<id>_lung_mask.nii.gz`` (uint8 0/1), ``<id>_lung_sides.nii.gz`` (1 right, 2 left), optionally
``<id>_overlay.png``, and last ``<id>_probmap.json`` (threshold used, lung volumes, settings):
the JSON marks the case done, so a re-run skips it. Every file is written to a temporary name
and renamed, so a crash or a kill never leaves half a case behind.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.classes import CLASS_NAMES, LABEL_OF
from common.engines.cases import CaseEvaluator, _as_numpy, case_paths, first_affine, write_scores
from common.io.atomic import write_json_atomic
from common.io.nifti import save_nifti_array

log = logging.getLogger(__name__)

REPORT_FORMAT = "probmap_case/1"
POSTFIXES = {
    "probmap": "probmap.nii.gz",
    "lung_mask": "lung_mask.nii.gz",
    "lung_sides": "lung_sides.nii.gz",
    "report": "probmap.json",
    "overlay": "overlay.png",
}
DEFAULT_EXCLUDE = (
    "*_label.nii.gz",
    "*_lungs.nii.gz",
    "*_label.nrrd",
    "*_seg.nii.gz",
    "*_probmap.nii.gz",
    "*_lung_mask.nii.gz",
    "*_lung_sides.nii.gz",
)


def case_outputs(output_dir: str | Path, case_id: str) -> dict[str, Path]:
    """The paths a case's outputs go to (``POSTFIXES`` keys)."""
    return case_paths(output_dir, case_id, POSTFIXES)


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
    todo = [c for c in found if overwrite or not case_outputs(output_dir, c["case_id"])["report"].is_file()]
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


# --------------------------------------------------------------------------- writing


class SaveProbmapd(MapTransform):
    """Write one case's probability map, lung mask, sides, overlay and (last) its JSON report."""

    def __init__(
        self,
        output_dir: str | Path,
        keys: KeysCollection = "pred",
        mask_key: str = "lung_mask",
        sides_key: str = "lung_sides",
        image_key: str = "image",
        class_names: Sequence[str] = CLASS_NAMES,
        overlay: bool = False,
        inferer=None,
        settings: dict | None = None,
    ):
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.mask_key, self.sides_key, self.image_key = mask_key, sides_key, image_key
        self.class_names = list(class_names)
        self.overlay, self.inferer, self.settings = bool(overlay), inferer, dict(settings or {})

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        key = self.first_key(d)
        case_id = str(d.get("case_id") or Path(str(d[self.image_key].meta.get("filename_or_obj", "case"))).name)
        paths = case_outputs(self.output_dir, case_id)
        prob = _as_numpy(d[key])
        affine = first_affine(d[self.image_key])  # the input's grid and affine
        if not np.all(np.isfinite(prob)):
            raise ValueError(f"{case_id}: non-finite values in the probability map; nothing written")
        save_nifti_array(np.moveaxis(prob, 0, -1), affine, paths["probmap"], np.float32)
        mask = _as_numpy(d[self.mask_key])[0].astype(np.uint8)
        save_nifti_array(mask, affine, paths["lung_mask"], np.uint8)
        if self.sides_key in d:
            save_nifti_array(_as_numpy(d[self.sides_key])[0].astype(np.uint8), affine, paths["lung_sides"], np.uint8)
        hu = _as_numpy(d[self.image_key])[0]
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        ml = d.get(f"{self.sides_key}_ml") or {"total": float(mask.sum() * np.prod(spacing) / 1000.0)}
        warnings = []
        if not mask.any():
            warnings.append("no lung found: the lung channel does not pass the threshold anywhere (empty mask written)")
        info = dict(getattr(self.inferer, "last_info", {}) or {})
        if info.get("empty_slices"):
            warnings.append(f"{len(info['empty_slices'])} slice(s) without contrast map to no class")
        if self.overlay:
            from common.report import save_probmap_overlay_png

            save_probmap_overlay_png(paths["overlay"], hu, prob, mask, affine, self.class_names, title=case_id)
        report = {
            "format": REPORT_FORMAT,
            "case_id": case_id,
            "source": str(d[self.image_key].meta.get("filename_or_obj", ""))
            if hasattr(d[self.image_key], "meta")
            else "",
            "shape": list(mask.shape),
            "spacing_mm": [round(float(s), 4) for s in spacing],
            "class_names": self.class_names,
            "threshold": d.get(f"{self.mask_key}_threshold"),
            "threshold_method": d.get(f"{self.mask_key}_threshold_method"),
            "lung_ml": {k: round(float(v), 1) for k, v in ml.items()},
            "lung_found": bool(mask.any()),
            "warnings": warnings,
            "inferer": {k: v for k, v in info.items() if k != "empty_slices"}
            | {"empty_slices": len(info.get("empty_slices", []))},
            "settings": self.settings,
            "outputs": {k: str(p) for k, p in paths.items() if p.exists() and k != "report"},
        }
        d["probmap_report"] = report
        write_json_atomic(paths["report"], report)  # last: its presence marks the case done
        return d


# --------------------------------------------------------------------------- scores


def score_case(
    d: dict,
    class_names: Sequence[str] = CLASS_NAMES,
    tau: float = 0.5,
    prob_key: str = "pred",
    mask_key: str = "lung_mask",
    label_key: str = "label",
    lungs_key: str = "lungs",
) -> dict:
    """Dice and IoU of the cleaned lung mask against the lung field (``lungs`` > 0) and of every channel
    thresholded at ``tau`` (Eq. 8) against its class in the label map."""
    from common.metrics import dice_score, iou_score

    row: dict = {"case_id": d.get("case_id")}
    mask = _as_numpy(d[mask_key])[0] > 0
    if lungs_key in d and d[lungs_key] is not None:
        field = _as_numpy(d[lungs_key]).reshape(mask.shape) > 0
        row["lung_mask_dice"], row["lung_mask_iou"] = dice_score(mask, field), iou_score(mask, field)
    if label_key in d and d[label_key] is not None:
        label = _as_numpy(d[label_key]).reshape(mask.shape).round().astype(np.int16)
        prob = _as_numpy(d[prob_key])
        for c, name in enumerate(class_names):
            if name not in LABEL_OF:
                continue
            truth, pred = label == LABEL_OF[name], prob[c] >= tau
            key = name.replace(" ", "_")
            row[f"{key}_dice"], row[f"{key}_iou"] = dice_score(pred, truth), iou_score(pred, truth)
    return row


# --------------------------------------------------------------------------- the evaluator


class ProbmapEvaluator(CaseEvaluator):
    """SA-2 over a dataset: the inferer maps each case's HU volume to similarity maps on its grid,
    then ``postprocessing``, ``scorer`` and ``saver`` run as :class:`CaseEvaluator` says."""

    stage = "probmap"

    def predict(self, engine, item: dict) -> dict:
        from monai.data import MetaTensor

        image = item["image"].to(engine.state.device)
        with engine.mode(engine.network):
            pred = engine.inferer(image[None], engine.network)[0]
        # the prediction lives on the input's grid: same affine and meta (pixdim for smoothing)
        pred = MetaTensor(pred.as_subclass(torch.Tensor).cpu(), affine=image.affine, meta=dict(image.meta))
        return {**item, "pred": pred}


__all__ = [
    "DEFAULT_EXCLUDE",
    "ProbmapEvaluator",
    "SaveProbmapd",
    "case_outputs",
    "phantom_datalist",
    "probmap_datalist",
    "scan_datalist",
    "score_case",
    "write_scores",
]
