"""SA-3 segmentation losses: BCE + Dice per decoder stage (Eq. 11-13), stages weighted (deep supervision)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceCELoss, MaskedDiceLoss


def resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A (B, 1, H, W) label (binary or soft, as Mixup makes it) on another grid, kept soft: the share of
    each target pixel that is foreground, so a reduced-resolution label loses no thin structure outright."""
    size = tuple(int(s) for s in size)
    if tuple(label.shape[-2:]) == size:
        return label
    return F.interpolate(label.float(), size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(
        0.0, 1.0
    )


def boundary_band(label: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 1, H, W) ones within ``radius`` pixels of the label's border (either side), zeros elsewhere.
    A soft label (Mixup, a reduced grid) is taken at 0.5."""
    hard = (label >= 0.5).float()
    k = 2 * int(radius) + 1
    dilated = F.max_pool2d(hard, k, stride=1, padding=int(radius))
    eroded = 1.0 - F.max_pool2d(1.0 - hard, k, stride=1, padding=int(radius))
    return dilated - eroded


class DeepSupervisionLoss(nn.Module):
    """``sum_s w_s * (lambda_BCE * BCE + lambda_Dice * Dice)`` over H-SAM's two stages.

    Stage 1 is scored against the label reduced to its (decoder) grid, stage 2 against the label at
    full resolution. Dice is computed over the whole batch (MONAI ``batch=True``), so a slice without
    lung does not swing the loss. A plain tensor output (UNet, UNETR baselines) is scored as stage 2.

    ``boundary_ignore_px`` > 0 leaves out of both terms the pixels within that distance of the pseudo
    label's border (in pixels of the training slice; scaled to the stage-1 grid). A pseudo label's
    errors sit at its border (a SAM mask a few pixels inside the pleura), so the network learns the
    lung from the pixels the label is sure of and places the border by the image itself.

    ``terms`` holds the last call's per-stage losses (detached, before the stage weights, as
    ``loss_stage1`` / ``loss_stage2``; a stage of weight 0 is not computed, a plain tensor is stage 2),
    for the trainer's per-epoch means (``common.engines.EpochAverage`` in ``train.json``).
    """

    def __init__(
        self,
        lambda_bce: float = 1.0,
        lambda_dice: float = 1.0,
        stage_weights: Sequence[float] = (0.4, 0.6),
        smooth: float = 1e-5,
        boundary_ignore_px: int = 0,
    ):
        super().__init__()
        if len(stage_weights) != 2 or min(stage_weights) < 0 or sum(stage_weights) <= 0:
            raise ValueError(
                f"stage_weights must be two non-negative weights (stage 1, stage 2), not both 0; got {list(stage_weights)}"
            )
        if int(boundary_ignore_px) < 0:
            raise ValueError(f"boundary_ignore_px must be >= 0, got {boundary_ignore_px}")
        self.stage_weights = tuple(float(w) for w in stage_weights)
        self.lambda_bce, self.lambda_dice = float(lambda_bce), float(lambda_dice)
        self.boundary_ignore_px = int(boundary_ignore_px)
        # Eq. 11 (BCE on the sigmoid of the logits) + Eq. 12 (Dice with epsilon), weighted as Eq. 13
        self.stage_loss = DiceCELoss(
            sigmoid=True,
            batch=True,
            lambda_dice=self.lambda_dice,
            lambda_ce=self.lambda_bce,
            smooth_nr=smooth,
            smooth_dr=smooth,
        )
        self.masked_dice = MaskedDiceLoss(sigmoid=True, batch=True, smooth_nr=smooth, smooth_dr=smooth)
        self.terms: dict[str, torch.Tensor] = {}

    def _stage(self, logits: torch.Tensor, label: torch.Tensor, full_size: int) -> torch.Tensor:
        target = resize_label(label, logits.shape[-2:])
        radius = round(self.boundary_ignore_px * logits.shape[-1] / full_size)
        if radius < 1:
            return self.stage_loss(logits, target)
        keep = 1.0 - boundary_band(target, radius)
        bce = F.binary_cross_entropy_with_logits(logits, target, weight=keep, reduction="sum") / keep.sum().clamp_min(
            1.0
        )
        return self.lambda_bce * bce + self.lambda_dice * self.masked_dice(logits, target, keep)

    def forward(self, outputs, label: torch.Tensor) -> torch.Tensor:
        full = label.shape[-1]
        if not isinstance(outputs, dict):
            loss = self._stage(outputs, label, full)
            self.terms = {"loss_stage2": loss.detach()}
            return loss
        w1, w2 = self.stage_weights
        stage2 = self._stage(outputs["stage2"], label, full)
        self.terms = {"loss_stage2": stage2.detach()}
        loss = w2 * stage2
        if w1 > 0:
            stage1 = self._stage(outputs["stage1"], label, full)
            self.terms["loss_stage1"] = stage1.detach()
            loss = loss + w1 * stage1
        return loss
