"""RandAugment-style strong augmentation of 2D CT slices: the out-of-distribution "teacher views"
of knowledge distillation (DeiT-LT), where the same augmented view goes to the frozen teacher and
to the student.

Teacher embeddings are cached on disk per (sample, view), so a view must be reproducible from its
key alone: :meth:`CTRandAugment.view` seeds the ops from a stable hash of ``"sample_id|view_id"``
and never from the transform's own random state. View 0 is always the clean slice.

Slices are channel-first ``(C, i, j)`` in the HU window mapped to [0, 1], as the preprocessing
writes them (``i`` patient left-right, ``j`` anterior-posterior). Every op is one of MONAI's own
transforms, chosen by :class:`monai.transforms.SomeOf`; ``magnitude`` in [0, 1] scales each op's
strength, and at 0 every op is the identity (up to interpolation rounding).
"""

from __future__ import annotations

import hashlib
import math
import threading
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    MapTransform,
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandCoarseDropout,
    Randomizable,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSharpen,
    RandGaussianSmooth,
    RandHistogramShift,
    RandScaleIntensityFixedMean,
    RandShiftIntensity,
    SomeOf,
    Transform,
)
from monai.utils import MAX_SEED, convert_to_dst_type, convert_to_tensor

_EPS_SIGMA = 1e-3  # MONAI's Gaussian kernels need sigma > 0; 1e-3 px is a delta kernel


class _Blend(Randomizable, Transform):
    """``img + weight * (op(img) - img)``: gives a strength knob to an op that has none."""

    def __init__(self, op: Randomizable, weight: float):
        self.op, self.weight = op, weight

    def set_random_state(self, seed=None, state=None):
        self.op.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, img):
        return img + self.weight * (self.op(img) - img)


def _cutout(m: float, size: Sequence[int]) -> Transform:
    lo = [max(1, round(m * s / 8)) for s in size]
    hi = [max(1, round(m * s / 4)) for s in size]
    # a hole cannot have size 0 (MONAI reads <= 0 as "whole image"), so magnitude 0 switches it off
    return RandCoarseDropout(
        holes=1, max_holes=max(1, round(4 * m)), spatial_size=lo, max_spatial_size=hi, fill_value=0.0, prob=float(m > 0)
    )


# name -> factory(magnitude, spatial size) -> MONAI transform; comments give the range at magnitude 1.
OPS: dict[str, Callable[[float, Sequence[int]], Transform]] = {
    "rotate": lambda m, s: RandAffine(prob=1.0, rotate_range=m * math.pi / 6, padding_mode="zeros"),  # +-30 deg
    "translate": lambda m, s: RandAffine(
        prob=1.0, translate_range=[m * 0.125 * n for n in s], padding_mode="zeros"
    ),  # +-12.5 % of the side
    "scale": lambda m, s: RandAffine(
        prob=1.0, scale_range=[m * 0.25] * len(s), padding_mode="zeros"
    ),  # x0.75..1.25 per axis
    "shear": lambda m, s: RandAffine(
        prob=1.0, shear_range=[m * 0.3] * len(s), padding_mode="zeros"
    ),  # shear factor +-0.3
    "flip_lr": lambda m, s: RandFlip(prob=m, spatial_axis=0),  # left-right flip with probability m
    "flip_ap": lambda m, s: RandFlip(prob=m, spatial_axis=1),  # anterior-posterior flip with probability m
    "gamma": lambda m, s: RandAdjustContrast(prob=1.0, gamma=(1 / (1 + m), 1 + m)),  # gamma 0.5..2
    "contrast": lambda m, s: RandScaleIntensityFixedMean(prob=1.0, factors=0.5 * m),  # x(1 +- 0.5) about the mean
    "brightness": lambda m, s: RandShiftIntensity(prob=1.0, offsets=0.2 * m),  # +-0.2 (+-280 HU)
    "noise": lambda m, s: RandGaussianNoise(prob=1.0, std=0.1 * m),  # sd up to 0.1 (140 HU)
    "blur": lambda m, s: RandGaussianSmooth(  # sigma 0.25..1.5 px
        prob=1.0,
        sigma_x=(_EPS_SIGMA + 0.25 * m, _EPS_SIGMA + 1.5 * m),
        sigma_y=(_EPS_SIGMA + 0.25 * m, _EPS_SIGMA + 1.5 * m),
    ),
    "sharpen": lambda m, s: RandGaussianSharpen(  # unsharp mask (sigma 0.5..1.5 px), amount 0..3
        prob=1.0,
        sigma1_x=(_EPS_SIGMA, _EPS_SIGMA),
        sigma1_y=(_EPS_SIGMA, _EPS_SIGMA),
        sigma2_x=(0.5, 1.5),
        sigma2_y=(0.5, 1.5),
        alpha=(0.0, 3.0 * m),
    ),
    "histogram_shift": lambda m, s: _Blend(
        RandHistogramShift(num_control_points=(5, 10), prob=1.0), m
    ),  # random piecewise-linear remap (5-10 points), blended in with weight m
    "bias_field": lambda m, s: RandBiasField(
        prob=1.0, degree=3, coeff_range=(-0.2 * m, 0.2 * m)
    ),  # smooth multiplicative field, coefficients +-0.2
    "cutout": _cutout,  # 1..4 holes of 1/8..1/4 of the side, filled with air (0)
}


