"""SA-2 over a dataset: which cases to map, a fault-tolerant MONAI evaluator, the writer and the scores.

Outputs of case ``<id>`` go to ``output_dir/<id>/`` (MONAI SaveImaged's folder-per-case layout):
``<id>_probmap.nii.gz`` (float32, one channel per class, 4D on the input grid and affine),
``<id>_lung_mask.nii.gz`` (uint8 0/1), ``<id>_lung_sides.nii.gz`` (1 right, 2 left), optionally
``<id>_overlay.png``, and last ``<id>_probmap.json`` (threshold used, lung volumes, settings):
the JSON marks the case done, so a re-run skips it. Every file is written to a temporary name
and renamed, so a crash or a kill never leaves half a case behind.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import decollate_batch
from monai.engines import SupervisedEvaluator
from monai.transforms import MapTransform

from common.classes import CLASS_NAMES, LABEL_OF
from common.data.dataset import SKIPPED_KEY
from common.io.atomic import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

REPORT_FORMAT = "probmap_case/1"
POSTFIXES = {"probmap": "probmap.nii.gz", "lung_mask": "lung_mask.nii.gz", "lung_sides": "lung_sides.nii.gz", "report": "probmap.json", "overlay": "overlay.png"}
DEFAULT_EXCLUDE = ("*_label.nii.gz", "*_lungs.nii.gz", "*_label.nrrd", "*_seg.nii.gz", "*_probmap.nii.gz", "*_lung_mask.nii.gz", "*_lung_sides.nii.gz")


def case_outputs(output_dir: str | Path, case_id: str) -> dict[str, Path]:
    """The paths a case's outputs go to (``POSTFIXES`` keys)."""
    folder = Path(output_dir) / case_id
    return {k: folder / f"{case_id}_{v}" for k, v in POSTFIXES.items()}


def probmap_datalist(dataset_dir: str | Path, output_dir: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE, overwrite: bool = False) -> list[dict]:
    """One ``{"image", "case_id"}`` per scan under ``dataset_dir`` (DICOM series folders, NIfTI, NRRD, ...)
    that has no finished output yet (``overwrite=True``: all). An unreadable DICOM file is listed too
    and fails, with its reason, when loaded."""
    from common.qc import discover_cases

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.exists():
        raise FileNotFoundError(f"{dataset_dir}: dataset_dir does not exist")
    found = [c for c in discover_cases(dataset_dir) if not any(fnmatch.fnmatch(Path(c.path).name, pat) for pat in exclude)]
    if not found:
        raise ValueError(f"{dataset_dir}: no CT scan found (looked for DICOM series, NIfTI, NRRD/MHA, npz and PNG stacks)")
    todo, done = [], []
    for c in found:
        (done if case_outputs(output_dir, c.case_id)["report"].is_file() and not overwrite else todo).append(c)
    if done:
        log.info("probmap: %d of %d cases already done in %s (skipped; overwrite=True redoes them)", len(done), len(found), output_dir)
    return [{"image": str(c.path), "case_id": c.case_id} for c in todo]


def phantom_datalist(phantom_dir: str | Path, n: int = 3, seed: int = 100, prefix: str = "heldout_phantom") -> list[dict]:
    """``n`` phantoms from seeds SA-1 never saw (generated once into ``phantom_dir``), with their label maps:
    ``{"image", "label", "lungs", "case_id"}``."""
    from common.default_data import make_phantoms

    cases = make_phantoms(Path(phantom_dir), int(n), seed=int(seed), prefix=prefix)
    return [{"image": str(c["path"]), "label": str(c["label"]), "lungs": str(c["lungs"]), "case_id": c["id"]} for c in cases]


# --------------------------------------------------------------------------- writing


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().as_subclass(torch.Tensor).numpy()
    return np.asarray(x)


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype=np.float32) -> Path:
    """An (X, Y, Z) or channel-last (X, Y, Z, C) array as NIfTI with ``affine``, through a temporary name."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


class SaveProbmapd(MapTransform):
    """Write one case's probability map, lung mask, sides, overlay and (last) its JSON report."""

    def __init__(self, output_dir: str | Path, keys: KeysCollection = "pred", mask_key: str = "lung_mask", sides_key: str = "lung_sides",
                 image_key: str = "image", class_names: Sequence[str] = CLASS_NAMES, overlay: bool = False, inferer=None, settings: dict | None = None):
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
        affine = _as_numpy(d[self.image_key].affine).reshape(-1, 4, 4)[0]  # the input's grid and affine
        if not np.all(np.isfinite(prob)):
            raise ValueError(f"{case_id}: non-finite values in the probability map; nothing written")
        save_nifti_atomic(np.moveaxis(prob, 0, -1), affine, paths["probmap"], np.float32)
        mask = _as_numpy(d[self.mask_key])[0].astype(np.uint8)
        save_nifti_atomic(mask, affine, paths["lung_mask"], np.uint8)
        if self.sides_key in d:
            save_nifti_atomic(_as_numpy(d[self.sides_key])[0].astype(np.uint8), affine, paths["lung_sides"], np.uint8)
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
            "source": str(d[self.image_key].meta.get("filename_or_obj", "")) if hasattr(d[self.image_key], "meta") else "",
            "shape": list(mask.shape),
            "spacing_mm": [round(float(s), 4) for s in spacing],
            "class_names": self.class_names,
            "threshold": d.get(f"{self.mask_key}_threshold"),
            "threshold_method": d.get(f"{self.mask_key}_threshold_method"),
            "lung_ml": {k: round(float(v), 1) for k, v in ml.items()},
            "lung_found": bool(mask.any()),
            "warnings": warnings,
            "inferer": {k: v for k, v in info.items() if k != "empty_slices"} | {"empty_slices": len(info.get("empty_slices", []))},
            "settings": self.settings,
            "outputs": {k: str(p) for k, p in paths.items() if p.exists() and k != "report"},
        }
        d["probmap_report"] = report
        write_json_atomic(paths["report"], report)  # last: its presence marks the case done
        return d


