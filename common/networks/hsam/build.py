"""Building H-SAM on a backbone and loading it from a trained-tensors-only checkpoint, with clear errors."""

from __future__ import annotations

from pathlib import Path

import torch

from common.networks.sam_family import load_sam_family

from common.networks.hsam.model import HSam, read_hsam_checkpoint


def load_hsam(
    hsam_checkpoint: str | Path,
    variant: str | None = None,
    sam_checkpoint: str | Path | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    **kwargs,
) -> HSam:
    """A trained H-SAM: backbone, LoRA set-up and alpha as the checkpoint records them, its weights loaded (eval mode).

    ``variant``, when given, must be the checkpoint's backbone: a LoRA checkpoint for another backbone fails here.
    A backbone that ships no weights (MedSAM, SAM) loads from ``sam_checkpoint``, else from the path the
    training run recorded.
    """
    ckpt = read_hsam_checkpoint(hsam_checkpoint)
    if variant is not None and variant != ckpt["variant"]:
        raise ValueError(
            f"{hsam_checkpoint}: LoRA checkpoint was trained on the {ckpt['variant']} backbone, not {variant}; "
            f"set sam_variant to {ckpt['variant']} (with its sam_checkpoint) or use a checkpoint trained on {variant}"
        )
    from common.networks.sam_family import VARIANTS

    if sam_checkpoint is None and VARIANTS[ckpt["variant"]].needs_checkpoint and not random_init:
        sam_checkpoint = ckpt.get("backbone_checkpoint")  # where the frozen weights came from at training time
    lora = ckpt["lora"]
    model = build_hsam(
        ckpt["variant"],
        sam_checkpoint,
        random_init=random_init,
        lora_rank=lora["r"],
        lora_alpha=lora["lora_alpha"],
        lora_targets=lora["target_modules"],
        lora_dropout=lora["lora_dropout"],
        alpha=ckpt["alpha"],
        **{**ckpt.get("architecture", {}), **kwargs},
    )
    model.load_trainable(ckpt)
    return model.to(device).eval()


def build_hsam(
    variant: str = "litemedsam",
    sam_checkpoint: str | Path | None = None,
    hsam_checkpoint: str | Path | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    **kwargs,
) -> HSam:
    """The backbone (weights from ``load_sam_family``), LoRA and decoders; ``hsam_checkpoint`` loads trained weights."""
    backbone = load_sam_family(variant, sam_checkpoint, random_init=random_init)
    model = HSam(backbone, **kwargs)
    if hsam_checkpoint is not None:
        model.load_trainable(hsam_checkpoint)
    return model.to(device)
