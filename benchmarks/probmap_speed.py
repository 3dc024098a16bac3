"""SA-2 Algorithm 1: the literal loop against the production path, same slice, same model, one process.

    .venv/bin/python benchmarks/probmap_speed.py [--ckpt outputs/demo/foundation_clip/models/model.pt]
        [--case /work/shared/data/lidc_idri_1011_dicom] [--stride-mm 10] [--aggregation mean]

* literal: Algorithm 1 as written (``common.inferers.algorithm1_literal``): for every window one
  encoder call on one patch, and the five prompts through the text encoder inside the loop;
* production: what the probmap bundle runs (``common.inferers.patch_similarity_maps``): windows cut
  with ``unfold``, resized together, encoded in batches (channels-last), prompts encoded once.

Both run on the middle axial slice of the case, prepared as SA-1 saw its training slices, with the
patch size in millimetres the checkpoint was trained on. Prints both times, the number of windows,
the largest absolute difference between the two maps, and ``speedup <x>`` on its last line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(REPO / "outputs/demo/foundation_clip/models/model.pt"))
    ap.add_argument("--case", default=str(REPO.parent / "shared/data/lidc_idri_1011_dicom"))
    ap.add_argument("--stride-mm", type=float, default=10.0)
    ap.add_argument("--aggregation", choices=("mean", "max"), default="mean")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="production runs (best of)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from common.data.clip_pairs import axial_slice01
    from common.inferers.patch_similarity import AXCODES, slice_pixel_mm
    from common.inferers.similarity_maps import (
        algorithm1_literal,
        class_text_embeddings,
        patch_similarity_maps,
        window_starts,
    )
    from common.io import read_ct
    from common.networks import load_network
    from common.transforms.intensity import HUWindow

    torch.set_grad_enabled(False)
    if not Path(args.ckpt).is_file():
        print(f"{args.ckpt}: no checkpoint; train SA-1 first (make demo) or pass --ckpt", file=sys.stderr)
        return 2
    model = load_network(args.ckpt).eval()
    pre = model.preprocessing
    vol = read_ct(args.case, axcodes=AXCODES)
    k = vol.shape[2] // 2
    slice_size, patch_size, image_size = int(pre["slice_size"]), int(pre["patch_size"]), int(pre["image_size"])
    px_mm = slice_pixel_mm(vol.shape[:2], vol.spacing[:2], slice_size)
    patch_px = max(int(round(float(pre["patch_mm"]) / px_mm)), 4)
    stride_px = max(int(round(args.stride_mm / px_mm)), 1)
    img = torch.from_numpy(axial_slice01(vol.hu, k, slice_size, HUWindow(pre.get("hu_window", (-1000, 400)))))
    n_win = len(window_starts(slice_size, patch_px, stride_px)) ** 2
    print(
        f"case {Path(args.case).name}, slice {k}: {slice_size} px at {px_mm:.2f} mm/px; patch {pre['patch_mm']} mm = {patch_px} px, "
        f"stride {args.stride_mm} mm = {stride_px} px, {n_win} windows; model input {image_size} px; {torch.get_num_threads()} threads"
    )

    t0 = time.perf_counter()
    literal = algorithm1_literal(
        img,
        model,
        patch_px=patch_px,
        stride_px=stride_px,
        patch_size=patch_size,
        image_size=image_size,
        aggregation=args.aggregation,
    )
    t_literal = time.perf_counter() - t0
    print(f"literal Algorithm 1: {t_literal:.2f} s ({1000 * t_literal / n_win:.1f} ms per window)")

    times = []
    for _ in range(max(args.repeats, 1)):
        t0 = time.perf_counter()
        text = class_text_embeddings(model)  # once per run: part of the production time
        prod = patch_similarity_maps(
            img[None, None],
            model,
            text,
            patch_px,
            stride_px,
            patch_size,
            image_size,
            args.aggregation,
            batch_size=args.batch_size,
        )[0]
        times.append(time.perf_counter() - t0)
    t_prod = min(times)
    diff = float((literal - prod).abs().max())
    print(f"production path: {t_prod:.3f} s ({1000 * t_prod / n_win:.2f} ms per window), best of {len(times)}")
    print(f"max abs difference between the maps: {diff:.2e} (cosine similarity units)")
    if not np.isfinite(diff) or diff > 1e-3:
        print("the two maps disagree", file=sys.stderr)
        return 1
    print(f"speedup {t_literal / t_prod:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
