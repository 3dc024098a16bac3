"""Losses of the method (SA-1 here; SA-3 segmentation losses live beside them)."""

from common.losses.clip import DualLoss, cosine_loss, distillation_loss, info_nce_loss

__all__ = ["DualLoss", "cosine_loss", "distillation_loss", "info_nce_loss"]
