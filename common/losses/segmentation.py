"""SA-3 segmentation losses: BCE + Dice per decoder stage (Eq. 11-13), stages weighted (deep supervision)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceCELoss


def resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A (B, 1, H, W) label (binary or soft, as Mixup makes it) on another grid, kept soft: the share of
    each target pixel that is foreground, so a reduced-resolution label loses no thin structure outright."""
    size = tuple(int(s) for s in size)
    if tuple(label.shape[-2:]) == size:
        return label
    return F.interpolate(label.float(), size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)


class DeepSupervisionLoss(nn.Module):
    """``sum_s w_s * (lambda_BCE * BCE + lambda_Dice * Dice)`` over H-SAM's two stages.

    Stage 1 is scored against the label reduced to its (decoder) grid, stage 2 against the label at
    full resolution. Dice is computed over the whole batch (MONAI ``batch=True``), so a slice without
    lung does not swing the loss. A plain tensor output (UNet, UNETR baselines) is scored as stage 2.
    """

    def __init__(self, lambda_bce: float = 1.0, lambda_dice: float = 1.0, stage_weights: Sequence[float] = (0.4, 0.6), smooth: float = 1e-5):
        super().__init__()
        if len(stage_weights) != 2 or min(stage_weights) < 0 or sum(stage_weights) <= 0:
            raise ValueError(f"stage_weights must be two non-negative weights (stage 1, stage 2), not both 0; got {list(stage_weights)}")
        self.stage_weights = tuple(float(w) for w in stage_weights)
        # Eq. 11 (BCE on the sigmoid of the logits) + Eq. 12 (Dice with epsilon), weighted as Eq. 13
        self.stage_loss = DiceCELoss(sigmoid=True, batch=True, lambda_dice=float(lambda_dice), lambda_ce=float(lambda_bce), smooth_nr=smooth, smooth_dr=smooth)

    def forward(self, outputs, label: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, dict):
            return self.stage_loss(outputs, resize_label(label, outputs.shape[-2:]))
        w1, w2 = self.stage_weights
        loss = w2 * self.stage_loss(outputs["stage2"], resize_label(label, outputs["stage2"].shape[-2:]))
        if w1 > 0:
            loss = loss + w1 * self.stage_loss(outputs["stage1"], resize_label(label, outputs["stage1"].shape[-2:]))
        return loss
