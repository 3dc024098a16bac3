"""How an application runs the bundles: one :class:`Step` per ``python -m monai.bundle run``, run in order by
:func:`run_steps`. ``make demo`` (:mod:`common.apps.demo`) and ``make release`` (:mod:`common.apps.release`)
build their chains from these.

Each step is its own process (its progress bars and logs on the terminal, its MLflow run in the chain's store);
a step whose done files exist is skipped on a re-run, and a failed step stops the chain with the command that
re-runs it. A step marked ``beside`` runs next to the chain instead of in its turn, as soon as the steps it
needs (``after``) have finished: at the lowest CPU priority (``nice -n 19``), so it takes the cores only when the
chain leaves them idle (process start-up, file writing), its output in ``<out>/logs/<step>.log``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLES = REPO_ROOT / "bundles"


def clock(seconds: float | None) -> str:
    """``m:ss`` (empty for None)."""
    return "" if seconds is None else f"{int(seconds // 60)}:{int(seconds % 60):02d}"


@dataclass
class Step:
    """One ``monai.bundle run`` of a chain: which bundle, which configs, which overrides, and the file whose
    presence means the step finished (so a re-run skips it)."""

    stage: str
    name: str
    bundle: str
    configs: list[str]
    overrides: dict
    done_file: Path
    what: str
    seconds: float | None = None
    status: str = "not run"
    extra_done: list[Path] = field(default_factory=list)
    cmd: str = ""  # the command as run, for the report
    experiment: str = "demo"  # the MLflow experiment
    beside: bool = False  # run next to the chain (niced, output in a log) once the steps named in ``after`` finished
    after: tuple[str, ...] = ()  # the steps (by name) a ``beside`` step needs

    def command(self, tracking_uri: str, overwrite: bool = False) -> list[str]:
        """The ``monai.bundle run`` command line; ``overwrite`` redoes cases an inference run already wrote
        (which it would otherwise skip)."""
        bundle_root = BUNDLES / self.bundle
        configs = [str(bundle_root / "configs" / c) for c in self.configs]
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs) if len(configs) > 1 else configs[0],
               "--bundle_root", str(bundle_root)]
        overrides = {**self.overrides, "overwrite": True} if overwrite and "inference.json" in self.configs else self.overrides
        for key, value in overrides.items():
            # a Python literal: python-fire parses it (JSON's true/false/null would arrive as strings, and "false" is truthy)
            cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
        return cmd + ["--tracking", "mlflow", "--tracking_uri", tracking_uri, "--experiment_name", self.experiment, "--run_name", self.name]

    def finished(self, since: float | None = None) -> bool:
        """All the step's done files exist (and, with ``since``, were written at or after that ``time.time()``)."""
        files = [Path(p) for p in [self.done_file, *self.extra_done]]
        return all(f.is_file() and (since is None or f.stat().st_mtime >= since) for f in files)


def case_reports(output_dir: Path, case_ids: list[str], postfix: str) -> list[Path]:
    """Each case's report, written last: a step over several cases is done when all of them exist."""
    return [output_dir / c / f"{c}_{postfix}" for c in case_ids]


SCAN_FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def scan_link_name(case_id: str, source: Path) -> str:
    """A scan's link in a chain's scan folder: its manifest id, and a file's own extension (readers go by it),
    so the bundles name the case by the manifest id."""
    if source.is_dir():
        return case_id
    return case_id + (".nii.gz" if source.name.endswith(".nii.gz") else source.suffix)


def linked_scan(folder: Path, case_id: str) -> Path:
    """The scan :func:`scan_link_name` linked for ``case_id`` in ``folder`` (a DICOM folder by its id, a file with
    its extension); ``folder / case_id`` when nothing is linked yet (a step list may be built first)."""
    for name in (case_id, *(case_id + s for s in SCAN_FILE_SUFFIXES)):
        if (folder / name).exists() or (folder / name).is_symlink():
            return folder / name
    return folder / case_id