def view_seed(sample_id: str, view_id: int) -> int:
    """Seed of one view: a stable hash (sha256) of ``"sample_id|view_id"``, the same in every process."""
    return int.from_bytes(hashlib.sha256(f"{sample_id}|{view_id}".encode()).digest()[:4], "little")


class CTRandAugment(Randomizable, Transform):
    """Apply ``n_ops`` distinct ops, picked at random from ``ops`` (default: all of :data:`OPS`), at ``magnitude``.

    Input: a channel-first 2D slice ``(C, H, W)`` in [0, 1], numpy or torch. Output: float32, clipped
    to [0, 1], same shape and same array type (numpy -> numpy, torch -> plain ``torch.Tensor`` on the
    input's device). ``__call__`` draws from the transform's own RNG (``set_random_state``);
    :meth:`view` is a pure function of (image, sample_id, view_id), for the teacher cache.
    """

    def __init__(self, n_ops: int = 2, magnitude: float = 0.5, ops: Sequence[str] | None = None):
        names = list(OPS) if ops is None else [ops] if isinstance(ops, str) else list(ops)
        unknown = [n for n in names if n not in OPS]
        if unknown:
            raise ValueError(f"unknown augmentation op(s) {unknown}; valid ops are {list(OPS)}")
        if not names or len(set(names)) != len(names):
            raise ValueError(f"ops must be a non-empty list of distinct op names, got {names}")
        if isinstance(n_ops, bool) or not isinstance(n_ops, (int, np.integer)) or not 1 <= n_ops <= len(names):
            raise ValueError(f"n_ops must be an integer between 1 and the number of ops ({len(names)}), got {n_ops!r}")
        if (
            isinstance(magnitude, bool)
            or not isinstance(magnitude, (int, float, np.floating))
            or not 0.0 <= magnitude <= 1.0
        ):
            raise ValueError(f"magnitude must be a number in [0, 1], got {magnitude!r}")
        self.ops, self.n_ops, self.magnitude = names, int(n_ops), float(magnitude)
        self._seed = 0

    def randomize(self, data=None) -> None:
        self._seed = int(self.R.randint(MAX_SEED, dtype="uint32"))

    def __call__(self, img):
        self.randomize()
        return self._apply(img, self._seed)

    def _pipeline(self, spatial: tuple[int, ...]) -> SomeOf:
        """The ops for slices of this size, built once per thread: building MONAI's transforms cost a third of a
        view (py-spy, SA-1 demo). Each use re-seeds every op (``set_random_state``), and each op draws its
        parameters anew on each call, so no draw carries over from one view to the next."""
        local = self.__dict__.get("_local")
        if local is None:
            local = self._local = threading.local()
        pipelines = local.__dict__.setdefault("pipelines", {})
        if spatial not in pipelines:
            pipelines[spatial] = SomeOf(
                [OPS[n](self.magnitude, spatial) for n in self.ops], num_transforms=self.n_ops, replace=False
            )
        return pipelines[spatial]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_local", None)  # per-thread pipelines: rebuilt where the transform is unpickled (spawned workers)
        return state

    def view(self, img, sample_id: str, view_id: int):
        """The view ``view_id`` of sample ``sample_id``: bit-identical on every call and in every process
        (so a cached teacher embedding matches it). View 0 is the clean image (a clipped float32 copy)."""
        if isinstance(view_id, bool) or not isinstance(view_id, (int, np.integer)) or view_id < 0:
            raise ValueError(f"view_id must be a non-negative integer, got {view_id!r}")
        return self._apply(img, view_seed(str(sample_id), int(view_id)) if view_id else None)

    def _apply(self, img, seed: int | None):
        t = convert_to_tensor(img, dtype=torch.float32, track_meta=False).clone()  # some ops work in place
        if t.ndim != 3:
            raise ValueError(f"CTRandAugment expects a channel-first 2D slice (C, H, W), got shape {tuple(t.shape)}")
        if seed is not None:  # re-seeding every op makes the view a function of the seed alone
            t = self._pipeline(tuple(t.shape[1:])).set_random_state(seed=seed)(t)
            t = t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)
        out = torch.clamp(t.float(), 0.0, 1.0)
        return convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)[0]


class CTRandAugmentd(Randomizable, MapTransform):
    """Dictionary twin of :class:`CTRandAugment` for distillation: per call draw a view id in
    ``[0, views)`` from this transform's RNG, store it under ``view_key`` (the teacher-cache key,
    with ``d[id_key]``), and replace each key's image with ``CTRandAugment.view(img, d[id_key], view_id)``.
    ``views=1`` always gives the clean image.
    """

    def __init__(
        self,
        keys: KeysCollection,
        views: int = 4,
        n_ops: int = 2,
        magnitude: float = 0.5,
        ops: Sequence[str] | None = None,
        id_key: str = "sample_id",
        view_key: str = "view_id",
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
            raise ValueError(f"views must be an integer >= 1 (view 0 is the clean image), got {views!r}")
        self.augment = CTRandAugment(n_ops, magnitude, ops)
        self.views, self.id_key, self.view_key = int(views), id_key, view_key
        self.view_id = 0

    def randomize(self, data=None) -> None:
        self.view_id = int(self.R.randint(self.views))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.id_key not in d:
            raise KeyError(
                f"CTRandAugmentd needs the sample id under key {self.id_key!r} (it keys the teacher cache); keys present: {list(d)}"
            )
        self.randomize()
        d[self.view_key] = self.view_id
        for key in self.key_iterator(d):
            d[key] = self.augment.view(d[key], str(d[self.id_key]), self.view_id)
        return d
