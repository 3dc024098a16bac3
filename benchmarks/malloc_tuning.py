"""CPU time with glibc's malloc defaults against :func:`common.runtime.keep_freed_memory` (what ``import common`` sets).

    .venv/bin/python benchmarks/malloc_tuning.py [--repeats 3]

Each setting runs in its own process (``LUNGSEG_MALLOC_TUNING=0`` for glibc's defaults), on the shipped weights:

- SA-2: the shipped student encodes the 442 windows of one slice (96², batches of 16, as the inferer does);
- LiteMedSAM (SA-1 teacher, SA-3a, H-SAM's backbone) encodes 4 slices of 512², one at a time;
- SA-1: one training step of the student, a batch of 32 at 96².

Each line prints seconds, minor page faults and kernel seconds per repeat for both settings, and the largest
difference of the outputs (0: the setting changes where tensors live, not what is computed). Run it on an idle
machine. The last line is ``speedup <x>``: the three workloads' summed seconds, defaults over tuned.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

WORKLOAD = r"""
import json, resource, sys, time, torch
import common
sys.path.insert(0, "benchmarks")
from encoder_layout import student_training_step
from common.networks import LungCLIP, load_network
from common.networks.sam_family import load_sam_family

repeats = int(sys.argv[1])
torch.manual_seed(0)
clip = load_network("bundles/foundation_clip/models/model.pt").eval()
sam = load_sam_family("litemedsam")
windows = torch.rand(442, 1, 96, 96)
slices = torch.rand(4, 1, 512, 512)
batch = torch.rand(32, 1, 96, 96)

def run(fn):
    out = fn()  # warm-up: allocator and oneDNN primitive caches
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        out = fn()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return {"s": (t1 - t0) / repeats, "faults": (r1.ru_minflt - r0.ru_minflt) / repeats,
            "sys": (r1.ru_stime - r0.ru_stime) / repeats, "out": out}

def step():
    clip.train()
    return student_training_step(clip, batch)

res = {}
with torch.inference_mode():
    res["SA-2 442 windows (96², batches of 16)"] = run(lambda: torch.cat([clip.encode_image(windows[i:i + 16]) for i in range(0, 442, 16)]))
    res["LiteMedSAM 4 slices of 512², one at a time"] = run(lambda: torch.cat([sam.encode(slices[i:i + 1]) for i in range(4)]))
res["SA-1 training step (32 x 96²)"] = run(step)
torch.save({k: v.pop("out") for k, v in res.items()}, sys.argv[2])
print(json.dumps(res))
"""


def _run(tuned: bool, repeats: int, out: Path) -> dict:
    env = {**os.environ, "LUNGSEG_MALLOC_TUNING": "1" if tuned else "0"}
    env.pop("GLIBC_TUNABLES", None)
    proc = subprocess.run(
        [sys.executable, "-c", WORKLOAD, str(repeats), str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"workload failed ({'tuned' if tuned else 'defaults'}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        plain, tuned = (
            _run(False, args.repeats, Path(tmp) / "plain.pt"),
            _run(True, args.repeats, Path(tmp) / "tuned.pt"),
        )
        out_plain, out_tuned = torch.load(Path(tmp) / "plain.pt"), torch.load(Path(tmp) / "tuned.pt")
    for name in plain:
        p, t = plain[name], tuned[name]
        diff = (out_plain[name] - out_tuned[name]).abs().max().item()
        print(
            f"{name}: defaults {p['s']:.2f} s ({p['faults']:.0f} faults, {p['sys']:.2f} s kernel), "
            f"tuned {t['s']:.2f} s ({t['faults']:.0f} faults, {t['sys']:.2f} s kernel), {p['s'] / t['s']:.2f}x, max |diff| {diff:.1e}"
        )
    speedup = sum(v["s"] for v in plain.values()) / sum(v["s"] for v in tuned.values())
    print(f"speedup {speedup:.2f}")
    return speedup


if __name__ == "__main__":
    main()
