"""SA-2 post-processing of zero-shot probability maps, the maths: normalisation (Eq. 5-6) and smoothing (Eq. 7);
thresholding (Eq. 8) and the class label map are in :mod:`common.transforms.threshold`, the binary lung-mask
clean-up in :mod:`common.transforms.mask`.

Arrays are channel-first ``(C, X, Y, Z)`` numpy arrays or torch tensors (MetaTensor included);
Z, the last axis, is the axial slice axis. Probabilities come out float32 and masks uint8, in the
input's type family (numpy in, numpy out; tensor in, tensor out on the same device; a MetaTensor
keeps its metadata). Non-finite inputs are replaced by their channel's finite minimum (0 when the
channel has none) before anything else, so no output ever holds NaN or inf.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import GaussianSmooth, MapTransform, Transform
from monai.utils import convert_to_dst_type
from scipy import ndimage

from common.transforms.arrays import _LOGIT_LIMIT, _check_method, _finite_out, _float_tensor, _one_channel, _spacing

SIMILARITY_METHODS: tuple[str, ...] = ("softmax", "minmax", "sigmoid")
SMOOTHING_METHODS: tuple[str, ...] = ("none", "gaussian", "bilateral", "guided")


class SimilarityToProbability(Transform):
    """Turn cosine-similarity maps ``(C, ...)`` into probabilities in [0, 1] (float32).

    ``"softmax"``: softmax over the channels of ``scale * sim`` (``scale`` is CLIP's logit scale,
    1 / temperature); the channels sum to 1. ``"minmax"`` (Eq. 5): each channel rescaled to [0, 1]
    over its whole extent; a constant channel becomes 0. ``"sigmoid"`` (Eq. 6):
    ``1 / (1 + exp(-alpha (sim - beta)))`` per voxel.

    ``num_classes`` keeps the first that many channels: those after it are background classes
    ("air outside the body", "soft tissue") that take their share of the softmax and are then
    dropped, so the anatomical channels no longer have to sum to 1 where there is no anatomy.
    """

    def __init__(
        self,
        method: str = "softmax",
        scale: float = 1.0,
        alpha: float = 10.0,
        beta: float = 0.5,
        num_classes: int | None = None,
    ):
        self.method = _check_method(method, SIMILARITY_METHODS, "SimilarityToProbability")
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        self.num_classes = None if num_classes is None else int(num_classes)
        for name, value in (("scale", scale), ("alpha", alpha), ("beta", beta)):
            if not np.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        self.scale, self.alpha, self.beta = float(scale), float(alpha), float(beta)

    def __call__(self, img):
        t = _float_tensor(img)
        if t.ndim < 2:
            raise ValueError(f"SimilarityToProbability expects channel-first maps (C, ...), got shape {tuple(t.shape)}")
        if self.num_classes is not None and t.shape[0] < self.num_classes:
            raise ValueError(
                f"SimilarityToProbability: {t.shape[0]} channels, fewer than num_classes={self.num_classes}"
            )
        # in place on the private copy: a whole-scan map (700 MB for 5 x 512 x 512 x 133) is never doubled
        if self.method == "softmax":
            out = t.mul_(self.scale).clamp_(-_LOGIT_LIMIT, _LOGIT_LIMIT)
            out.sub_(out.amax(dim=0, keepdim=True)).exp_()
            out.div_(out.sum(dim=0, keepdim=True))
        elif self.method == "minmax":
            flat = t.reshape(t.shape[0], -1)
            view = (t.shape[0],) + (1,) * (t.ndim - 1)
            lo, hi = flat.amin(dim=1).reshape(view), flat.amax(dim=1).reshape(view)
            span = hi - lo
            varies = span > 0
            # A constant channel carries no contrast: zeros, not 0 / 0.
            out = torch.where(varies, (t - lo) / torch.where(varies, span, torch.ones_like(span)), torch.zeros_like(t))
        else:
            out = torch.sigmoid_(t.sub_(self.beta).mul_(self.alpha))
        out = _finite_out(out).clamp_(0.0, 1.0)
        if self.num_classes is not None:
            out = out[: self.num_classes].contiguous()
        return convert_to_dst_type(out, img, dtype=np.float32)[0]


class SimilarityToProbabilityd(MapTransform):
    """Dictionary twin of :class:`SimilarityToProbability`."""

    def __init__(
        self,
        keys: KeysCollection,
        method: str = "softmax",
        scale: float = 1.0,
        alpha: float = 10.0,
        beta: float = 0.5,
        num_classes: int | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.to_probability = SimilarityToProbability(method, scale, alpha, beta, num_classes)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.to_probability(d[key])
        return d


def _box_mean(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return ndimage.uniform_filter(a, size=size, mode="reflect")


def _guide_statistics(guide: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Box mean and variance of a guide plane: the same for every channel it steers, so computed once."""
    mean_i = _box_mean(guide, size)
    return mean_i, _box_mean(guide * guide, size) - mean_i * mean_i


