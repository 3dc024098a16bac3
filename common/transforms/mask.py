"""Binary lung-mask post-processing shared by SA-2, SA-3a and H-SAM: the lungs kept inside the body, slices that
do not continue their neighbours dropped, the lung surface refined to the CT's air/tissue edge, and the clean-up to the
largest components with the right/left split.

Masks are ``(1, X, Y, Z)`` (or ``(X, Y, Z)``) numpy arrays or torch tensors, foreground > 0.5; Z is the axial slice
axis. Outputs are uint8 in the input's type family (a MetaTensor keeps its metadata).
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage

from common.classes import LEFT_LUNG, RIGHT_LUNG
from common.lungmask import LUNG_HU_THRESHOLD
from common.transforms.arrays import _one_channel, _one_each, _spacing


class LungMaskCleanup(Transform):
    """Clean a binary lung mask ``(1, X, Y, Z)`` or ``(X, Y, Z)`` (foreground: value > 0.5) into uint8 ``(1, X, Y, Z)``.

    Keeps the ``max_components`` largest 3D connected components (6-connectivity, faces only, as
    :func:`common.lungmask.hu_threshold_lung_mask`: diagonal contacts do not weld islands to a
    lung) of at least ``min_component_ml``, then fills holes (vessels, nodules) per axial slice.
    ``max_components=None`` keeps every large enough component. Voxel volume from the
    ``pixdim`` given to ``__call__``, else the constructor's, else the input MetaTensor's, else 1 mm.
    """

    def __init__(
        self,
        max_components: int | None = 2,
        min_component_ml: float = 10.0,
        fill_holes: bool = True,
        pixdim: Sequence[float] | None = None,
    ):
        if max_components is not None and int(max_components) < 1:
            raise ValueError(f"max_components must be at least 1 (or None for all), got {max_components}")
        if not min_component_ml >= 0:
            raise ValueError(f"min_component_ml must be >= 0, got {min_component_ml}")
        self.max_components = None if max_components is None else int(max_components)
        self.min_component_ml, self.fill_holes, self.pixdim = float(min_component_ml), bool(fill_holes), pixdim

    def __call__(self, img, pixdim: Sequence[float] | None = None):
        mask = self.clean(self.binary(img), _spacing(img, pixdim if pixdim is not None else self.pixdim))
        return convert_to_dst_type(mask[None].astype(np.uint8), img, dtype=np.uint8)[0]

    @staticmethod
    def binary(img) -> np.ndarray:
        """The input as an (X, Y, Z) boolean mask (NaN is background)."""
        return _one_channel(img, "LungMaskCleanup")[0].cpu().numpy() > 0.5

    def clean(self, mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """The cleaned (X, Y, Z) boolean mask of an (X, Y, Z) boolean mask at ``spacing`` mm."""
        labels, n = ndimage.label(mask)
        if n == 0:
            return np.zeros(mask.shape, dtype=bool)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        big = np.flatnonzero(sizes * voxel_ml >= self.min_component_ml)
        big = big[big > 0]
        big = big[np.argsort(sizes[big], kind="stable")[::-1]][: self.max_components]
        keep = np.zeros(n + 1, dtype=bool)
        keep[big] = True
        out = keep[labels]
        if self.fill_holes:
            for k in np.flatnonzero(out.any(axis=(0, 1))):
                out[:, :, k] = ndimage.binary_fill_holes(out[:, :, k])
        return out


class LungMaskCleanupd(MapTransform):
    """Dictionary twin of :class:`LungMaskCleanup`. A plain array's spacing comes from ``pixdim``, else from
    ``affine``'s column norms (a MetaTensor carries its own)."""

    def __init__(
        self,
        keys: KeysCollection,
        max_components: int | None = 2,
        min_component_ml: float = 10.0,
        fill_holes: bool = True,
        pixdim: Sequence[float] | None = None,
        affine=None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.affine = None if affine is None else np.asarray(convert_to_numpy(affine), dtype=float)
        self.cleanup = LungMaskCleanup(max_components, min_component_ml, fill_holes, pixdim)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cleanup(d[key], _spacing(d[key], self.cleanup.pixdim, self.affine))
        return d


class SplitLungSides(Transform):
    """A lung mask ``(1, X, Y, Z)`` (foreground: value > 0.5) split into its sides: uint8 ``(1, X, Y, Z)`` with
    ``RIGHT_LUNG`` = 1 and ``LEFT_LUNG`` = 2 (lungmask's and TotalSegmentator's convention), 0 elsewhere, by
    :func:`common.lungmask.split_left_right` (the patient's right is the smaller RAS x). The affine is the
    MetaTensor's, else ``affine``, else identity. :meth:`volumes_ml` gives each side's volume."""

    def __init__(self, affine=None, pixdim: Sequence[float] | None = None):
        self.affine = None if affine is None else np.asarray(convert_to_numpy(affine), dtype=float)
        self.pixdim = pixdim

    def _affine(self, img) -> np.ndarray:
        if isinstance(img, MetaTensor):
            return np.asarray(convert_to_numpy(img.affine), dtype=float)
        return self.affine if self.affine is not None else np.eye(4)

    def __call__(self, img):
        from common.lungmask import split_left_right

        mask = LungMaskCleanup.binary(img)
        right, left = split_left_right(mask, self._affine(img))
        sides = np.zeros((1,) + mask.shape, dtype=np.uint8)
        sides[0][right] = RIGHT_LUNG
        sides[0][left] = LEFT_LUNG
        return convert_to_dst_type(sides, img, dtype=np.uint8)[0]

    def volumes_ml(self, sides, mask) -> dict[str, float]:
        """``{"right", "left", "total"}`` in mL of ``sides`` (this transform's output) and of the whole ``mask``."""
        voxel_ml = float(np.prod(_spacing(mask, self.pixdim, self._affine(mask)))) / 1000.0
        s = convert_to_numpy(sides)
        return {
            "right": float((s == RIGHT_LUNG).sum()) * voxel_ml,
            "left": float((s == LEFT_LUNG).sum()) * voxel_ml,
            "total": float(LungMaskCleanup.binary(mask).sum()) * voxel_ml,
        }


class SplitLungSidesd(MapTransform):
    """Dictionary twin of :class:`SplitLungSides`: the sides of ``key`` to ``sides_key`` (one per key), their
    volumes to ``f"{sides_key}_ml"``."""

    def __init__(
        self,
        keys: KeysCollection,
        sides_key: str | Sequence[str] = "lung_sides",
        affine=None,
        pixdim: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.sides_keys = _one_each("sides_key", sides_key, self.keys)
        self.split = SplitLungSides(affine, pixdim)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, sides_key in self.key_iterator(d, self.sides_keys):
            d[sides_key] = self.split(d[key])
            d[f"{sides_key}_ml"] = self.split.volumes_ml(d[sides_key], d[key])
        return d


class RestrictToBody(Transform):
    """Zero a mask outside the patient's body (``common.lungmask.body_mask`` of the HU image): the air
    around the patient looks like lung to a patch classifier, and lungs are always inside the body. Voxel
    spacing from ``pixdim``, else the HU image's MetaTensor, else the mask's, else 1 mm."""

    def __init__(self, threshold_hu: float = -500.0, pixdim: Sequence[float] | None = None):
        self.threshold_hu, self.pixdim = float(threshold_hu), pixdim

    def __call__(self, mask, hu):
        from common.lungmask import body_mask

        m = convert_to_numpy(mask)
        spacing = _spacing(hu if isinstance(hu, MetaTensor) else mask, self.pixdim)
        body = body_mask(convert_to_numpy(hu).reshape(m.shape[-3:]), spacing, self.threshold_hu)
        return convert_to_dst_type((m > 0) & body.reshape(m.shape), mask, dtype=np.uint8)[0]


class RestrictToBodyd(MapTransform):
    """Dictionary twin of :class:`RestrictToBody`; the HU volume comes from ``image_key``."""

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        threshold_hu: float = -500.0,
        pixdim: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.restrict = RestrictToBody(threshold_hu, pixdim)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.restrict(d[key], d[self.image_key])
        return d


class RefineLungBoundary(Transform):
    """Move a lung mask's surface onto the CT's air/tissue edge, by at most ``band_mm``.

    A network draws its mask on a coarser grid than the CT (H-SAM's decoder: 256 px across the slice, about 1.7 mm
    on a 430 mm field of view), so its surface lies up to a few voxels off the pleura, on either side. Every voxel
    within ``band_mm`` of the mask's surface (3D distance in mm, inside or outside) takes the CT's verdict: lung
    where darker than ``threshold_hu``. Deeper voxels stay lung (vessels, nodules), farther ones stay background, so
    what the mask covers (which slices, the trachea left out, the table left out) stays the network's; only its
    edge moves. The image border is not a surface: a lung cut by it is not trimmed there. ``band_mm`` 0 returns
    the mask unchanged. Label-free: it needs the HU volume only.
    """

    def __init__(
        self, band_mm: float = 3.0, threshold_hu: float = LUNG_HU_THRESHOLD, pixdim: Sequence[float] | None = None
    ):
        if not band_mm >= 0:
            raise ValueError(f"band_mm must be >= 0, got {band_mm}")
        self.band_mm, self.threshold_hu, self.pixdim = float(band_mm), float(threshold_hu), pixdim

    def __call__(self, mask, hu, pixdim: Sequence[float] | None = None):
        m = _one_channel(mask, "RefineLungBoundary")[0].cpu().numpy() > 0.5
        h = np.asarray(convert_to_numpy(hu), dtype=np.float32).reshape(m.shape)
        out = self.refine(m, h, _spacing(mask, pixdim if pixdim is not None else self.pixdim))
        return convert_to_dst_type(out[None].astype(np.uint8), mask, dtype=np.uint8)[0]

    def refine(self, mask: np.ndarray, hu: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """The refined (X, Y, Z) boolean mask of an (X, Y, Z) boolean mask and HU volume at ``spacing`` mm."""
        if self.band_mm == 0 or not mask.any():
            return mask.copy()
        spacing = np.asarray(spacing, dtype=float)
        margin = np.ceil(self.band_mm / spacing).astype(int) + 1  # the band's reach, in voxels, around the mask
        extent = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != i))) for i in range(3)]
        lo = np.maximum(np.array([e[0] for e in extent]) - margin, 0)
        hi = np.minimum(np.array([e[-1] + 1 for e in extent]) + margin, mask.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        m = mask[box]
        depth = ndimage.distance_transform_edt(m, sampling=spacing)  # a lung voxel's distance to the background
        reach = ndimage.distance_transform_edt(~m, sampling=spacing)  # a background voxel's distance to the lung
        band = np.where(m, depth <= self.band_mm, reach <= self.band_mm)
        out = mask.copy()
        out[box] = np.where(band, hu[box] < self.threshold_hu, m)
        return out


class RefineLungBoundaryd(MapTransform):
    """Dictionary twin of :class:`RefineLungBoundary`; the HU volume comes from ``image_key``."""

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        band_mm: float = 3.0,
        threshold_hu: float = LUNG_HU_THRESHOLD,
        pixdim: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.refine = RefineLungBoundary(band_mm, threshold_hu, pixdim)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.refine(d[key], d[self.image_key])
        return d


class RemoveInconsistentSlices(Transform):
    """Drop the axial slices of a binary mask ``(1, X, Y, Z)`` that do not continue their neighbours.

    A slice is kept when at least ``min_overlap`` of its area lies inside the union of the masks of
    the slices above and below (lungs change slowly from slice to slice); an isolated slice (both
    neighbours empty) scores 0, and so does a slice where a prompt leaked into the body. Volumes
    of one or two slices are left alone. Slices are the third voxel axis (axial for the CT volumes
    this project reads)."""

    def __init__(self, min_overlap: float = 0.5):
        if not 0.0 <= min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
        self.min_overlap = float(min_overlap)

    def __call__(self, img):
        m = _one_channel(img, "RemoveInconsistentSlices")[0].cpu().numpy() > 0.5
        return convert_to_dst_type(self.clean(m)[None].astype(np.uint8), img, dtype=np.uint8)[0]

    def clean(self, mask: np.ndarray) -> np.ndarray:
        """The kept (X, Y, Z) boolean mask."""
        if mask.shape[2] < 3 or self.min_overlap == 0.0:
            return mask.copy()
        neighbours = np.zeros_like(mask)
        neighbours[:, :, 1:] |= mask[:, :, :-1]
        neighbours[:, :, :-1] |= mask[:, :, 1:]
        area = mask.sum(axis=(0, 1))
        inside = (mask & neighbours).sum(axis=(0, 1))
        drop = (area > 0) & (inside < self.min_overlap * area)
        out = mask.copy()
        out[:, :, drop] = False
        return out


class RemoveInconsistentSlicesd(MapTransform):
    """Dictionary twin of :class:`RemoveInconsistentSlices`."""

    def __init__(self, keys: KeysCollection, min_overlap: float = 0.5, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = RemoveInconsistentSlices(min_overlap)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
