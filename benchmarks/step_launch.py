"""What a chain step costs before its work starts: ``python -m monai.bundle run`` as a fresh process against the
same command forked from the preloaded server (:func:`common.apps.pipeline.run_python`, what ``make demo`` and
``make release`` use).

    .venv/bin/python benchmarks/step_launch.py [--repeats 2] [--case deeplesion_000001_01_01]

The step: SA-2 (``probmap`` ``inference.json``, the shipped SA-1) on one small real scan of the manifest (DeepLesion
000001_01_01, 13 slices, by default), each run into its own output folder. Prints each run's seconds, checks that every
array the step writes (probability map, lung mask, sides) is the same to the bit in every run, and ends with
``speedup <x>``: the fresh processes' mean time over the forked ones' (a first fresh run that fills the page cache,
and the first fork, which starts the server and waits for its imports, counted apart). Run it on an idle machine; PYTHONDONTWRITEBYTECODE must be unset (as the
Makefile does), or each fresh process compiles its imports again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.apps.pipeline import link_scan, run_python  # noqa: E402
from common.bundle_run import BundleRun  # noqa: E402
from common.default_data import DEFAULT_OUT, load_manifest  # noqa: E402


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.rglob("*.nii.gz"))}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--case", default="deeplesion_000001_01_01", help="a case id of make data's manifest")
    args = parser.parse_args(argv)
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        raise SystemExit(
            "unset PYTHONDONTWRITEBYTECODE first (the Makefile does): fresh processes would compile every import"
        )
    cases = {c["id"]: c for c in load_manifest(DEFAULT_OUT)["cases"]}
    if args.case not in cases:
        raise SystemExit(f"{DEFAULT_OUT / 'manifest.json'}: no case {args.case}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        link_scan(tmp / "scans", args.case, Path(cases[args.case]["path"]))
        settings = {
            "ckpt_path": str(REPO / "bundles/foundation_clip/models/model.pt"),
            "dataset_dir": str(tmp / "scans"),
        }
        step = BundleRun("probmap", ["inference.json"], {**settings, "overlay": False}).argv()
        times: dict[str, list[float]] = {"warm-up": [], "fresh process": [], "forked, server start": [], "forked": []}
        outputs = []
        # an uncounted fresh run first: it reads the files from disk into the page cache, which every later run finds there
        runs = (
            [("warm-up", 0)]
            + [("fresh process", i) for i in range(args.repeats)]
            + [("forked, server start", 0)]
            + [("forked", i) for i in range(args.repeats)]
        )
        for how, i in runs:
            out = tmp / f"{how.replace(' ', '_').replace(',', '')}_{i}"
            start = time.perf_counter()
            if how in ("warm-up", "fresh process"):
                code = subprocess.run(
                    [sys.executable, *step, "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True
                ).returncode
            else:
                code = run_python([*step, "--output_dir", str(out)], log=tmp / f"{out.name}.log")
            seconds = time.perf_counter() - start
            if code != 0:
                raise SystemExit(f"{how} run {i} failed (exit {code})")
            times[how].append(seconds)
            outputs.append(_arrays(out))
            print(f"{how:22s} run {i}: {seconds:6.1f} s", flush=True)
        same = all(
            a.keys() == outputs[0].keys() and all(np.array_equal(a[k], outputs[0][k]) for k in a) for a in outputs[1:]
        )
        print(f"outputs ({', '.join(outputs[0])}) the same to the bit in all {len(outputs)} runs: {same}")
        if not same:
            raise SystemExit("the runs' outputs differ")
    speedup = float(np.mean(times["fresh process"]) / np.mean(times["forked"]))
    print(f"speedup {speedup:.2f}")
    return speedup


if __name__ == "__main__":
    main()
