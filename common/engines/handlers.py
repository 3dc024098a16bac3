"""ignite handlers the bundles wire in their configs."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ignite.engine import Engine, Events

from common.networks.checkpoint import save_network, unwrap
from common.networks.parameters import parameter_counts

log = logging.getLogger(__name__)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class SaveBestCheckpoint:
    """Attached to the evaluator: writes the network (:func:`common.networks.save_network`, atomic) whenever the
    key validation metric improves, with the epoch and the metric as its ``extra``; rank 0 only. ``preprocessing``
    (slice size, HU window, ...) is stored with the weights for inference to read back; a network that carries its
    own (LungCLIP) takes it too, so that what it saves and what it infers with agree."""

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
        if isinstance(getattr(model, "preprocessing", None), dict):
            model.preprocessing = {**model.preprocessing, **self.preprocessing}
        extra = {"epoch": int(engine.state.epoch), engine.state.key_metric_name: float(engine.state.best_metric)}
        save_network(self.network, self.path, preprocessing=self.preprocessing, extra=extra)
        log.info(
            "epoch %d: best %s %.4f, saved %s",
            engine.state.epoch,
            engine.state.key_metric_name,
            engine.state.best_metric,
            self.path,
        )


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
        log.warning(
            "training finished: %d sample loads skipped (%d distinct files): %s%s",
            len(skipped),
            len(unique),
            listed,
            more,
        )


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
    so at ``STARTED`` this handler runs first and fills the handler's ``experiment_param`` (and points it at
    the executed config, :func:`mend_executed_config`).
    """

    def __init__(self, params: dict):
        self.params = {str(k): v for k, v in dict(params).items()}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for owner in mlflow_handlers(engine):
            owner.experiment_param = {**(owner.experiment_param or {}), **self.params}
        mend_executed_config(engine)


def mlflow_handlers(engine: Engine) -> list:
    """Every ``MLFlowHandler`` attached to ``engine`` (each once), in the order they were attached."""
    from monai.handlers import MLFlowHandler

    found: dict[int, object] = {}
    for handlers in engine._event_handlers.values():  # ignite keeps no public list of handlers
        for handler, _, _ in handlers:
            owner = getattr(handler, "__self__", handler)
            if isinstance(owner, MLFlowHandler):
                found.setdefault(id(owner), owner)
    return list(found.values())


def _executed_config_path(artifact):
    """The executed config's path where MONAI left an unevaluated expression for it.

    ``monai.bundle run --tracking mlflow`` sets ``save_execute_config`` to ``<output_dir> + '/config_<time>.json'``,
    an expression only when ``output_dir`` is one; given a plain path (``--output_dir /x`` on the command
    line) the MLFlowHandler receives ``"/x + '/config_<time>.json'"`` verbatim, finds no such file and
    silently logs no config. Anything else is returned as it is.
    """
    if not isinstance(artifact, str) or not artifact or os.path.exists(artifact):
        return artifact
    m = re.fullmatch(r"(.+) \+ '/(config_[^'/]+\.json)'", artifact)
    if m and (Path(m.group(1)) / m.group(2)).is_file():
        return str(Path(m.group(1)) / m.group(2))
    return artifact


def mend_executed_config(engine: Engine) -> None:
    """Points every ``MLFlowHandler`` on ``engine`` at the executed config file MONAI wrote (see
    :func:`_executed_config_path`), so the run logs it whether ``output_dir`` came as a path or an expression.
    Called by :class:`TrackingParams` (trainers) and :class:`MLflowArtifactsHandler` (evaluators) before the
    MLFlowHandler logs its artifacts at ``COMPLETED``; the file exists from before the engine starts."""
    for h in mlflow_handlers(engine):
        h.artifacts = tuple(_executed_config_path(a) for a in h.artifacts)


