"""SA-2's probability maps to masks and labels: thresholding (Eq. 8: a global tau, Otsu, multi-Otsu or an adaptive
local threshold) and the one-label-per-voxel class map MONAI Label shows. Arrays as in
:mod:`common.transforms.probability`."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type

from common.transforms.arrays import _check_method, _float_tensor, _one_channel, _one_each, _spacing

THRESHOLD_METHODS: tuple[str, ...] = ("global", "otsu", "multi_otsu", "adaptive_mean", "adaptive_median")


class ThresholdProbability(Transform):
    """Binarise one probability channel ``(1, X, Y, Z)`` or ``(X, Y, Z)`` into a uint8 ``(1, X, Y, Z)`` mask.

    ``"global"`` (Eq. 8): ``P >= tau``. ``"otsu"``: ``P > t`` with Otsu's ``t`` over all voxels.
    ``"multi_otsu"``: the top of ``classes`` Otsu classes, ``P >= t_max``. ``"adaptive_mean"`` /
    ``"adaptive_median"``: per axial slice, ``P > T_local`` with scikit-image's ``threshold_local``
    (odd block of ``block_mm`` per in-plane axis; ``T_local`` is the block's mean or median minus
    ``offset``, so large flat lungs need ``offset > 0``).

    ``tau`` is a floor for every method: a voxel below it is never foreground, so a flat or
    all-low map stays empty (``tau=0`` turns the floor off for the data-driven methods). A map with
    no finite variation gives an empty mask whatever the method.

    ``last_threshold`` (float) after each call: ``tau`` for "global"; Otsu's ``t`` / the highest
    multi-Otsu threshold; for the adaptive methods the mean local threshold over the mask's voxels
    (``tau`` when the mask is empty); the constant value for a constant map (``tau`` for "global").

    Spacing for the block: the ``pixdim`` given to ``__call__``, else the constructor's, else the
    input MetaTensor's, else 1 mm.
    """

    def __init__(
        self,
        method: str = "global",
        tau: float = 0.5,
        block_mm: float = 30.0,
        offset: float = 0.0,
        classes: int = 3,
        pixdim: Sequence[float] | None = None,
    ):
        self.method = _check_method(method, THRESHOLD_METHODS, "ThresholdProbability")
        if not np.isfinite(tau) or not np.isfinite(offset):
            raise ValueError(f"tau and offset must be finite, got {tau}, {offset}")
        if not block_mm > 0:
            raise ValueError(f"block_mm must be positive, got {block_mm}")
        if int(classes) < 2:
            raise ValueError(f"classes must be at least 2, got {classes}")
        self.tau, self.block_mm, self.offset, self.classes, self.pixdim = (
            float(tau),
            float(block_mm),
            float(offset),
            int(classes),
            pixdim,
        )
        self.last_threshold: float = self.tau

    def __call__(self, img, pixdim: Sequence[float] | None = None):
        p = _one_channel(img, "ThresholdProbability")[0].cpu().numpy()
        mask = np.zeros(p.shape, dtype=bool)
        lo, hi = (float(p.min()), float(p.max())) if p.size else (0.0, 0.0)
        if hi <= lo:
            self.last_threshold = self.tau if self.method == "global" else lo
        elif self.method == "global":
            mask = p >= self.tau
            self.last_threshold = self.tau
        elif self.method in ("otsu", "multi_otsu"):
            t = self._otsu(p)
            mask = ((p > t) if self.method == "otsu" else (p >= t)) & (p >= self.tau)
            self.last_threshold = t
        else:
            mask = self._adaptive(p, _spacing(img, pixdim if pixdim is not None else self.pixdim))
        return convert_to_dst_type(mask[None].astype(np.uint8), img, dtype=np.uint8)[0]

    def _otsu(self, p: np.ndarray) -> float:
        from skimage.filters import threshold_multiotsu, threshold_otsu

        if self.method == "multi_otsu":
            try:
                return float(threshold_multiotsu(p, classes=self.classes)[-1])
            except ValueError:
                pass  # fewer distinct values than classes: two classes still split the map
        return float(threshold_otsu(p))

    def _adaptive(self, p: np.ndarray, spacing: np.ndarray) -> np.ndarray:
        from skimage.filters import threshold_local

        block = tuple(max(3, 2 * int(round(self.block_mm / s / 2.0)) + 1) for s in spacing[:2])
        method = "mean" if self.method == "adaptive_mean" else "median"
        mask = np.zeros(p.shape, dtype=bool)
        total, count = 0.0, 0
        for k in range(p.shape[2]):
            plane = p[:, :, k]
            if float(plane.max()) < self.tau:
                continue  # the floor empties this slice: no local statistics needed
            local = threshold_local(plane, block_size=block, method=method, offset=self.offset, mode="reflect")
            fg = (plane > local) & (plane >= self.tau)
            mask[:, :, k] = fg
            total += float(local[fg].sum())
            count += int(fg.sum())
        self.last_threshold = total / count if count else self.tau
        return mask


class ThresholdProbabilityd(MapTransform):
    """Dictionary twin of :class:`ThresholdProbability`: thresholds ``channel`` of each map into ``mask_key``.

    Also writes ``f"{mask_key}_threshold"`` (float, see ``last_threshold``) and
    ``f"{mask_key}_threshold_method"``. With several keys, give one ``mask_key`` per key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        channel: int = 0,
        mask_key: str | Sequence[str] = "lung_mask",
        method: str = "global",
        tau: float = 0.5,
        block_mm: float = 30.0,
        offset: float = 0.0,
        classes: int = 3,
        pixdim: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = _one_each("mask_key", mask_key, self.keys)
        self.channel = int(channel)
        self.threshold = ThresholdProbability(method, tau, block_mm, offset, classes, pixdim)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            img = d[key]
            if img.ndim == 4:
                if not -img.shape[0] <= self.channel < img.shape[0]:
                    raise ValueError(f"channel {self.channel} out of range for {img.shape[0]} channels in {key!r}")
                c = self.channel % img.shape[0]
                img = img[c : c + 1]
            d[mask_key] = self.threshold(img)
            d[f"{mask_key}_threshold"] = float(self.threshold.last_threshold)
            d[f"{mask_key}_threshold_method"] = self.threshold.method
        return d


