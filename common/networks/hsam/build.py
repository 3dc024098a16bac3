"""Building an untrained H-SAM on a backbone (a trained one loads with :func:`common.networks.load_network`)."""

from __future__ import annotations

from pathlib import Path

import torch

from common.networks.sam_family import load_sam_family

from common.networks.hsam.model import HSam


def build_hsam(
    variant: str = "litemedsam",
    sam_checkpoint: str | Path | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    **kwargs,
) -> HSam:
    """The backbone (weights from ``load_sam_family``), LoRA bypasses and decoders, ready to train."""
    backbone = load_sam_family(variant, sam_checkpoint, random_init=random_init)
    return HSam(backbone, **kwargs).to(device)
