"""SA-2's windows through the SA-1 image encoder as it trains (BatchNorm, padded copies, ReLU6) against its
``fused_for_inference`` copy (BatchNorm folded into the convolutions, symmetric paddings inside them, ReLU6 in place).

    .venv/bin/python benchmarks/encoder_fusion.py [--case lung_pet_ct_dx_a0001] [--repeats 5] [--skip-step | --skip-encoder]

1. ``encoder``: batches of 16 windows at the shipped SA-1's input size (96 x 96), 1 and 2 torch threads, each way
   ``--repeats`` times over 40 batches (min and median ms per batch), and the largest difference of the embeddings;
2. ``step``: the probmap bundle (``inference.json``, shipped SA-1) on one real scan of make data's manifest, with
   ``--fuse_encoder False`` and ``True``, each into its own folder: seconds, the largest difference of the similarity
   maps, and how many lung-mask voxels differ.

Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.apps.pipeline import link_scan, run_python  # noqa: E402
from common.bundle_run import BundleRun  # noqa: E402
from common.default_data import DEFAULT_OUT, load_manifest  # noqa: E402
from common.networks import load_network  # noqa: E402

CKPT = REPO / "bundles" / "foundation_clip" / "models" / "model.pt"


def encoder_part(repeats: int) -> None:
    net = load_network(CKPT).eval()
    size = int(net.preprocessing["image_size"])
    enc = net.image_encoder.to(memory_format=torch.channels_last)
    fused = enc.fused_for_inference().to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    batches = [
        enc.prepare(torch.rand(16, 1, size, size)).contiguous(memory_format=torch.channels_last) for _ in range(40)
    ]
    with torch.no_grad():
        diff = max(
            float((net.project_image(enc.features(x)) - net.project_image(fused.features(x))).abs().max())
            for x in batches[:4]
        )
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times = {"as trained": [], "fused": []}
            for _ in range(repeats):
                for name, e in (("as trained", enc), ("fused", fused)):
                    t = time.perf_counter()
                    for x in batches:
                        e.features(x)
                    times[name].append((time.perf_counter() - t) / len(batches) * 1000)
            a, b = statistics.median(times["as trained"]), statistics.median(times["fused"])
            print(
                f"encoder, {threads} thread(s), batch 16 at {size}x{size}: as trained {min(times['as trained']):.1f} / {a:.1f} ms, "
                f"fused {min(times['fused']):.1f} / {b:.1f} ms (min / median of {repeats}), speedup {a / b:.2f}",
                flush=True,
            )
    print(f"encoder: largest difference of the projected embeddings {diff:.2e}")


def step_part(case_id: str) -> None:
    cases = {c["id"]: c for c in load_manifest(DEFAULT_OUT)["cases"]}
    if case_id not in cases:
        raise SystemExit(f"{DEFAULT_OUT / 'manifest.json'}: no case {case_id}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        link_scan(tmp / "scans", case_id, Path(cases[case_id]["path"]))
        outputs = {}
        if run_python(["-c", "pass"]) != 0:  # the preloaded server up first: its imports are neither run's time
            raise SystemExit("could not start the step server")
        for fuse in (False, True):
            out = tmp / f"fuse_{fuse}"
            settings = {"ckpt_path": str(CKPT), "dataset_dir": str(tmp / "scans"), "output_dir": str(out)}
            settings.update(fuse_encoder=fuse, overlay=False, progress=False)
            cmd = BundleRun("probmap", ["inference.json"], settings).argv()
            t = time.perf_counter()
            code = run_python(cmd, log=tmp / f"fuse_{fuse}.log")
            seconds = time.perf_counter() - t
            if code != 0:
                raise SystemExit(
                    f"the probmap run with fuse_encoder={fuse} failed (exit {code}): {tmp / f'fuse_{fuse}.log'}"
                )
            folder = out / case_id
            outputs[fuse] = {
                k: np.asarray(nib.load(str(folder / f"{case_id}_{k}.nii.gz")).dataobj) for k in ("probmap", "lung_mask")
            }
            print(f"step: probmap on {case_id}, fuse_encoder={fuse}: {seconds:.1f} s", flush=True)
        a, b = outputs[False], outputs[True]
        changed = int((a["lung_mask"] != b["lung_mask"]).sum())
        print(
            f"step: largest difference of the probability maps {float(np.abs(a['probmap'] - b['probmap']).max()):.2e}; "
            f"lung-mask voxels that differ {changed} of {int(a['lung_mask'].astype(bool).sum())}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="lung_pet_ct_dx_a0001", help="a case id of make data's manifest")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-step", action="store_true", help="the encoder part only")
    parser.add_argument("--skip-encoder", action="store_true", help="the step part only")
    args = parser.parse_args(argv)
    if not args.skip_encoder:
        encoder_part(args.repeats)
    if not args.skip_step:
        step_part(args.case)


if __name__ == "__main__":
    main()
