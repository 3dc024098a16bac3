"""Overlap metrics on binary numpy masks, through MONAI's metric functions."""

from __future__ import annotations

import numpy as np


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (MONAI ``compute_dice``); 1.0 when both are empty."""
    import torch
    from monai.metrics import compute_dice

    p, t = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"masks differ in shape: {p.shape} vs {t.shape}")
    as_tensor = lambda m: torch.from_numpy(m)[None, None].float()  # noqa: E731 (batch, channel)
    return float(compute_dice(as_tensor(p), as_tensor(t), include_background=True, ignore_empty=False).item())
