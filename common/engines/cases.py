"""Running a stage case by case: a fault-tolerant MONAI evaluator, each stage's own, and score tables.

Every stage that maps whole scans to files shares :class:`CaseEvaluator`: one case is one unit of work, a case that
fails is listed with its reason and the run goes on, and what is written goes through a temporary name so that a
crash or a kill never leaves half a file. :class:`ProbmapEvaluator` (SA-2), :class:`PseudoLabelEvaluator` (SA-3a)
and :class:`SegmentationEvaluator` (SA-3b) say only how a case is predicted; its datalist comes from
:mod:`common.data.datalists`, its writer from :mod:`common.transforms.savers`, its scorer from :mod:`common.metrics`.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.data import decollate_batch
from monai.engines import SupervisedEvaluator

from common.data.dataset import SKIPPED_KEY
from common.io.atomic import atomic_path, write_json_atomic
from common.io.nifti import as_numpy, first_affine

log = logging.getLogger(__name__)


def write_scores(rows: list[dict], output_dir: str | Path, name: str = "scores") -> dict:
    """``<name>.csv`` (one row per case) and ``<name>.json`` (per-metric mean, sd, n); returns the summary."""
    output_dir = Path(output_dir)
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "case_id"]
    summary = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if r.get(k) is not None], dtype=float)
        if vals.size:
            summary[k] = {
                "mean": float(vals.mean()),
                "sd": float(vals.std()),
                "min": float(vals.min()),
                "n": int(vals.size),
            }
    with atomic_path(output_dir / f"{name}.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case_id"] + keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    write_json_atomic(output_dir / f"{name}.json", {"cases": rows, "summary": summary})
    return summary


class CaseEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` whose unit of work is one case: :meth:`predict` (the stage's inference),
    ``postprocessing`` and ``saver`` (and ``scorer`` when labels are given) run per case, and a case
    that fails, to load or later, is logged and listed in ``failed`` (``failed.json`` under
    ``output_dir``) while the run goes on. Finished rows of ``scorer`` go to ``scores.csv`` /
    ``scores.json`` and their means into ``state.metrics`` (StatsHandler, MLflow), with ``cases_done``,
    ``cases_failed`` and ``mean_seconds_per_case``."""

    stage = "case"
    run_suffix = ""  # "_rank<r>" under torchrun: each rank writes its own run files

    def __init__(
        self,
        device,
        val_data_loader,
        network,
        inferer,
        postprocessing: Callable | None = None,
        saver: Callable | None = None,
        scorer: Callable | None = None,
        output_dir: str | Path | None = None,
        **kwargs,
    ):
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, inferer=inferer, **kwargs)
        self.case_postprocessing, self.saver, self.scorer = postprocessing, saver, scorer
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.failed: list[dict] = []
        self.done: list[dict] = []
        self.rows: list[dict] = []
        self.case_seconds: list[float] = []
        self._finished = False
        self._attach_finish()

    def _attach_finish(self) -> None:
        from ignite.engine import Events

        if not self.has_event_handler(self._finish_epoch, Events.EPOCH_COMPLETED):
            self.add_event_handler(Events.EPOCH_COMPLETED, self._finish_epoch)

    def _register_handlers(self, handlers) -> None:
        # the run's files and score means are ready at EPOCH_COMPLETED before any handler of the config
        # reads them there (StatsHandler, MLFlowHandler's metrics) or at COMPLETED (MLflow artifacts)
        self._attach_finish()
        super()._register_handlers(handlers)

    def _finish_epoch(self, engine=None) -> None:
        self._finish()

    def predict(self, engine, item: dict) -> dict:
        """The stage's inference on one decollated case; returns the item with its prediction added."""
        raise NotImplementedError

    def run(self, *args, **kwargs) -> None:
        if self.data_loader is not None and len(self.data_loader) == 0:
            log.info("%s: nothing to do (every case is done)", self.stage)
            self._finish()
            return
        self._finished = False
        super().run(*args, **kwargs)
        if not self._finished:  # no EPOCH_COMPLETED (e.g. terminated early)
            self._finish()

    def _finish(self) -> None:
        self._finished = True
        if self.output_dir is None:
            return
        if self.rows:
            summary = write_scores(self.rows, self.output_dir, name=f"scores{self.run_suffix}")
            self.state.metrics.update({k: v["mean"] for k, v in summary.items()})
            log.info(
                "%s scores (mean over %d cases): %s",
                self.stage,
                len(self.rows),
                {k: round(v["mean"], 4) for k, v in summary.items()},
            )
        # counts for every run, so an inference run on unlabelled scans also has metrics to track (MLflow)
        self.state.metrics.update({"cases_done": len(self.done), "cases_failed": len(self.failed)})
        if self.case_seconds:
            self.state.metrics["mean_seconds_per_case"] = sum(self.case_seconds) / len(self.case_seconds)
        write_json_atomic(self.output_dir / f"failed{self.run_suffix}.json", {"failed": self.failed})
        write_json_atomic(
            self.output_dir / f"{self.stage}_run{self.run_suffix}.json", {"done": self.done, "failed": self.failed}
        )
        if self.failed:
            log.warning("%s: %d case(s) failed: %s", self.stage, len(self.failed), [f["case"] for f in self.failed])

    def _iteration(self, engine, batchdata: dict) -> dict:
        for image, reason in batchdata.pop(SKIPPED_KEY, []):
            self.failed.append({"case": image, "reason": reason})
        if not batchdata:
            return {}
        outputs = []
        for item in decollate_batch(batchdata, detach=True):
            name = str(item.get("case_id") or item.get("image"))
            start = time.perf_counter()
            try:
                out = self.predict(engine, item)
                if self.case_postprocessing is not None:
                    out = self.case_postprocessing(out)
                if self.scorer is not None:
                    self.rows.append(self.scorer(out))
                if self.saver is not None:
                    out = self.saver(out)
                self.case_seconds.append(time.perf_counter() - start)
                outputs.append({"case_id": name, "seconds": self.case_seconds[-1]})
                shape = list(item["image"].shape[1:]) if hasattr(item.get("image"), "shape") else None
                self.done.append({"case_id": name, "seconds": round(self.case_seconds[-1], 2), "shape": shape})
                log.info("%s: %s done in %.1f s", self.stage, name, self.case_seconds[-1])
            except Exception as e:  # one bad case is one failed case
                cause = e
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                log.exception("%s: case %s failed", self.stage, name)
                self.failed.append({"case": name, "reason": f"{type(cause).__name__}: {cause}"})
        return outputs


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


