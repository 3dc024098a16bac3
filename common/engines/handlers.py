"""ignite handlers the SA-1 bundle wires in its configs."""

from __future__ import annotations

import logging
from pathlib import Path

from ignite.engine import Engine, Events

from common.engines.clip import unwrap

log = logging.getLogger(__name__)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class SaveBestLungCLIP:
    """Attached to the evaluator: writes ``path`` (:meth:`LungCLIP.save_checkpoint`, self-describing, atomic)
    whenever the key validation metric improves. Only rank 0 writes. ``preprocessing`` (image size,
    slice size, HU window, ...) is stored with the weights for inference to read back."""

    def __init__(self, network, path: str | Path, preprocessing: dict | None = None):
        self.network = network
        self.path = Path(path)
        self.preprocessing = dict(preprocessing or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        # MONAI's evaluator updates best_metric / best_metric_epoch before user handlers run.
        if engine.state.best_metric_epoch != engine.state.epoch or not _is_rank0():
            return
        model = unwrap(self.network)
        model.preprocessing = {**model.preprocessing, **self.preprocessing}
        model.save_checkpoint(self.path)
        log.info("epoch %d: best %s %.4f, saved %s", engine.state.epoch, engine.state.key_metric_name, engine.state.best_metric, self.path)


class SkippedSamplesReport:
    """Attached to the trainer: at the end of training, logs how many samples could not be loaded, and which.

    ``dataset`` (optional) adds the entries its start-up check found missing.
    """

    def __init__(self, dataset=None, max_listed: int = 10):
        self.dataset = dataset
        self.max_listed = int(max_listed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def skipped(self, engine: Engine) -> list[tuple[str, str]]:
        missing = [(m["image"], m["reason"]) for m in getattr(self.dataset, "missing", [])]
        return missing + list(getattr(engine.state, "skipped", []))

    def __call__(self, engine: Engine) -> None:
        skipped = self.skipped(engine)
        engine.state.metrics["skipped_samples"] = len(skipped)
        if not skipped:
            log.info("training finished: no sample skipped")
            return
        unique = list(dict.fromkeys(skipped))
        listed = "; ".join(f"{img} ({why})" for img, why in unique[: self.max_listed])
        more = f" and {len(unique) - self.max_listed} more" if len(unique) > self.max_listed else ""
        log.warning("training finished: %d sample loads skipped (%d distinct files): %s%s", len(skipped), len(unique), listed, more)


class MetricsHistory:
    """Attached to the trainer after its ValidationHandler: appends each epoch's training and validation
    metrics to a JSON file (rewritten whole through a temporary name), for reports and plots."""

    def __init__(self, path: str | Path, evaluator=None):
        self.path = Path(path)
        self.evaluator = evaluator
        self.history: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from common.io import write_json_atomic

        row = {"epoch": int(engine.state.epoch), **{k: float(v) for k, v in engine.state.metrics.items()}}
        if self.evaluator is not None and self.evaluator.state.epoch == engine.state.epoch:
            row.update({k: float(v) for k, v in self.evaluator.state.metrics.items()})
            row["best_epoch"] = int(self.evaluator.state.best_metric_epoch)
        self.history.append(row)
        if _is_rank0():
            write_json_atomic(self.path, {"history": self.history})


class TrackingParams:
    """Hands hyper-parameters to every ``MLFlowHandler`` on the engine, so ``--tracking mlflow`` logs them as run parameters.

    ``monai.bundle run --tracking mlflow`` appends its MLFlowHandler after the bundle's own handlers,
    so at ``STARTED`` this handler runs first and fills the handler's ``experiment_param``.
    """

    def __init__(self, params: dict):
        self.params = {str(k): v for k, v in dict(params).items()}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.handlers import MLFlowHandler

        for handlers in engine._event_handlers.values():  # ignite keeps no public list of handlers
            for handler, _, _ in handlers:
                owner = getattr(handler, "__self__", handler)
                if isinstance(owner, MLFlowHandler):
                    owner.experiment_param = {**(owner.experiment_param or {}), **self.params}


__all__ = ["MetricsHistory", "SaveBestLungCLIP", "SkippedSamplesReport", "TrackingParams"]
