"""Which parameters train: counts against full fine-tuning, and the optimizer's parameter groups."""

from __future__ import annotations

import torch

from common.networks.checkpoint import unwrap


def parameter_counts(network: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters against full fine-tuning (H-SAM's own count; a baseline trains everything)."""
    model = unwrap(network)
    if hasattr(model, "parameter_counts"):
        return model.parameter_counts()
    n = sum(p.numel() for p in model.parameters())
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "full_finetuning": n,
        "total": n,
    }


def parameter_groups(network: torch.nn.Module, lr: float, pretrained_lr_scale: float = 0.1) -> list[dict]:
    """Optimizer groups: H-SAM's own split (:meth:`HSam.parameter_groups`); a baseline's trainable parameters at ``lr``."""
    model = unwrap(network)
    if hasattr(model, "parameter_groups"):
        return model.parameter_groups(lr, pretrained_lr_scale)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": float(lr)}]


__all__ = [
    "parameter_counts",
    "parameter_groups",
]