def _guided_filter(
    p: np.ndarray,
    guide: np.ndarray,
    size: tuple[int, int],
    eps: float,
    guide_stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """He et al.'s grey-guide filter of one 2D plane: locally ``q = a * guide + b``, box means of ``size``."""
    mean_i, var_i = _guide_statistics(guide, size) if guide_stats is None else guide_stats
    mean_p = _box_mean(p, size)
    cov_ip = _box_mean(guide * p, size) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return _box_mean(a, size) * guide + _box_mean(b, size)


class SmoothProbability(Transform):
    """Smooth probability maps ``(C, X, Y, Z)``; float32 out.

    ``"none"``: identity. ``"gaussian"`` (Eq. 7): MONAI's GaussianSmooth with sigma ``sigma_mm /
    pixdim`` voxels per axis; ``spatial_dims=2`` smooths each axial slice alone (the maps are made
    slice by slice), 3 smooths in 3D. ``"bilateral"``: scikit-image's edge-preserving bilateral
    filter per axial slice and channel (``sigma_color`` in probability units). ``"guided"``: the
    guided filter (He et al.) per axial slice, steered by ``guide`` (the CT in [0, 1], shape
    ``(1, X, Y, Z)`` or ``(X, Y, Z)``), box radius ``round(sqrt(3) * sigma)`` voxels and
    regulariser ``guided_eps``; its output is clipped to [0, 1].

    Spacing: the ``pixdim`` given to ``__call__``, else the constructor's, else the input
    MetaTensor's, else 1 mm.
    """

    def __init__(
        self,
        method: str = "gaussian",
        sigma_mm: float = 3.0,
        spatial_dims: int = 2,
        pixdim: Sequence[float] | None = None,
        sigma_color: float = 0.1,
        guided_eps: float = 1e-3,
    ):
        self.method = _check_method(method, SMOOTHING_METHODS, "SmoothProbability")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 (per axial slice) or 3, got {spatial_dims}")
        if self.method != "none" and not (np.isfinite(sigma_mm) and sigma_mm > 0):
            raise ValueError(f"sigma_mm must be positive, got {sigma_mm}")
        if not sigma_color > 0 or not guided_eps > 0:
            raise ValueError(f"sigma_color and guided_eps must be positive, got {sigma_color}, {guided_eps}")
        self.sigma_mm, self.spatial_dims, self.pixdim = float(sigma_mm), int(spatial_dims), pixdim
        self.sigma_color, self.guided_eps = float(sigma_color), float(guided_eps)

    def __call__(self, img, guide=None, pixdim: Sequence[float] | None = None):
        t = _float_tensor(img)
        if t.ndim != 4:
            raise ValueError(
                f"SmoothProbability expects a channel-first volume (C, X, Y, Z), got shape {tuple(t.shape)}"
            )
        if self.method == "guided" and guide is None:
            raise ValueError("SmoothProbability(method='guided') needs a guide image (the CT in [0, 1])")
        if self.method == "none":
            return convert_to_dst_type(t, img, dtype=np.float32)[0]
        sigma = self.sigma_mm / _spacing(img, pixdim if pixdim is not None else self.pixdim)
        if self.method == "gaussian":
            out = self._gaussian(t, sigma)
        elif self.method == "bilateral":
            out = torch.from_numpy(self._bilateral(t.cpu().numpy(), sigma))
        else:
            out = torch.from_numpy(self._guided(t.cpu().numpy(), guide, sigma))
        return convert_to_dst_type(_finite_out(out), img, dtype=np.float32)[0]

    def _gaussian(self, t: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
        c, x, y, z = t.shape
        if self.spatial_dims == 2:
            # Slices go to the channel axis so the kernel never reaches across them.
            t = t.permute(0, 3, 1, 2).reshape(c * z, x, y)
            sigma = sigma[:2]
        # GaussianFilter pads with zeros, which would dim lungs cut by the field of view's edge:
        # replicate the border instead (the kernel reaches int(4 sigma + 0.5) voxels).
        tails = [int(max(4.0 * s, 0.5) + 0.5) for s in sigma]
        pad = [p for tail in reversed(tails) for p in (tail, tail)]
        padded = torch.nn.functional.pad(t[None], pad, mode="replicate")[0]
        out = GaussianSmooth(sigma=[float(s) for s in sigma])(padded)
        out = out.as_tensor() if isinstance(out, MetaTensor) else out
        out = out[(slice(None),) + tuple(slice(tail, tail + n) for tail, n in zip(tails, t.shape[1:]))]
        if self.spatial_dims == 2:
            out = out.reshape(c, z, x, y).permute(0, 2, 3, 1)
        return out.contiguous()

    def _bilateral(self, arr: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        from skimage.restoration import denoise_bilateral

        sigma_spatial = float(np.mean(sigma[:2]))  # scikit-image takes one in-plane sigma
        out = arr.copy()
        for c in range(arr.shape[0]):
            for k in range(arr.shape[3]):
                plane = arr[c, :, :, k]
                lo, hi = float(plane.min()), float(plane.max())
                if hi <= lo:
                    continue  # constant slice: nothing to smooth
                # scikit-image scales its colour table by the slice maximum: shift to [0, hi - lo] so it is positive.
                out[c, :, :, k] = lo + denoise_bilateral(
                    plane - lo, sigma_color=self.sigma_color, sigma_spatial=sigma_spatial, mode="edge"
                )
        return out

    def _guided(self, arr: np.ndarray, guide, sigma: np.ndarray) -> np.ndarray:
        if tuple(guide.shape) not in (arr.shape[1:], (1,) + arr.shape[1:]):
            raise ValueError(
                f"guide must be (1, X, Y, Z) or (X, Y, Z) matching {arr.shape[1:]}, got {tuple(guide.shape)}"
            )
        g = _one_channel(guide, "SmoothProbability guide")[0].cpu().numpy()
        # A box of radius r spreads like a Gaussian of sigma r / sqrt(3): same reach as "gaussian".
        size = tuple(2 * max(1, int(round(np.sqrt(3.0) * s))) + 1 for s in sigma[:2])
        # ``arr`` is this transform's own copy and each plane is read (as float64) before it is
        # overwritten, so the filter works in place: no second whole-scan array

        def filter_slice(k: int) -> None:
            plane_guide = g[:, :, k].astype(np.float64)  # float64: var = E[I^2] - E[I]^2 cancels badly in float32
            stats = _guide_statistics(plane_guide, size)
            for c in range(arr.shape[0]):
                arr[c, :, :, k] = _guided_filter(
                    arr[c, :, :, k].astype(np.float64), plane_guide, size, self.guided_eps, stats
                )

        # slices in threads (SciPy's filters release the GIL; each slice writes only its own planes): the same result
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            list(pool.map(filter_slice, range(arr.shape[3])))
        return np.clip(arr, 0.0, 1.0, out=arr)


class SmoothProbabilityd(MapTransform):
    """Dictionary twin of :class:`SmoothProbability`; ``"guided"`` reads its guide from ``guide_key``.

    Spacing: the ``pixdim`` argument, else each input MetaTensor's, else 1 mm.
    """

    def __init__(
        self,
        keys: KeysCollection,
        guide_key: Hashable | None = None,
        method: str = "gaussian",
        sigma_mm: float = 3.0,
        spatial_dims: int = 2,
        pixdim: Sequence[float] | None = None,
        sigma_color: float = 0.1,
        guided_eps: float = 1e-3,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.smooth = SmoothProbability(method, sigma_mm, spatial_dims, pixdim, sigma_color, guided_eps)
        if self.smooth.method == "guided" and guide_key is None:
            raise ValueError("SmoothProbabilityd(method='guided') needs guide_key (the CT in [0, 1])")
        self.guide_key = guide_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        guide = None
        if self.smooth.method == "guided":
            if self.guide_key not in d:
                raise KeyError(f"guide key {self.guide_key!r} not in the data (keys: {list(d)})")
            guide = d[self.guide_key]
        for key in self.key_iterator(d):
            d[key] = self.smooth(d[key], guide=guide)
        return d