def _run_one(step: Step, label: str, retrain: bool, started: float, log: Path | None = None, on_start=None) -> None:
    """Run one step's process and check its done files; a failure raises with the command that re-runs it."""
    if step.finished() and not retrain:
        step.status, step.seconds = "reused", 0.0
        print(f"==> {label} {step.name}: already finished ({step.done_file}), reused", flush=True)
        return
    where = "" if log is None else f", beside the chain, log {log}"
    print(f"==> {label} {step.name}: {step.what} (elapsed {clock(time.perf_counter() - started)}{where})", flush=True)
    t, wall = time.perf_counter(), time.time() - 1.0  # 1 s of slack for coarse file-system clocks
    cmd = shlex.split(step.cmd)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if log is None:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        nice = ["nice", "-n", "19"] if shutil.which("nice") else []  # the chain's steps keep the cores; this one takes what they leave
        with open(log, "w") as f:
            proc = subprocess.Popen(nice + cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if on_start is not None:
        on_start(proc)
    returncode = proc.wait()
    step.seconds = time.perf_counter() - t
    # on --retrain the previous run's done files are still there: only files written by this run count
    if returncode != 0 or not step.finished(since=wall if retrain else None):
        step.status = "failed"
        why = f"exit {returncode}" if returncode else f"no {'new ' if retrain else ''}{step.done_file}"
        tail = "" if log is None else f" (its output: {log})"
        raise RuntimeError(f"step {step.name} failed ({why}) after {clock(step.seconds)}{tail}; re-run it with:\n  {step.cmd}")
    step.status = "ran"
    print(f"    {step.name} done in {clock(step.seconds)}{'' if log is None else ' (beside the chain)'}", flush=True)


class _Beside(threading.Thread):
    """Runs a chain's ``beside`` steps one at a time, each once the steps it needs have finished."""

    def __init__(self, steps: list[Step], labels: dict[str, str], finished: dict[str, threading.Event], retrain: bool, started: float, log_dir: Path):
        super().__init__(name="steps beside the chain", daemon=True)
        self.steps, self.labels, self.finished = steps, labels, finished
        self.retrain, self.started, self.log_dir = retrain, started, log_dir
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.proc: subprocess.Popen | None = None

    def run(self) -> None:
        pending = list(self.steps)
        try:
            while pending and not self.stopping.is_set():
                ready = next((s for s in pending if all(self.finished[a].is_set() for a in s.after)), None)
                if ready is None:
                    self.stopping.wait(0.5)
                    continue
                pending.remove(ready)
                _run_one(ready, self.labels[ready.name], self.retrain, self.started, log=self.log_dir / f"{ready.name}.log",
                         on_start=lambda p: setattr(self, "proc", p))
                self.finished[ready.name].set()
        except BaseException as e:  # noqa: BLE001 - handed to the chain's thread, which raises it
            self.error = e

    def stop(self) -> None:
        """The chain failed: end the step running beside it (its outputs are written whole or not at all)."""
        self.stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def _create_tracking_store(tracking_uri: str, experiments: set[str]) -> None:
    """Create the MLflow store and experiments before two steps' processes could both try to (a race that fails one)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for name in sorted(experiments):
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name)


def run_steps(steps: list[Step], out: Path, retrain: bool = False, started: float | None = None, prepare=None) -> None:
    """Run each step as its own ``monai.bundle run`` process (its progress bars and logs on this terminal), the
    ``beside`` ones next to the others (:class:`Step`); stop at the first failure with the command to re-run it.
    ``prepare(out)`` makes the scan folders first."""
    started = time.perf_counter() if started is None else started
    tracking_uri = f"sqlite:///{(out / 'mlruns.db').resolve()}"
    names = [s.name for s in steps]
    for step in steps:
        unknown = [a for a in step.after if a not in names or names.index(a) >= names.index(step.name)]
        if unknown or (step.after and not step.beside):
            raise ValueError(f"step {step.name}: 'after' must name earlier steps of the chain and is for steps run beside it, got {list(step.after)}")
        step.cmd = shlex.join(step.command(tracking_uri, overwrite=retrain))
    if prepare is not None:
        prepare(out)
    labels = {s.name: f"[{i}/{len(steps)}]" for i, s in enumerate(steps, 1)}
    finished = {s.name: threading.Event() for s in steps}
    beside = [s for s in steps if s.beside]
    runner = None
    if beside:
        _create_tracking_store(tracking_uri, {s.experiment for s in steps})
        runner = _Beside(beside, labels, finished, retrain, started, out / "logs")
        runner.start()
    try:
        for step in steps:
            if step.beside:
                continue
            _run_one(step, labels[step.name], retrain, started)
            finished[step.name].set()
            if runner is not None and runner.error is not None:
                raise runner.error
        if runner is not None:
            if runner.is_alive():
                waiting = [s.name for s in beside if not finished[s.name].is_set()]
                print(f"==> waiting for the steps beside the chain: {', '.join(waiting)} (elapsed {clock(time.perf_counter() - started)})", flush=True)
            runner.join()
            if runner.error is not None:
                raise runner.error
    except BaseException:
        if runner is not None:
            runner.stop()
        raise


__all__ = ["BUNDLES", "REPO_ROOT", "SCAN_FILE_SUFFIXES", "Step", "case_reports", "clock", "linked_scan", "run_steps", "scan_link_name"]
