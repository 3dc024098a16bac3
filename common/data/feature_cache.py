"""H-SAM training from cached frozen-encoder features (SA-3b on 2 CPU cores).

The stages of the SAM-family encoder that carry no LoRA bypass compute the same output for the same
input at every step. So each training slice is augmented ``views`` times once, with a seed of its own
(the bundle's own augmentation chain: affine, elastic, intensity, Cutout), and for every view the
augmented image, its label and the frozen stages' output are written to disk
(:func:`build_feature_cache`). Training then reads one view per slice and epoch
(:class:`CachedViewDataset`, views taken in turn) and runs only the trainable rest of the encoder.

Files are named by a digest of the slice's pixels and label, the view, the seed, the backbone, where
it is cut and the augmentation chain (:func:`augmentation_signature`), so a re-run reuses what is there and a changed pseudo label or set-up writes new files.
Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


def _digest(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.numpy().tobytes() if isinstance(p, torch.Tensor) else str(p).encode())
    return h.hexdigest()[:12]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _transform_names(t) -> str:
    inner = getattr(t, "transforms", None)
    return type(t).__name__ + (f"[{','.join(_transform_names(c) for c in inner)}]" if inner else "")


def augmentation_signature(augmentation, probe: dict, seeds: int = 8) -> str:
    """What the cache key knows of an augmentation chain: its transforms' names, nested, and what it does
    to ``probe`` (one training slice) under ``seeds`` fixed seeds, so a changed chain or parameter writes
    new views instead of reading ones the old chain drew."""
    if augmentation is None:
        return "none"
    outputs = []
    for seed in range(int(seeds)):
        augmentation.set_random_state(seed=seed)
        out = augmentation({"image": probe["image"], "label": probe["label"]})
        outputs += [torch.as_tensor(np.asarray(out[k])).float()[..., ::4, ::4] for k in ("image", "label")]
    return _digest(_transform_names(augmentation), *outputs)


@torch.no_grad()
def build_feature_cache(slices: Sequence[dict], network, augmentation, cache_dir: str | Path, views: int = 2, seed: int = 0,
                        batch_size: int | None = None, progress: bool = True) -> list[dict]:
    """Augment every slice ``views`` times and cache (image, label, frozen features) per view.

    ``slices``: ``{"image": (1, S, S), "label": (1, S, S), "case_id", "slice"}`` as
    :func:`common.data.training_slices` gives them; ``augmentation``: a MONAI ``Compose`` of dictionary
    transforms (or None: every view is the slice itself, and one view is enough); ``batch_size`` slices go through the
    frozen stages at once (None: :func:`common.networks.sam_family.encoder_batch`). Returns one
    ``{"views": [path, ...], "case_id", "slice"}`` per slice.
    """
    from common.networks.checkpoint import unwrap
    from common.io.atomic import atomic_path
    from common.networks.sam_family import ENCODER_LAYOUT, encoder_batch

    model = unwrap(network)
    if int(views) < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    split = model.frozen_stages
    if split < 1:
        raise ValueError("feature cache: every encoder stage of this H-SAM trains (LoRA in the first stage); nothing to cache")
    views = 1 if augmentation is None else int(views)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    setup = (model.variant, split, views, seed, augmentation_signature(augmentation, slices[0]) if len(slices) else "", ENCODER_LAYOUT)
    entries, todo = [], []
    for i, s in enumerate(slices):
        key = _digest(s["image"], s["label"], *setup)
        paths = [cache_dir / f"{_safe(s.get('case_id', 'case'))}_{int(s.get('slice', i)):04d}_{key}_v{v}.pt" for v in range(views)]
        entries.append({"views": [str(p) for p in paths], "case_id": s.get("case_id"), "slice": s.get("slice")})
        todo += [(i, v, p) for v, p in enumerate(paths) if not p.is_file()]
    if len(todo) < len(slices) * views:
        log.info("feature cache %s: %d of %d views already cached", cache_dir, len(slices) * views - len(todo), len(slices) * views)
    device = next(model.parameters()).device
    if batch_size is None:
        batch_size = encoder_batch(device)
    was_training = model.training
    model.eval()
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="H-SAM feature cache (frozen encoder stages)", unit="view")
    try:
        for start in range(0, len(todo), int(batch_size)):
            chunk = todo[start : start + int(batch_size)]
            samples = []
            for i, v, _ in chunk:
                s = {"image": slices[i]["image"], "label": slices[i]["label"]}
                if augmentation is not None:
                    augmentation.set_random_state(seed=int(_digest(v, seed, s["image"][0, ::8, ::8]), 16) % (2**31))
                    s = augmentation(dict(s))
                samples.append({k: torch.as_tensor(np.asarray(s[k]) if not isinstance(s[k], torch.Tensor) else s[k].as_tensor() if hasattr(s[k], "as_tensor") else s[k]).float()
                                for k in ("image", "label")})
            images = torch.stack([s["image"] for s in samples]).to(device)
            feats = model.frozen_features(images).cpu().half()
            for (i, v, path), s, f in zip(chunk, samples, feats):
                with atomic_path(path) as tmp:
                    torch.save({"image": s["image"].half(), "label": (s["label"] > 0.5).to(torch.uint8), "features": f.clone()}, tmp)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    log.info("feature cache %s: %d slices x %d views (%d written now), features %s", cache_dir, len(slices), views, len(todo),
             "x".join(map(str, feats.shape[1:])) if todo else "reused")
    return entries


class CachedViewDataset(torch.utils.data.Dataset):
    """One cached view per slice and epoch, the views taken in turn (slice i, epoch e: view ``(i + e) % views``)."""

    def __init__(self, entries: Sequence[dict]):
        self.entries = list(entries)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        views = self.entries[i]["views"]
        path = views[(i + self.epoch) % len(views)]
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - name the file
            raise RuntimeError(f"{path}: cached view unreadable ({type(e).__name__}: {e}); delete it to have it rebuilt") from None
        return {"image": d["image"].float(), "label": d["label"].float(), "features": d["features"].float()}


def training_dataset(slices: Sequence[dict], augmentation: Sequence, network=None, cache_dir: str | Path | None = None, views: int = 2,
                     seed: int = 0, progress: bool = True):
    """H-SAM's training dataset: augmentation on the fly (``cache_dir`` None), or cached views of the
    frozen encoder stages under ``cache_dir`` (:func:`build_feature_cache`, then :class:`CachedViewDataset`)."""
    from monai.data import Dataset
    from monai.transforms import Compose

    transform = Compose(list(augmentation)) if augmentation else None
    if cache_dir is None:
        return Dataset(data=list(slices), transform=transform)
    if network is None:
        raise ValueError("a feature cache needs the network whose frozen encoder stages it stores")
    return CachedViewDataset(build_feature_cache(slices, network, transform, cache_dir, views=views, seed=seed, progress=progress))
