"""SA-3b training step: the frozen encoder stages run every step (literal) against cached features (production).

    .venv/bin/python benchmarks/hsam_cache_speed.py [--case ../shared/data/totalseg_chest_crops/chest_crop_b.nii.gz]
        [--slices 16] [--steps 4] [--batch-size 4] [--slice-size 256] [--lora-targets 'layers\\.3\\..*qkv'] [--views 2]

Same real slices, same model (LiteMedSAM H-SAM, the CPU recipe's LoRA on the last encoder stage), same
augmentation chain (the bundle's ``train#augmentation``), one process:

* literal: every step augments the batch and runs the whole image encoder, then the decoders, the
  loss and the backward pass (what ``train.json`` did before the cache);
* production: :func:`common.data.build_feature_cache` writes ``--views`` augmented views per slice
  with the frozen stages' output once; every step reads one view and runs only the trainable rest.

The labels are the HU-threshold lung mask (only timing is measured here). Prints the cache's one-off
cost, the seconds per step of both, the break-even epoch count, and ``speedup <x>`` last (per step).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _steps(model, loss_fn, optimizer, loader, prepare, steps: int) -> float:
    it = iter(loader)
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        t = time.perf_counter()
        try:
            data = next(it)
        except StopIteration:  # next epoch
            it = iter(loader)
            data = next(it)
        batch = prepare(data)
        image, label, kwargs = batch[0], batch[1], (batch[3] if len(batch) > 2 else {})
        optimizer.zero_grad()
        loss = loss_fn(model(image, **kwargs), label)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default=str(REPO.parent / "shared/data/totalseg_chest_crops/chest_crop_b.nii.gz"))
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--slice-size", type=int, default=256)
    ap.add_argument("--lora-targets", default="layers\\.3\\..*qkv")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from common.bundle_run import BundleRun
    from monai.transforms import Compose

    from common.data import CachedViewDataset, build_feature_cache
    from common.transforms import MixingBatch
    from common.io import read_ct
    from common.losses import DeepSupervisionLoss
    from common.lungmask import hu_threshold_lung_mask
    from common.networks.hsam import build_hsam
    from common.transforms.intensity import HUWindow

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vol = read_ct(args.case)
    lungs = hu_threshold_lung_mask(vol.hu, vol.spacing)
    ks = np.flatnonzero(lungs.sum(axis=(0, 1)) > 100)
    ks = ks[np.linspace(0, len(ks) - 1, args.slices).round().astype(int)]
    img = torch.from_numpy(np.asarray(HUWindow((-1000.0, 400.0))(vol.hu[..., ks]), dtype=np.float32)).permute(2, 0, 1)[
        :, None
    ]
    lab = torch.from_numpy(lungs[..., ks].astype(np.float32)).permute(2, 0, 1)[:, None]
    resize = lambda t, mode: torch.nn.functional.interpolate(t, size=(args.slice_size,) * 2, mode=mode)  # noqa: E731
    img, lab = resize(img, "bilinear"), (resize(lab, "bilinear") > 0.5).float()
    slices = [
        {"image": img[i], "label": lab[i], "case_id": Path(args.case).name.split(".")[0], "slice": int(k)}
        for i, k in enumerate(ks)
    ]

    parser = BundleRun("hsam_finetune", ["train.json"], {"slice_size": args.slice_size}).parser()
    augmentation = Compose(parser.get_parsed_content("train#augmentation"))

    model = build_hsam("litemedsam", lora_targets=[args.lora_targets]).train()
    loss_fn = DeepSupervisionLoss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    mixing = MixingBatch(cutmix_prob=0.0, mixup_prob=0.0)
    print(
        f"{len(slices)} slices of {args.case}, {args.slice_size} px, batch {args.batch_size}, LoRA on {args.lora_targets!r}: "
        f"{model.frozen_stages} frozen encoder stage(s) of {len(list(model.backbone.image_encoder.layers)) + 1}"
    )

    from monai.data import DataLoader, Dataset

    literal_loader = DataLoader(
        Dataset(slices, transform=augmentation), batch_size=args.batch_size, shuffle=True, num_workers=0
    )
    t_literal = _steps(model, loss_fn, optimizer, literal_loader, mixing, args.steps)
    print(f"literal: {t_literal:.2f} s per step (augmentation + whole encoder + decoders + backward)")

    with tempfile.TemporaryDirectory() as cache_dir:
        t = time.perf_counter()
        entries = build_feature_cache(slices, model, augmentation, cache_dir, views=args.views, progress=False)
        t_cache = time.perf_counter() - t
        cached_loader = DataLoader(CachedViewDataset(entries), batch_size=args.batch_size, shuffle=True, num_workers=0)
        t_cached = _steps(model, loss_fn, optimizer, cached_loader, mixing, args.steps)
        size_mb = sum(f.stat().st_size for f in Path(cache_dir).iterdir()) / 1e6
    steps_per_epoch = len(slices) / args.batch_size
    break_even = t_cache / max((t_literal - t_cached) * steps_per_epoch, 1e-9)
    print(
        f"cache: {t_cache:.1f} s once for {len(slices)} slices x {args.views} views ({size_mb:.0f} MB on disk, "
        f"{size_mb / (len(slices) * args.views):.2f} MB a view)"
    )
    print(f"production: {t_cached:.2f} s per step (cached frozen stages + the rest + decoders + backward)")
    print(f"the cache pays for itself after {break_even:.1f} epoch(s)")
    print(f"speedup {t_literal / t_cached:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