class ClassLabelMap(Transform):
    """One label map ``(1, X, Y, Z)`` uint8 from the SA-2 class probabilities ``(C, X, Y, Z)`` and the clean
    lung mask: what a viewer (MONAI Label, 3D Slicer) shows, one colour per structure.

    Label ``c + 1`` marks voxels whose most probable class is ``c`` with probability at least
    ``threshold``; 0 is background. Channel ``lung_channel`` is not taken from the map: the clean
    lung mask (Eq. 8 and the clean-up) is label ``lung_channel + 1`` and wins over every other class,
    so the label map's lung is exactly the mask the bundle writes.
    """

    def __init__(self, threshold: float = 0.5, lung_channel: int = 0):
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold, self.lung_channel = float(threshold), int(lung_channel)

    def __call__(self, prob, lung_mask=None):
        p = _float_tensor(prob)
        if p.ndim != 4:
            raise ValueError(f"ClassLabelMap: expected class probabilities (C, X, Y, Z), got shape {tuple(p.shape)}")
        if not 0 <= self.lung_channel < p.shape[0]:
            raise ValueError(
                f"ClassLabelMap: lung_channel {self.lung_channel} is not one of the map's {p.shape[0]} channels"
            )
        p[self.lung_channel] = -1.0  # p is a private copy; the lung comes from its clean mask, never the raw channel
        best, index = p.max(dim=0)
        labels = torch.where(best >= self.threshold, index + 1, torch.zeros_like(index)).to(torch.uint8)
        if lung_mask is not None:
            lung = _one_channel(lung_mask, "ClassLabelMap")[0].to(labels.device) > 0.5
            if lung.shape != labels.shape:
                raise ValueError(
                    f"ClassLabelMap: lung mask shape {tuple(lung.shape)} differs from the map's {tuple(labels.shape)}"
                )
            labels[lung] = self.lung_channel + 1
        return convert_to_dst_type(
            labels[None], prob, dtype=torch.uint8 if isinstance(prob, torch.Tensor) else np.uint8
        )[0]


class ClassLabelMapd(MapTransform):
    """Dictionary twin of :class:`ClassLabelMap`: ``label_key`` from ``keys`` (the probabilities) and
    ``lung_mask_key``; the probabilities stay as they are unless ``label_key`` is the same key."""

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label_map",
        lung_mask_key: str | None = "lung_mask",
        threshold: float = 0.5,
        lung_channel: int = 0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_key, self.lung_mask_key = label_key, lung_mask_key
        self.label_map = ClassLabelMap(threshold, lung_channel)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.label_key] = self.label_map(d[key], d.get(self.lung_mask_key) if self.lung_mask_key else None)
        return d
