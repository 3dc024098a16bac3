"""How an application runs the bundles: one :class:`Step` per ``python -m monai.bundle run``, run in order by
:func:`run_steps`. ``make demo`` (:mod:`common.apps.demo`) and ``make release`` (:mod:`common.apps.release`)
build their chains from these.

Each step is its own process (its progress bars and logs on the terminal, its MLflow run in the chain's store);
a step whose done files exist is skipped on a re-run, and a failed step stops the chain with the command that
re-runs it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
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


def run_steps(steps: list[Step], out: Path, retrain: bool = False, started: float | None = None, prepare=None) -> None:
    """Run each step as its own ``monai.bundle run`` process (its progress bars and logs on this terminal);
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
        print(f"==> [{i}/{len(steps)}] {step.name}: {step.what} (elapsed {clock(time.perf_counter() - started)})", flush=True)
        t, wall = time.perf_counter(), time.time() - 1.0  # 1 s of slack for coarse file-system clocks
        result = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        step.seconds = time.perf_counter() - t
        # on --retrain the previous run's done files are still there: only files written by this run count
        if result.returncode != 0 or not step.finished(since=wall if retrain else None):
            step.status = "failed"
            why = f"exit {result.returncode}" if result.returncode else f"no {'new ' if retrain else ''}{step.done_file}"
            raise RuntimeError(f"step {step.name} failed ({why}) after {clock(step.seconds)}; re-run it with:\n  {step.cmd}")
        step.status = "ran"
        print(f"    {step.name} done in {clock(step.seconds)}", flush=True)


__all__ = ["BUNDLES", "REPO_ROOT", "SCAN_FILE_SUFFIXES", "Step", "case_reports", "clock", "linked_scan", "run_steps", "scan_link_name"]
