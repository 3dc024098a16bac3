"""CPU speed of the image encoders in the layout and batching the pipeline uses, against the plain ones.

    .venv/bin/python benchmarks/encoder_layout.py [--repeats 2]

Times, on this machine's CPU and with the shipped weights (no checkpoint of the user's needed):

- LiteMedSAM's encoder (SA-1 teacher, SA-3a, H-SAM's backbone) on 8 slices of 512²: one batch of 8 or one slice
  at a time (:func:`common.networks.sam_family.encoder_batch`), with NCHW or channels-last (NHWC) conv weights;
- EfficientNet-Lite0 (SA-1's student): one training step, a batch of 32 at 96²;
- EfficientNet-Lite0 encoding the 442 windows of one slice (SA-2's sliding window at the demo's sizes).

Each line prints the plain time, the production time, their ratio and the largest difference of the outputs.
Run it on an idle machine: another job on the same cores changes every figure. The last line is
``speedup <x>``: LiteMedSAM's 8 slices, plain (NCHW, one batch) over production (NHWC, one by one).
"""

from __future__ import annotations

import argparse
import time

import torch


def _time(fn, repeats: int):
    fn()  # warm-up: allocator and oneDNN primitive caches
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def student_training_step(clip, batch: torch.Tensor) -> torch.Tensor:
    """One SA-1 student step (both heads, backward) on ``batch``; returns W_i's gradient. Seeded: the same dropout
    masks on every call, so two settings compare like for like."""
    torch.manual_seed(0)
    fmap = clip.feature_map(batch)
    loss = clip.project_image(fmap).square().mean() + clip.distill_head(fmap).square().mean()
    loss.backward()
    grad = clip.image_projection.weight.grad.clone()
    clip.zero_grad(set_to_none=True)
    return grad


def _layout(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    return module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    from common.networks.clip import build_lung_clip
    from common.networks.sam_family import load_sam_family

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sam = load_sam_family("litemedsam")
    slices = torch.rand(8, 1, 512, 512)
    enc, pre = sam.image_encoder, sam.preprocess
    times = {}
    with torch.inference_mode():
        for nhwc in (False, True):
            _layout(enc, nhwc)
            times[nhwc, "batch"], ref = _time(lambda: enc(pre(slices)), args.repeats)
            times[nhwc, "single"], out = _time(
                lambda: torch.cat([enc(pre(slices[i : i + 1])) for i in range(len(slices))]), args.repeats
            )
            if not nhwc:
                plain = ref
        diff = (out - plain).abs().max().item()
    for nhwc in (False, True):
        print(
            f"LiteMedSAM 8 slices, {'NHWC' if nhwc else 'NCHW'}: one batch {times[nhwc, 'batch']:.2f} s, one by one {times[nhwc, 'single']:.2f} s"
        )
    speedup = times[False, "batch"] / times[True, "single"]
    print(
        f"LiteMedSAM 8 slices: plain {times[False, 'batch']:.2f} s, production {times[True, 'single']:.2f} s ({speedup:.2f}x), max |diff| {diff:.1e}"
    )

    clip = build_lung_clip(teacher_shape=(256, 16, 16), train_text_encoder=False)
    batch = torch.rand(32, 1, 96, 96)

    def step():
        return student_training_step(clip, batch)

    clip.train()
    res = {}
    for nhwc in (False, True):
        _layout(clip.image_encoder, nhwc)
        res[nhwc] = _time(step, args.repeats)
    print(
        f"EfficientNet-Lite0 training step (32 x 96²): NCHW {res[False][0]:.2f} s, NHWC {res[True][0]:.2f} s "
        f"({res[False][0] / res[True][0]:.2f}x), max |grad diff| {(res[True][1] - res[False][1]).abs().max().item():.1e}"
    )

    clip.eval()
    windows = torch.rand(442, 1, 96, 96)
    with torch.inference_mode():
        for nhwc in (False, True):
            _layout(clip.image_encoder, nhwc)
            res[nhwc] = _time(lambda: clip.encode_image(windows), args.repeats)
    print(
        f"EfficientNet-Lite0, 442 windows of one slice: NCHW {res[False][0]:.2f} s, NHWC {res[True][0]:.2f} s "
        f"({res[False][0] / res[True][0]:.2f}x), max |diff| {(res[True][1] - res[False][1]).abs().max().item():.1e}"
    )
    print(f"speedup {speedup:.2f}")
    return speedup


if __name__ == "__main__":
    main()
