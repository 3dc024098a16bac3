"""How an application runs the bundles: one :class:`Step` per ``python -m monai.bundle run``, run in order by
:func:`run_steps`. ``make demo`` (:mod:`common.apps.demo`) and ``make release`` (:mod:`common.apps.release`)
build their chains from these.

Each step is its own process (its progress bars and logs on the terminal, its MLflow run in the chain's store);
a step whose done files exist is skipped on a re-run, and a failed step stops the chain with the command that
re-runs it. :func:`run_python` starts those processes: each is ``python <argv>`` exactly as the printed command
runs it (``runpy``, as ``python -m`` does), forked from one server process that imported torch, MONAI and the
rest once (multiprocessing's ``forkserver`` with preloaded modules), so that a step does not spend 10-15 s of a
2-core machine importing them again; the fork gives each step a fresh process all the same (its own memory,
threads, seeds and exit code).
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLES = REPO_ROOT / "bundles"


# what every step imports (10-15 s a process on 2 CPU cores): the fork server imports it once
PRELOAD = ("common", "common.data", "common.engines", "common.inferers", "common.networks", "common.transforms", "monai",
           "monai.bundle.scripts", "fire", "torch", "torchvision", "transformers", "segment_anything", "efficientnet_lite_pytorch", "peft",
           "mlflow", "ignite", "nibabel", "scipy.ndimage", "skimage", "matplotlib.pyplot")


def _python_main(argv: list[str], cwd: str, env: dict, log: str | None, threads: int | None = None, idle: bool = False) -> None:
    """In the forked child: ``python <argv>`` (``-m module ...``, ``-c code ...`` or ``script.py ...``) as the interpreter would run
    it, with the caller's environment and working folder, its output to the terminal or to ``log``; ``threads`` and
    ``idle`` as :func:`start_python` says."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if idle:  # Linux's lowest class: CPU time only when no other process wants it (threads started later inherit it)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
    # a forkserver child inherits "forkserver" as its start method: a step's DataLoader workers would then come from
    # the server, each epoch, their dataset pickled over (SA-1 1.5x slower); a fresh interpreter's default instead
    multiprocessing.set_start_method(None, force=True)
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)  # what PYTHONUNBUFFERED=1 gives a fresh process
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]  # runpy puts the module's file in argv[0], as python -m does
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(argv)
            sys.path.insert(0, str(Path(argv[0]).resolve().parent))
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # multiprocessing ends its children with os._exit, which skips them (MLflow ends its run there)
        for stream in (sys.stdout, sys.stderr):
            if not stream.closed:  # a program may close them (json.tool does), as the interpreter's exit allows
                stream.flush()


def _forkserver() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # heeded when the server starts
    return ctx


def start_python_server() -> None:
    """Start :func:`run_python`'s server now, so that it imports :data:`PRELOAD` while this process does other
    work (the first :func:`run_python` starts it otherwise). Environment variables that libraries read when they
    load (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) take the values they have now; the others follow each call."""
    _forkserver()
    multiprocessing.forkserver.ensure_running()


