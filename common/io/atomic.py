"""Write to a temporary name in the same folder, then rename: a crash never leaves a half-written file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)
_TEMPORARY = re.compile(r"^\..*\.tmp-(\d+)")  # the names atomic_path gives: .<stem>.tmp-<pid><suffixes>


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path`` (same suffixes); rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporaries of :func:`atomic_path` under ``folder`` whose writer process is gone (a killed
    run's); a finished output is never touched, nor a temporary another live process is writing."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.rglob(".*.tmp-*"):
            m = _TEMPORARY.match(p.name)
            if m is None:
                continue
            pid = int(m.group(1))
            if pid != os.getpid() and _alive(pid):
                continue
            p.unlink(missing_ok=True)
            n += 1
    if n:
        log.info("removed %d temporary file(s) left by an interrupted run under %s", n, folder)
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
