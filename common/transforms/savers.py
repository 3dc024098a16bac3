"""The writers at the end of each stage's post-processing (MONAI's place for ``SaveImaged``): one case's files
under ``output_dir/<id>/<id>_<postfix>`` (SaveImaged's folder-per-case layout), each through a temporary name,
the case's JSON report last, its presence marking the case done so that a re-run skips it.

- SA-2 (:class:`SaveProbmapd`): ``<id>_probmap.nii.gz`` (float32, one channel per class, 4D on the input grid and
  affine), ``<id>_lung_mask.nii.gz`` (uint8 0/1), ``<id>_lung_sides.nii.gz`` (1 right, 2 left), optionally
  ``<id>_overlay.png``, and last ``<id>_probmap.json`` (threshold used, lung volumes, settings).
- SA-3a (:class:`SavePseudoLabeld`): ``<id>_pseudo_label.nii.gz`` (uint8 on the CT's grid: 1 right lung, 2 left
  lung), optionally ``<id>_pseudo_overlay.png``, and last ``<id>_pseudolabel.json`` (confidence, QC verdict, volumes).
- SA-3b (:class:`SaveSegmentationd`): ``<id>_lung_mask.nii.gz``, ``<id>_lung_probability.nii.gz``,
  ``<id>_lung_sides.nii.gz`` and last ``<id>_report.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.classes import CLASS_NAMES
from common.io.atomic import write_json_atomic
from common.io.nifti import as_numpy, case_paths, first_affine, save_nifti_array
from common.metrics import case_confidence, lung_report

log = logging.getLogger(__name__)


PROBMAP_REPORT_FORMAT = "probmap_case/1"


PROBMAP_OUTPUTS = {
    "probmap": "probmap.nii.gz",
    "lung_mask": "lung_mask.nii.gz",
    "lung_sides": "lung_sides.nii.gz",
    "report": "probmap.json",
    "overlay": "overlay.png",
}


def probmap_outputs(output_dir: str | Path, case_id: str) -> dict[str, Path]:
    """The paths a case's outputs go to (``PROBMAP_OUTPUTS`` keys)."""
    return case_paths(output_dir, case_id, PROBMAP_OUTPUTS)


PSEUDOLABEL_REPORT_FORMAT = "pseudolabel_case/1"


PSEUDOLABEL_OUTPUTS = {"label": "pseudo_label.nii.gz", "overlay": "pseudo_overlay.png", "report": "pseudolabel.json"}


def pseudolabel_outputs(output_dir: str | Path, case_id: str) -> dict[str, Path]:
    """The paths a case's outputs go to (``PSEUDOLABEL_OUTPUTS`` keys)."""
    return case_paths(output_dir, case_id, PSEUDOLABEL_OUTPUTS)


SEGMENTATION_OUTPUTS = {
    "mask": "lung_mask.nii.gz",
    "probability": "lung_probability.nii.gz",
    "sides": "lung_sides.nii.gz",
    "report": "report.json",
}


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
        paths = probmap_outputs(self.output_dir, case_id)
        prob = as_numpy(d[key])
        affine = first_affine(d[self.image_key])  # the input's grid and affine
        if not np.all(np.isfinite(prob)):
            raise ValueError(f"{case_id}: non-finite values in the probability map; nothing written")
        save_nifti_array(np.moveaxis(prob, 0, -1), affine, paths["probmap"], np.float32)
        mask = as_numpy(d[self.mask_key])[0].astype(np.uint8)
        save_nifti_array(mask, affine, paths["lung_mask"], np.uint8)
        if self.sides_key in d:
            save_nifti_array(as_numpy(d[self.sides_key])[0].astype(np.uint8), affine, paths["lung_sides"], np.uint8)
        hu = as_numpy(d[self.image_key])[0]
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
            "format": PROBMAP_REPORT_FORMAT,
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
        paths = pseudolabel_outputs(self.output_dir, case_id)
        affine = first_affine(d[self.image_key])
        mask = as_numpy(d[self.first_key(d)])[0] > 0
        sides = as_numpy(d[self.sides_key])[0].astype(np.uint8) if self.sides_key in d else mask.astype(np.uint8)
        save_nifti_array(sides, affine, paths["label"], np.uint8)
        reference = as_numpy(d[self.reference_key])[0] > 0.5
        ml = {k: round(float(v), 1) for k, v in (d.get(f"{self.sides_key}_ml") or {}).items()}
        if "total" not in ml:
            ml["total"] = round(float(mask.sum() * np.prod(np.linalg.norm(affine[:3, :3], axis=0)) / 1000.0), 1)
        info = dict(d.get("pseudolabel_info") or {})
        confidence = case_confidence(mask, reference, info, ml["total"], **self.qc)
        if self.overlay:
            from common.report import save_pseudolabel_overlay_png

            save_pseudolabel_overlay_png(
                paths["overlay"], as_numpy(d[self.image_key])[0], reference, sides, affine, title=case_id
            )
        report = {
            "format": PSEUDOLABEL_REPORT_FORMAT,
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


class SaveSegmentationd:
    """Write one case's lung mask, probability, sides and report (``<output_dir>/<case>/<case>_*``), each
    through a temporary name; ``hu_key`` holds the HU volume for the report."""

    def __init__(
        self,
        output_dir: str | Path,
        pred_key: str = "pred",
        probability_key: str | None = "probability",
        sides_key: str = "lung_sides",
        hu_key: str = "hu",
        settings: dict | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.pred_key, self.probability_key, self.sides_key, self.hu_key = pred_key, probability_key, sides_key, hu_key
        self.settings = dict(settings or {})

    def __call__(self, d: dict) -> dict:
        case_id = str(d.get("case_id") or Path(str(d[self.pred_key].meta.get("filename_or_obj", "case"))).name)
        paths = case_paths(self.output_dir, case_id, SEGMENTATION_OUTPUTS)
        affine = first_affine(d[self.pred_key])
        mask = as_numpy(d[self.pred_key])[0] > 0
        save_nifti_array(mask, affine, paths["mask"], dtype=np.uint8)
        if self.probability_key is not None and self.probability_key in d:
            save_nifti_array(as_numpy(d[self.probability_key])[0], affine, paths["probability"])
        if self.sides_key in d:
            save_nifti_array(as_numpy(d[self.sides_key])[0], affine, paths["sides"], dtype=np.uint8)
        report = {
            "case_id": case_id,
            "image": str(d[self.pred_key].meta.get("filename_or_obj", "")),
            "shape": list(mask.shape),
        }
        if self.hu_key in d:
            report.update(
                lung_report(mask, as_numpy(d[self.hu_key]).reshape(mask.shape), affine, d.get(f"{self.sides_key}_ml"))
            )
        if d.get("field_of_view") is not None:  # the in-plane box the network ran on (PatientFieldOfViewd)
            report["field_of_view"] = [int(v) for v in as_numpy(d["field_of_view"]).ravel()]
        report["settings"] = self.settings
        write_json_atomic(paths["report"], report)
        return {**d, "report": report}


__all__ = [
    "PROBMAP_OUTPUTS",
    "PROBMAP_REPORT_FORMAT",
    "PSEUDOLABEL_OUTPUTS",
    "PSEUDOLABEL_REPORT_FORMAT",
    "SEGMENTATION_OUTPUTS",
    "SaveProbmapd",
    "SavePseudoLabeld",
    "SaveSegmentationd",
    "probmap_outputs",
    "pseudolabel_outputs",
]
