"""The frozen MedSAM-family teacher of SA-1 (Eq. 2) and an on-disk cache of its embeddings.

Each (slice, augmentation view) pair is encoded by the teacher once: :class:`TeacherCache`
stores one float16 ``.pt`` file per key, so later epochs read instead of re-encoding. Keys must
name the view (``cache_key(case, slice, view)``), because the teacher sees the augmented slice.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.networks.sam_family import ENCODER_LAYOUT, SamFamily, load_sam_family


_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(path: str | Path | None) -> str:
    """SHA-256 (first 16 hex digits) of a weights file, read once per process; "random" without a file."""
    if path is None or not Path(path).is_file():
        return "random" if path is None else str(path)
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return _DIGESTS[key]


class Teacher(nn.Module):
    """A SamFamily image encoder, frozen and always in eval mode: slices (B, 1, H, W) in [0, 1] -> (B, 256, 64, 64).

    ``pool_to`` average-pools the 64 x 64 grid to ``pool_to`` x ``pool_to`` (cheap distillation on CPU).
    """

    def __init__(
        self,
        sam: SamFamily | str = "litemedsam",
        pool_to: int | None = None,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        random_init: bool = False,
    ):
        super().__init__()
        if isinstance(sam, str):  # random weights only when asked for explicitly (tests)
            sam = load_sam_family(sam, checkpoint=checkpoint, device=device, random_init=random_init)
        self.sam = sam
        if pool_to is not None and (int(pool_to) < 1 or sam.embedding_shape[1] % int(pool_to)):
            raise ValueError(f"pool_to must divide the teacher grid {sam.embedding_shape[1]}, got {pool_to}")
        self.pool_to = int(pool_to) if pool_to is not None else None
        self.sam.requires_grad_(False)
        self.sam.eval()

    def train(self, mode: bool = True) -> "Teacher":
        """The teacher never leaves eval mode (a training loop's ``model.train()`` must not change it)."""
        return super().train(False)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        c, h, w = self.sam.embedding_shape
        return (c, self.pool_to, self.pool_to) if self.pool_to else (c, h, w)

    @property
    def signature(self) -> str:
        """Identifies the teacher's outputs (variant, weights, pooling): part of every cache key. The weights by
        their content, so a cache stays valid when the checkout or its virtual environment moves; and the
        encoder's weight layout (``ENCODER_LAYOUT``)."""
        return f"{self.sam.variant.name}|{weights_digest(self.sam.checkpoint)}|pool{self.pool_to}|{ENCODER_LAYOUT}"

    @torch.no_grad()
    def forward(self, slices01) -> torch.Tensor:
        if isinstance(slices01, torch.Tensor):
            slices01 = slices01.as_subclass(
                torch.Tensor
            )  # no MONAI MetaTensor: slow, and not loadable with weights_only
        emb = self.sam.encode(slices01)
        if self.pool_to is not None and emb.shape[-1] != self.pool_to:
            emb = F.adaptive_avg_pool2d(emb, self.pool_to)
        return emb


def cache_key(case_id: str, slice_index: int, view_id: int | str) -> str:
    """The cache key of one augmented view of one slice."""
    return f"{case_id}|z{int(slice_index)}|view{view_id}"


class TeacherCache:
    """Teacher embeddings on disk, float16, one file per key; ``get`` encodes only the keys not cached yet."""

    def __init__(self, cache_dir: str | Path, teacher: Teacher):
        self.teacher = teacher
        signature = getattr(teacher, "signature", type(teacher).__name__)
        # Different teachers (variant, weights, pooling) never share files.
        self.cache_dir = Path(cache_dir) / hashlib.sha1(signature.encode()).hexdigest()[:12]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.pt"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def _store(self, key: str, emb: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        # a plain tensor: a subclass (MONAI's MetaTensor) would not load back with weights_only=True
        torch.save(emb.detach().as_subclass(torch.Tensor).to("cpu", torch.float16).clone(), tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    def _load(self, key: str) -> torch.Tensor | None:
        try:
            return torch.load(self.path(key), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception:  # a truncated file from a killed run: re-encode it
            return None

    def get(self, keys: list[str], slices) -> torch.Tensor:
        """Teacher embeddings (B, C, h, w) float32 on the CPU for ``slices`` (B, 1, H, W) named by ``keys``."""
        x = slices if isinstance(slices, torch.Tensor) else torch.as_tensor(np.asarray(slices))
        if len(keys) != x.shape[0]:
            raise ValueError(f"one key per slice: got {len(keys)} keys for {x.shape[0]} slices")
        found: dict[str, torch.Tensor] = {}
        for key in dict.fromkeys(keys):
            emb = self._load(key)
            if emb is not None:
                found[key] = emb
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        self.hits += len(keys) - sum(1 for k in keys if k in missing)
        self.misses += len(missing)
        if missing:
            first = {k: keys.index(k) for k in missing}
            emb = self.teacher(x[[first[k] for k in missing]])
            for key, e in zip(missing, emb):
                self._store(key, e)
                found[key] = e.detach().as_subclass(torch.Tensor).to("cpu", torch.float16)
        return torch.stack([found[k] for k in keys]).float()


__all__ = ["Teacher", "TeacherCache", "cache_key", "weights_digest"]
