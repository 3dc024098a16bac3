"""The demo's background lane (:class:`common.apps.pipeline.BackgroundSteps`): what it costs the chain, and that it
gives the same results.

    .venv/bin/python benchmarks/background_steps.py [--skip-alone]

The lane's steps are the demo's: the shipped models on Lung-PET-CT-Dx A0001 (SA-2, then H-SAM on the slices its
mask touches). Prints, each part into its own output folder:

1. ``alone``: the two steps as the chain would run them (torch's default threads, normal priority), then as the
   lane runs them (one thread, ``SCHED_IDLE``), each with nothing else running; and whether every array the lane
   wrote equals the chain's to the bit;
2. ``beside``: one chain step (SA-2 of the demo's four training scans, with the shipped SA-1), alone and then with
   the lane started beside it: the step's time both ways, and the lane's progress when the step ended.

Run it on an idle machine, with PYTHONDONTWRITEBYTECODE unset (the Makefile unsets it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.apps.demo import SHIPPED, demo_steps, prepare_scans  # noqa: E402
from common.apps.pipeline import BackgroundSteps, create_experiments, run_steps, start_python_server  # noqa: E402


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.rglob("*.nii.gz"))}


def _steps(out: Path, names: set[str]):
    prepare_scans(out)
    steps = [s for s in demo_steps(out) if s.name in names]
    # the chain step of part 2 maps with the shipped SA-1 (the demo's own is trained by the demo)
    return [dataclasses.replace(s, overrides={**s.overrides, "ckpt_path": str(SHIPPED["clip"])}) if s.stage == "probmap" else s for s in steps]


def _lane_outputs(out: Path) -> Path:
    return out / "hsam_finetune" / "heldout_real_shipped"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-alone", action="store_true", help="part 2 only")
    args = parser.parse_args(argv)
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        raise SystemExit("unset PYTHONDONTWRITEBYTECODE first (the Makefile does)")
    lane_names = {"probmap_heldout_real_shipped", "hsam_finetune_heldout_real_shipped"}
    start_python_server()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_alone:
            chain_out, lane_out = tmp / "chain", tmp / "lane"
            t = time.perf_counter()
            run_steps(_steps(chain_out, lane_names), chain_out)
            chain_s = time.perf_counter() - t
            lane = _steps(lane_out, lane_names)
            t = time.perf_counter()
            BackgroundSteps(lane, lane_out).start().wait()
            lane_s = time.perf_counter() - t
            a, b = _arrays(chain_out / "probmap"), _arrays(lane_out / "probmap")
            a.update(_arrays(_lane_outputs(chain_out)))
            b.update(_arrays(_lane_outputs(lane_out)))
            same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
            print(f"alone: as a chain step {chain_s:.1f} s, in the lane (1 thread, SCHED_IDLE) {lane_s:.1f} s "
                  f"({', '.join(f'{s.name} {s.seconds:.1f} s' for s in lane)})")
            print(f"alone: the {len(a)} arrays written ({', '.join(sorted(a))}) the same to the bit: {same}")
        fg_out, both_out = tmp / "fg_alone", tmp / "fg_beside"
        fg = _steps(fg_out, {"probmap_training_scans"})
        t = time.perf_counter()
        run_steps(fg, fg_out)
        alone_s = time.perf_counter() - t
        fg = _steps(both_out, {"probmap_training_scans"})
        lane = _steps(both_out, lane_names)
        create_experiments(both_out, ["demo"])
        background = BackgroundSteps(lane, both_out).start()
        t = time.perf_counter()
        run_steps(fg, both_out)
        beside_s = time.perf_counter() - t
        done = [s.name for s in lane if s.status == "ran"]
        t_lane = time.perf_counter()
        background.wait()
        rest_s = time.perf_counter() - t_lane
        print(f"beside: {fg[0].name} alone {alone_s:.1f} s, with the lane beside it {beside_s:.1f} s ({100 * (beside_s / alone_s - 1):+.1f} %); "
              f"lane steps finished by then: {done or 'none'}; the lane went on {rest_s:.1f} s after it")


if __name__ == "__main__":
    main()
