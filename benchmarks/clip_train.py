"""SA-1 training throughput with and without the on-disk teacher cache, in one run.

    .venv/bin/python benchmarks/clip_train.py [--samples 128] [--config demo]

Builds the foundation_clip trainer from the bundle configs (train.json + demo.json by default:
EfficientNet-Lite0 at 96 px, frozen MiniLM, LiteMedSAM teacher pooled to 16 x 16), takes a fixed,
seeded subset of the training datalist with its real mix of slices and patches, and times one
epoch of the same trainer twice:

* without cache: every slice goes through the LiteMedSAM encoder at every step;
* with cache: every (slice, view) the trainer can draw is encoded once beforehand (what the first
  epochs of a run do), then one epoch reads the embeddings from disk.

Prints samples per second for each and ``speedup <x>`` (cached over uncached) on its last line.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build(config: str, cache_dir: Path, overrides: dict):
    from common.bundle_run import BundleRun

    configs = ["train.json"] + (["demo.json"] if config == "demo" else [])
    return BundleRun("foundation_clip", configs, {"teacher_cache_dir": str(cache_dir), **overrides}).parser()


def prefill_cache(parser, data: list[dict]) -> int:
    """Encode every (slice, view) the trainer can draw, through the same keys it uses."""
    import torch

    from common.engines.clip import teacher_embeddings, view_keys
    from common.transforms import CTRandAugment

    views = parser.get_parsed_content("teacher_views")
    augment = CTRandAugment(
        n_ops=parser.get_parsed_content("augment_n_ops"), magnitude=parser.get_parsed_content("augment_magnitude")
    )
    load = parser.get_parsed_content("validate#preprocessing")
    cache = parser.get_parsed_content("teacher_cache")
    tag = parser.get_parsed_content("view_tag")
    slices = [d for d in data if d["kind"] == "slice"]
    for item in slices:
        image = load(dict(item))["image"]
        for v in range(views):
            x = torch.as_tensor(augment.view(image, item["sample_id"], v))[None]
            batch = {"sample_id": [item["sample_id"]], "slice_index": [item["slice_index"]], "view_id": [v]}
            teacher_embeddings(cache, view_keys(batch, torch.ones(1, dtype=torch.bool), x.shape[-2:], tag), x)
    return len(slices) * views


def time_epoch(trainer, teacher) -> float:
    """Seconds for one epoch of ``trainer`` with ``teacher`` (a Teacher or a TeacherCache)."""
    trainer.teacher = teacher
    t0 = time.perf_counter()
    trainer.run()
    return time.perf_counter() - t0


def warm_up(parser) -> None:
    """One untimed forward/backward pass, so first-call set-up (kernels, allocator) is not timed."""
    import torch

    network, size, batch = (
        parser.get_parsed_content("network"),
        parser.get_parsed_content("image_size"),
        parser.get_parsed_content("batch_size"),
    )
    out = network(torch.rand(batch, 1, size, size), ["CT patch of the lung"])
    (out["image_embeds"].sum() + out["student_distill"].sum()).backward()
    network.zero_grad()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256, help="training samples per timed epoch (seeded subset)")
    ap.add_argument("--config", choices=("demo", "default"), default="demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    with tempfile.TemporaryDirectory(prefix="clip_bench_") as tmp:
        parser = build(args.config, Path(tmp) / "cache", {"num_workers": 0})
        datalist = parser.get_parsed_content("datalist")
        data = random.Random(args.seed).sample(datalist["training"], min(args.samples, len(datalist["training"])))
        n_slices = sum(d["kind"] == "slice" for d in data)
        print(
            f"config: {args.config}; {len(data)} training samples ({n_slices} slices to the teacher, {len(data) - n_slices} patches); "
            f"image size {parser.get_parsed_content('image_size')}, encoder {parser.get_parsed_content('image_encoder')}, "
            f"teacher {parser.get_parsed_content('teacher_variant')}, batch {parser.get_parsed_content('batch_size')}, {torch.get_num_threads()} threads"
        )
        parser["max_epochs"] = 1
        parser["train#dataset#data"] = data
        parser["train#handlers"] = []  # no validation, logging or checkpoints inside the timing
        trainer = parser.get_parsed_content("train#trainer")
        cache = parser.get_parsed_content("teacher_cache")
        warm_up(parser)
        uncached_s = time_epoch(trainer, parser.get_parsed_content("teacher"))
        print(f"without teacher cache: {len(data) / uncached_s:7.1f} samples/s ({uncached_s:.1f} s per epoch)")
        t0 = time.perf_counter()
        n = prefill_cache(parser, data)
        print(
            f"cache fill: {n} (slice, view) embeddings in {time.perf_counter() - t0:.1f} s (paid once, in the first epochs of a run)"
        )
        hits, misses = cache.hits, cache.misses
        cached_s = time_epoch(trainer, cache)
        print(
            f"with teacher cache:    {len(data) / cached_s:7.1f} samples/s ({cached_s:.1f} s per epoch; {cache.hits - hits} hits, {cache.misses - misses} misses)"
        )
        print(f"speedup {uncached_s / cached_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