class SegmentationEvaluator(CaseEvaluator):
    """Whole volumes through a 2D network slice by slice (:class:`SliceEnsembleInferer`), then
    ``postprocessing`` (threshold, 3D clean-up, sides), ``scorer`` and ``saver``; one failing case is
    one failed case. ``image`` is the HU-windowed volume the network sees; ``skipped`` (files the
    dataset found missing at start-up) are recorded as failed."""

    stage = "segment"

    def __init__(self, *args, skipped: Sequence[dict] = (), slice_margin: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.slice_margin = int(slice_margin)
        self.failed.extend({"case": s.get("case", s.get("image")), "reason": s["reason"]} for s in skipped)

    def predict(self, engine, item: dict) -> dict:
        from monai.data import MetaTensor

        image = item["image"]
        slice_mask = None
        region = item.get("region")  # the SA-2 lung mask, when given: only its slices (and a margin) are segmented
        if region is not None:
            if tuple(region.shape[1:]) != tuple(image.shape[1:]):
                raise ValueError(
                    f"{item.get('case_id')}: the SA-2 lung mask is on another grid than the CT ({tuple(region.shape[1:])} vs {tuple(image.shape[1:])})"
                )
            touched = as_numpy(region).reshape(image.shape[1:]).reshape(-1, image.shape[-1]).max(axis=0) > 0.5
            from scipy import ndimage

            slice_mask = (
                ndimage.binary_dilation(touched, iterations=self.slice_margin)
                if self.slice_margin and touched.any()
                else touched
            )
        with engine.mode(engine.network), torch.no_grad():
            prob = engine.inferer(
                image[None], engine.network, slice_mask=slice_mask, field_of_view=item.get("field_of_view")
            )[0]
        return {**item, "pred": MetaTensor(prob, affine=image.affine, meta=dict(image.meta))}


__all__ = [
    "CaseEvaluator",
    "ProbmapEvaluator",
    "PseudoLabelEvaluator",
    "SegmentationEvaluator",
    "write_scores",
]