# --------------------------------------------------------------------------- scores


def score_case(d: dict, class_names: Sequence[str] = CLASS_NAMES, tau: float = 0.5, prob_key: str = "pred", mask_key: str = "lung_mask",
               label_key: str = "label", lungs_key: str = "lungs") -> dict:
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


def write_scores(rows: list[dict], output_dir: str | Path, name: str = "scores") -> dict:
    """``<name>.csv`` (one row per case) and ``<name>.json`` (per-metric mean, sd, n); returns the summary."""
    output_dir = Path(output_dir)
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "case_id"]
    summary = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if r.get(k) is not None], dtype=float)
        if vals.size:
            summary[k] = {"mean": float(vals.mean()), "sd": float(vals.std()), "min": float(vals.min()), "n": int(vals.size)}
    with atomic_path(output_dir / f"{name}.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case_id"] + keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    write_json_atomic(output_dir / f"{name}.json", {"cases": rows, "summary": summary})
    return summary


# --------------------------------------------------------------------------- the evaluator


class ProbmapEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` whose unit of work is one case: inference, ``postprocessing`` and
    ``saver`` (and ``scorer`` when labels are given) run per case, and a case that fails, to load
    or later, is logged and listed in ``failed`` (``failed.json`` under ``output_dir``) while the
    run goes on. Finished rows of ``scorer`` go to ``scores.csv`` / ``scores.json`` and their means
    into ``state.metrics`` (StatsHandler, MLflow)."""

    def __init__(self, device, val_data_loader, network, inferer, postprocessing: Callable | None = None, saver: Callable | None = None,
                 scorer: Callable | None = None, output_dir: str | Path | None = None, **kwargs):
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, inferer=inferer, **kwargs)
        self.case_postprocessing, self.saver, self.scorer = postprocessing, saver, scorer
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.failed: list[dict] = []
        self.done: list[dict] = []
        self.rows: list[dict] = []
        self.case_seconds: list[float] = []

    def run(self, *args, **kwargs) -> None:
        if self.data_loader is not None and len(self.data_loader) == 0:
            log.info("probmap: nothing to do (every case is done)")
            return
        super().run(*args, **kwargs)
        self._finish()

    def _finish(self) -> None:
        if self.output_dir is None:
            return
        if self.rows:
            summary = write_scores(self.rows, self.output_dir)
            self.state.metrics.update({k: v["mean"] for k, v in summary.items()})
            log.info("probmap scores (mean over %d cases): %s", len(self.rows), {k: round(v["mean"], 4) for k, v in summary.items()})
        write_json_atomic(self.output_dir / "failed.json", {"failed": self.failed})
        write_json_atomic(self.output_dir / "probmap_run.json", {"done": self.done, "failed": self.failed})
        if self.failed:
            log.warning("probmap: %d case(s) failed: %s", len(self.failed), [f["case"] for f in self.failed])

    def _iteration(self, engine, batchdata: dict) -> dict:
        for image, reason in batchdata.pop(SKIPPED_KEY, []):
            self.failed.append({"case": image, "reason": reason})
        if not batchdata:
            return {}
        outputs = []
        items = decollate_batch(batchdata, detach=True)
        for item in items:
            name = str(item.get("case_id") or item.get("image"))
            start = time.perf_counter()
            try:
                image = item["image"].to(engine.state.device if hasattr(engine.state, "device") else self.device)
                with engine.mode(engine.network):
                    pred = engine.inferer(image[None], engine.network)[0]
                from monai.data import MetaTensor

                # the prediction lives on the input's grid: same affine and meta (pixdim for smoothing)
                pred = MetaTensor(pred.as_subclass(torch.Tensor).cpu(), affine=image.affine, meta=dict(image.meta))
                out = {**item, "pred": pred}
                if self.case_postprocessing is not None:
                    out = self.case_postprocessing(out)
                if self.scorer is not None:
                    self.rows.append(self.scorer(out))
                if self.saver is not None:
                    out = self.saver(out)
                self.case_seconds.append(time.perf_counter() - start)
                outputs.append({"case_id": name, "seconds": self.case_seconds[-1]})
                self.done.append({"case_id": name, "seconds": round(self.case_seconds[-1], 2), "shape": list(image.shape[1:])})
                log.info("probmap: %s done in %.1f s (%s voxels)", name, self.case_seconds[-1], " x ".join(map(str, image.shape[1:])))
            except Exception as e:  # one bad case is one failed case
                cause = e
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                log.exception("probmap: case %s failed", name)
                self.failed.append({"case": name, "reason": f"{type(cause).__name__}: {cause}"})
        return outputs


__all__ = [
    "DEFAULT_EXCLUDE",
    "ProbmapEvaluator",
    "SaveProbmapd",
    "case_outputs",
    "phantom_datalist",
    "probmap_datalist",
    "save_nifti_atomic",
    "score_case",
    "write_scores",
]
