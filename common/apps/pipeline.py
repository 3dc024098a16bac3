"""How an application runs the bundles: a :class:`~common.bundle_run.BundleRun` says which bundle, configs and overrides; a chain is
a list of :class:`Step` (a bundle run, or a benchmark script, as its own process), run in order by
:func:`run_steps`. ``make demo`` (:mod:`common.apps.demo`), ``make release`` (:mod:`common.apps.release`) and
``make chain NAME=...`` (:mod:`common.apps.chains`) build their chains from these; ``segment`` and the benchmarks
run a :class:`BundleRun` in their own process.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.bundle_run import BUNDLES, REPO, BundleRun

REPO_ROOT = REPO


# what every step imports (10-15 s a process on 2 CPU cores): the fork server imports it once
PRELOAD = (
    "common",
    "common.data",
    "common.engines",
    "common.inferers",
    "common.networks",
    "common.transforms",
    "monai",
    "monai.bundle.scripts",
    "fire",
    "torch",
    "torchvision",
    "transformers",
    "segment_anything",
    "efficientnet_lite_pytorch",
    "peft",
    "mlflow",
    "ignite",
    "nibabel",
    "scipy.ndimage",
    "skimage",
    "matplotlib.pyplot",
)


def _python_main(argv: list[str], cwd: str, env: dict, log: str | None) -> None:
    """In the forked child: ``python <argv>`` (``-m module ...``, ``-c code ...`` or ``script.py ...``) as the interpreter would run
    it, with the caller's environment and working folder, its output to the terminal or to ``log``."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
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


def run_python(argv: list[str], cwd: Path = REPO_ROOT, log: Path | None = None) -> int:
    """``python <argv>`` in a process forked from the preloaded server (started on first use); its exit status.
    ``log``: the file that takes its output (default: this terminal)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = _forkserver().Process(
        target=_python_main,
        args=(list(argv), str(cwd), env, None if log is None else str(log)),
        name=" ".join(argv[:2]),
    )
    child.start()
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
    """One step of a chain: a :class:`BundleRun` (``bundle``, ``configs``, ``overrides``) or a ``script`` (a
    benchmark: ``python <script...>``), and the file whose presence means the step finished (so a re-run skips it)."""

    stage: str
    name: str
    bundle: str
    configs: list[str]
    overrides: dict
    done_file: Path | None  # None: a script whose figures are printed, run every time
    what: str
    seconds: float | None = None
    status: str = "not run"
    extra_done: list[Path] = field(default_factory=list)
    cmd: str = ""  # the command as run, for the report
    experiment: str = "demo"  # the MLflow experiment
    script: list[str] | None = None

    def bundle_run(self, overwrite: bool = False) -> BundleRun:
        """The step's bundle run; ``overwrite`` redoes cases an inference run already wrote (which it would otherwise skip)."""
        overrides = (
            {**self.overrides, "overwrite": True} if overwrite and "inference.json" in self.configs else self.overrides
        )
        return BundleRun(self.bundle, list(self.configs), overrides)

    def command(self, tracking_uri: str, overwrite: bool = False) -> list[str]:
        """The step's command line: its script, or its bundle run tracked in MLflow (``tracking_uri``, the step's
        experiment, a run named after it)."""
        if self.script is not None:
            return [sys.executable, *self.script]
        tracking = ["--tracking", "mlflow", "--tracking_uri", tracking_uri, "--experiment_name", self.experiment]
        return [sys.executable, *self.bundle_run(overwrite).argv(), *tracking, "--run_name", self.name]

    def finished(self, since: float | None = None) -> bool:
        """All the step's done files exist (and, with ``since``, were written at or after that ``time.time()``); a
        step without a done file never is."""
        if self.done_file is None:
            return False
        files = [Path(p) for p in [self.done_file, *self.extra_done]]
        return all(f.is_file() and (since is None or f.stat().st_mtime >= since) for f in files)


def script_step(name: str, argv: list[str], what: str, stage: str = "benchmark") -> Step:
    """A benchmark as a chain step: ``python benchmarks/<argv...>``, its figures printed each time it runs."""
    return Step(stage, name, "", [], {}, None, what, script=[str(REPO_ROOT / "benchmarks" / argv[0]), *argv[1:]])


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


def link_scan(folder: Path, case_id: str, source: Path) -> Path:
    """Link ``source`` (a scan file or a DICOM folder) into ``folder`` under :func:`scan_link_name`, replacing a link to
    another scan; the link."""
    source = Path(source).resolve()
    link = Path(folder) / scan_link_name(case_id, source)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() != source:
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(source, target_is_directory=source.is_dir())
    return link


def linked_scan(folder: Path, case_id: str) -> Path:
    """The scan :func:`scan_link_name` linked for ``case_id`` in ``folder`` (a DICOM folder by its id, a file with
    its extension); ``folder / case_id`` when nothing is linked yet (a step list may be built first)."""
    for name in (case_id, *(case_id + s for s in SCAN_FILE_SUFFIXES)):
        if (folder / name).exists() or (folder / name).is_symlink():
            return folder / name
    return folder / case_id


def run_steps(steps: list[Step], out: Path, retrain: bool = False, started: float | None = None, prepare=None) -> None:
    """Run each step as its own ``monai.bundle run`` process (:func:`run_python`; its progress bars and logs on this terminal);
    stop at the first failure with the command to re-run it. ``prepare(out)`` makes the scan folders first."""
    started = time.perf_counter() if started is None else started
    tracking_uri = f"sqlite:///{(out / 'mlruns.db').resolve()}"
    if prepare is not None:
        prepare(out)
    for i, step in enumerate(steps, 1):
        cmd = step.command(tracking_uri, overwrite=retrain)
        step.cmd = shlex.join(cmd)
        if step.finished() and not retrain:
            step.status, step.seconds = "reused", 0.0
            print(f"==> [{i}/{len(steps)}] {step.name}: already finished ({step.done_file}), reused", flush=True)
            continue
        print(
            f"==> [{i}/{len(steps)}] {step.name}: {step.what} (elapsed {clock(time.perf_counter() - started)})",
            flush=True,
        )
        t, wall = time.perf_counter(), time.time() - 1.0  # 1 s of slack for coarse file-system clocks
        returncode = run_python(cmd[1:])
        step.seconds = time.perf_counter() - t
        # on --retrain the previous run's done files are still there: only files written by this run count
        if returncode != 0 or (step.done_file is not None and not step.finished(since=wall if retrain else None)):
            step.status = "failed"
            why = f"exit {returncode}" if returncode else f"no {'new ' if retrain else ''}{step.done_file}"
            raise RuntimeError(
                f"step {step.name} failed ({why}) after {clock(step.seconds)}; re-run it with:\n  {step.cmd}"
            )
        step.status = "ran"
        print(f"    {step.name} done in {clock(step.seconds)}", flush=True)


__all__ = [
    "BUNDLES",
    "BundleRun",
    "PRELOAD",
    "REPO_ROOT",
    "SCAN_FILE_SUFFIXES",
    "Step",
    "case_reports",
    "clock",
    "link_scan",
    "linked_scan",
    "run_python",
    "run_steps",
    "scan_link_name",
    "script_step",
    "start_python_server",
]