def start_python(argv: list[str], cwd: Path = REPO_ROOT, log: Path | None = None, threads: int | None = None, idle: bool = False):
    """Start ``python <argv>`` in a process forked from the preloaded server (started on first use); the started
    ``multiprocessing`` process. ``log``: the file that takes its output (default: this terminal). ``threads``: torch's
    intra-op threads (default: torch's own choice, one per core); ``idle``: the process runs at Linux's ``SCHED_IDLE``
    policy, on CPU time that no other process wants."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:  # for the libraries and processes the step starts itself
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    child = _forkserver().Process(target=_python_main, args=(list(argv), str(cwd), env, None if log is None else str(log), threads, idle),
                                  name=" ".join(argv[:2]))
    child.start()
    return child


def run_python(argv: list[str], cwd: Path = REPO_ROOT, log: Path | None = None, threads: int | None = None, idle: bool = False) -> int:
    """``python <argv>`` as :func:`start_python` starts it, waited for; its exit status."""
    child = start_python(argv, cwd, log, threads, idle)
    try:
        child.join()
    except BaseException:  # Ctrl-C or a kill of this process: the step goes with it
        child.terminate()
        child.join()
        raise
    return child.exitcode


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
    background: bool = False  # run by BackgroundSteps, beside the chain: its time is not the chain's

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


def _run_step(step: Step, label: str, tracking_uri: str, retrain: bool, started: float, runner=run_python, note: str = "") -> None:
    """One step of a chain: reused when its done files exist (unless ``retrain``), else ``runner(argv)`` runs its
    ``python -m monai.bundle run`` command; a failure raises RuntimeError with the command that re-runs it."""
    cmd = step.command(tracking_uri, overwrite=retrain)
    step.cmd = shlex.join(cmd)
    if step.finished() and not retrain:
        step.status, step.seconds = "reused", 0.0
        print(f"==> {label} {step.name}: already finished ({step.done_file}), reused", flush=True)
        return
    print(f"==> {label} {step.name}: {step.what} (elapsed {clock(time.perf_counter() - started)}){note}", flush=True)
    t, wall = time.perf_counter(), time.time() - 1.0  # 1 s of slack for coarse file-system clocks
    returncode = runner(cmd[1:])
    step.seconds = time.perf_counter() - t
    # on --retrain the previous run's done files are still there: only files written by this run count
    if returncode != 0 or not step.finished(since=wall if retrain else None):
        step.status = "failed"
        why = f"exit {returncode}" if returncode else f"no {'new ' if retrain else ''}{step.done_file}"
        raise RuntimeError(f"step {step.name} failed ({why}) after {clock(step.seconds)}{note}; re-run it with:\n  {step.cmd}")
    step.status = "ran"
    print(f"    {step.name} done in {clock(step.seconds)}{note}", flush=True)


def tracking_uri_of(out: Path) -> str:
    """The MLflow store of a chain: one SQLite file in its output folder."""
    return f"sqlite:///{(out / 'mlruns.db').resolve()}"


def run_steps(steps: list[Step], out: Path, retrain: bool = False, started: float | None = None, prepare=None) -> None:
    """Run each step as its own ``monai.bundle run`` process (:func:`run_python`; its progress bars and logs on this terminal);
    stop at the first failure with the command to re-run it. ``prepare(out)`` makes the scan folders first."""
    started = time.perf_counter() if started is None else started
    if prepare is not None:
        prepare(out)
    for i, step in enumerate(steps, 1):
        _run_step(step, f"[{i}/{len(steps)}]", tracking_uri_of(out), retrain, started)


def create_experiments(out: Path, names: list[str]) -> None:
    """Create the chain's MLflow store and experiments now: two steps that started at once would both create them
    (MONAI's MLFlowHandler creates a missing experiment), and one would fail on the other's."""
    code = ("import sys, mlflow; client = mlflow.MlflowClient(sys.argv[1])\n"
            "for name in sys.argv[2:]:\n"
            "    client.get_experiment_by_name(name) or client.create_experiment(name)")
    if run_python(["-c", code, tracking_uri_of(out), *names]) != 0:
        raise RuntimeError(f"could not create the MLflow experiments {names} in {tracking_uri_of(out)}")


class BackgroundSteps:
    """Steps that no other step of a chain needs, run one after the other in a thread of this process while
    :func:`run_steps` runs the chain. Each runs at Linux's ``SCHED_IDLE`` policy with one torch thread
    (:func:`start_python`): it takes the CPU time that the chain's steps leave idle (their data loading, file
    writing and single-threaded stretches) and gives way at once when they want the core back; with one thread
    it never holds half of a parallel region up. Each step's output goes to ``<log_dir>/<name>.log``.
    ``start()``, then ``wait()`` for them (the first failure raises its RuntimeError), or ``stop()`` them."""

    def __init__(self, steps: list[Step], out: Path, retrain: bool = False, started: float | None = None, log_dir: Path | None = None):
        self.steps, self.out, self.retrain = list(steps), out, retrain
        for step in self.steps:
            step.background = True
        self.started = time.perf_counter() if started is None else started
        self.log_dir = Path(log_dir) if log_dir is not None else out / "logs"
        self.error: RuntimeError | None = None
        self._child = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run_all, name="background steps", daemon=True)

    def start(self) -> "BackgroundSteps":
        if self.steps:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._thread.start()
        return self

    def _run_all(self) -> None:
        for i, step in enumerate(self.steps, 1):
            if self._stopped:
                return
            log = self.log_dir / f"{step.name}.log"
            try:
                _run_step(step, f"[background {i}/{len(self.steps)}]", tracking_uri_of(self.out), self.retrain, self.started,
                          runner=lambda argv, log=log: self._run(argv, log), note=f" (in the background, log {log})")
            except RuntimeError as err:
                self.error = err
                return

    def _run(self, argv: list[str], log: Path) -> int:
        self._child = start_python(argv, log=log, threads=1, idle=True)
        self._child.join()
        return self._child.exitcode

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self) -> None:
        if self.running:
            print(f"==> waiting for the background steps (elapsed {clock(time.perf_counter() - self.started)})", flush=True)
            self._thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Terminate the running step and start no other (Ctrl-C, or the chain's own process going away)."""
        self._stopped = True
        child = self._child
        if child is not None and child.exitcode is None:
            child.terminate()
        if self._thread.is_alive():
            self._thread.join()


__all__ = ["BUNDLES", "PRELOAD", "REPO_ROOT", "SCAN_FILE_SUFFIXES", "BackgroundSteps", "Step", "case_reports", "clock", "create_experiments", "linked_scan",
           "run_python", "run_steps", "scan_link_name", "start_python", "start_python_server", "tracking_uri_of"]
