"""common.runtime: importing common keeps freed tensor memory (fewer page faults, the same numbers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# a few conv layers on 19 MB activations, run 10 times after 3 warm-ups; prints the minor page faults and a checksum
WORKLOAD = """
import resource, torch
import common
torch.manual_seed(0)
layers = [torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU6()) for _ in range(4)]
net = torch.nn.Sequential(*layers).eval()
x = torch.rand(16, 32, 96, 96)
with torch.inference_mode():
    for _ in range(3):
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        y = net(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, repr(y.double().sum().item()))
"""


def _run(env_update: dict) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LUNGSEG_MALLOC_TUNING", "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", WORKLOAD],
        cwd=REPO,
        env={**env, **env_update},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), out[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_import_common_keeps_freed_memory_fewer_faults_same_numbers():
    default_faults, default_sum = _run({"LUNGSEG_MALLOC_TUNING": "0"})
    tuned_faults, tuned_sum = _run({})
    assert tuned_sum == default_sum
    assert tuned_faults * 3 < default_faults, (tuned_faults, default_faults)  # about 20x here; 1x without the setting


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_leaves_opt_out_and_users_own_tunables(monkeypatch):
    from common.runtime import keep_freed_memory

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("LUNGSEG_MALLOC_TUNING", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("LUNGSEG_MALLOC_TUNING")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert keep_freed_memory() is True