class MLflowArtifactsHandler:
    """Logs a stage's small output files (JSON reports, score tables, overlay PNGs) as artifacts of the
    MLflow run of every ``MLFlowHandler`` on the engine; does nothing when there is none (a run without
    ``--tracking mlflow``).

    It acts at ``COMPLETED``: ``monai.bundle run --tracking mlflow`` appends its MLFlowHandler after the
    bundle's own handlers and ignite calls an event's handlers in the order they were added, so the files
    go in before that handler logs the executed config and closes the run  (:func:`mend_executed_config`
    first points it at that config). ``patterns`` are
    globs under ``output_dir`` (default: the engine's ``output_dir``); a file keeps its folder below
    ``output_dir`` under ``artifact_path``. NIfTI volumes, MONAI's executed ``config_*.json`` (the
    MLFlowHandler logs it itself), hidden (temporary) files and anything in an ``mlruns`` folder are never
    logged, nor at ``COMPLETED`` what ``exclude`` names; a pattern that matches nothing is skipped. Files written after the engine ran (e.g. a merge
    step) go in with :meth:`log_outputs`, into the same runs.
    """

    DEFAULT_PATTERNS = ("*.json", "*.csv", "*.png", "*/*.json", "*/*.png")
    ALWAYS_SKIPPED = ("*.nii", "*.nii.gz", "*.nrrd", "*.npz", "*.pt", "*.db", "config_*.json")

    def __init__(
        self,
        output_dir: str | Path | None = None,
        patterns=DEFAULT_PATTERNS,
        exclude=(),
        artifact_path: str = "outputs",
    ):
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self.artifact_path = str(artifact_path or "").strip("/")
        self.runs: list[tuple[object, str]] = []  # (MlflowClient, run id) of the runs logged into

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        mend_executed_config(engine)
        handlers = [h for h in mlflow_handlers(engine) if getattr(h, "cur_run", None) is not None]
        self.runs = [(h.client, h.cur_run.info.run_id) for h in handlers]
        if self.output_dir is None and getattr(engine, "output_dir", None) is not None:
            self.output_dir = Path(engine.output_dir)
        self.log_outputs()

    def files(self, patterns=None) -> list[Path]:
        """The files under ``output_dir`` that ``patterns`` select, sorted; without ``patterns``, the
        handler's own less ``exclude``. The always-skipped kinds are left out either way."""
        if self.output_dir is None or not self.output_dir.is_dir():
            return []
        skip = list(self.ALWAYS_SKIPPED) + (self.exclude if patterns is None else [])
        found = set()
        for pattern in [patterns] if isinstance(patterns, str) else (self.patterns if patterns is None else patterns):
            for f in self.output_dir.glob(pattern):
                rel = f.relative_to(self.output_dir)
                if (
                    f.is_file()
                    and not f.name.startswith(".")
                    and "mlruns" not in rel.parts[:-1]
                    and not any(rel.match(x) for x in skip)
                ):
                    found.add(f)
        return sorted(found)

    def log_outputs(self, patterns=None) -> int:
        """Logs the selected files into every run found at ``COMPLETED``; returns how many were logged per run."""
        if not self.runs:
            return 0
        files = self.files(patterns)
        for client, run_id in self.runs:
            for f in files:
                if not f.is_file():  # gone since the glob: skip quietly
                    continue
                folder = "/".join(
                    p for p in (self.artifact_path, f.parent.relative_to(self.output_dir).as_posix()) if p and p != "."
                )
                client.log_artifact(run_id, str(f), artifact_path=folder or None)
        if files:
            log.info("logged %d output file(s) of %s as MLflow artifacts", len(files), self.output_dir)
        return len(files)


class CachedViewEpoch:
    """Attached to the trainer: tells a :class:`common.data.CachedViewDataset` which epoch starts, so each
    epoch reads the next augmentation view of every slice."""

    def __init__(self, dataset):
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if hasattr(self.dataset, "set_epoch"):  # an on-the-fly dataset draws new augmentations by itself
            self.dataset.set_epoch(engine.state.epoch - 1)


class ParameterCountReport:
    """Attached to the trainer: logs the trainable parameter count against full fine-tuning at the start."""

    def __init__(self, network):
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        c = parameter_counts(self.network)
        share = 100.0 * c["trainable"] / max(c["full_finetuning"], 1)
        extra = f" (LoRA {c['lora']:,}, stage-2 decoder {c['stage2_decoder']:,})" if "lora" in c else ""
        log.info(
            "trainable parameters: %s of %s with full fine-tuning (%.1f %%)%s",
            f"{c['trainable']:,}",
            f"{c['full_finetuning']:,}",
            share,
            extra,
        )


__all__ = [
    "CachedViewEpoch",
    "MLflowArtifactsHandler",
    "MetricsHistory",
    "ParameterCountReport",
    "SaveBestCheckpoint",
    "SkippedSamplesReport",
    "TrackingParams",
    "mlflow_handlers",
]
