"""Losses of the method: SA-1's dual loss, SA-3's deep-supervision segmentation loss."""

from common.losses.clip import DualLoss, cosine_loss, distillation_loss, info_nce_loss
from common.losses.segmentation import DeepSupervisionLoss, boundary_band, resize_label

__all__ = [
    "DeepSupervisionLoss",
    "DualLoss",
    "boundary_band",
    "cosine_loss",
    "distillation_loss",
    "info_nce_loss",
    "resize_label",
]
