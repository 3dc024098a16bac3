"""What the probability and mask transforms share: one channel-first float tensor in, non-finite values filled,
voxel spacing from the image, one value per key, and the method-name check."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import convert_to_numpy, ensure_tuple_rep

# Scaled logits are clamped here: softmax subtracts the maximum, and inf - inf would be NaN.
_LOGIT_LIMIT = 1e37
_F32_MAX = float(np.finfo(np.float32).max)


def _check_method(method: str, allowed: Sequence[str], who: str) -> str:
    m = str(method).lower()
    if m not in allowed:
        raise ValueError(f"{who}: unknown method {method!r}; allowed: {', '.join(allowed)}")
    return m


def _fill_nonfinite_(t: torch.Tensor) -> torch.Tensor:
    """Replace, in place, each channel's NaN/inf by that channel's finite minimum (0 when none)."""
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return t
    for c in range(t.shape[0]):
        bad = ~finite[c]
        if bool(bad.any()):
            good = t[c][finite[c]]
            t[c][bad] = good.min() if good.numel() else 0.0
    return t


def _float_tensor(img, add_channel: bool = False) -> torch.Tensor:
    """A plain float32 copy of ``img`` (a channel axis put in front when asked) with finite values only."""
    if isinstance(img, MetaTensor):
        t = img.as_tensor()
    elif isinstance(img, torch.Tensor):
        t = img
    else:
        t = torch.as_tensor(np.asarray(img))
    # The copy is what the in-place fill below writes to: the caller's data is never touched.
    t = t.detach().to(torch.float32, copy=True)
    if add_channel:
        t = t[None]
    return _fill_nonfinite_(t)


def _finite_out(t: torch.Tensor) -> torch.Tensor:
    """Last guard: arithmetic on extreme (finite) inputs can still overflow; no NaN/inf may leave."""
    return torch.nan_to_num_(t, nan=0.0, posinf=_F32_MAX, neginf=-_F32_MAX)


def _spacing(img, pixdim: Sequence[float] | None = None, affine=None) -> np.ndarray:
    """Voxel spacing (x, y, z) in mm: ``pixdim``, else the MetaTensor's, else the affine's, else 1 mm."""
    if pixdim is not None:
        sp = np.asarray(convert_to_numpy(pixdim), dtype=float).ravel()
    elif isinstance(img, MetaTensor):
        sp = np.asarray(convert_to_numpy(img.pixdim), dtype=float).ravel()
    elif affine is not None:
        sp = np.linalg.norm(np.asarray(convert_to_numpy(affine), dtype=float)[:3, :3], axis=0)
    else:
        sp = np.ones(3)
    if sp.size == 1:
        sp = np.repeat(sp, 3)
    if sp.size != 3 or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise ValueError(f"pixdim must be three positive spacings (x, y, z) in mm, got {sp.tolist()}")
    return sp


def _one_each(name: str, value, keys) -> tuple:
    """One output key per input key (``name`` is the argument's name, for the error)."""
    out = ensure_tuple_rep(value, len(keys))
    if len(set(out)) != len(out):
        raise ValueError(f"one {name} per key is needed, got {out} for keys {keys}")
    return out


def _one_channel(img, who: str) -> torch.Tensor:
    """``img`` of shape (1, X, Y, Z) or (X, Y, Z) as a finite float32 (1, X, Y, Z) tensor."""
    shape = tuple(img.shape)
    if len(shape) == 3 or (len(shape) == 4 and shape[0] == 1):
        # The channel goes in first so the non-finite fill takes the whole map's minimum, not a row's.
        return _float_tensor(img, add_channel=len(shape) == 3)
    raise ValueError(f"{who} expects one channel (1, X, Y, Z) or (X, Y, Z), got shape {shape}")
