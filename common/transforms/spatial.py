"""Spatial transforms specific to the method: keep the middle N axial slices."""

from __future__ import annotations

from typing import Hashable, Mapping

from monai.config import KeysCollection
from monai.transforms import MapTransform, SpatialCrop, Transform


def middle_slice_range(n_slices: int, keep: int) -> tuple[int, int]:
    """[start, stop) of the ``keep`` middle slices of ``n_slices`` (all of them when there are fewer)."""
    if keep <= 0:
        raise ValueError(f"number of slices to keep must be positive, got {keep}")
    if n_slices <= keep:
        return 0, n_slices
    start = (n_slices - keep) // 2
    return start, start + keep


class TrimSlices(Transform):
    """Keep the middle ``num_slices`` slices along the last spatial axis of a ``(C, X, Y, Z)`` volume.

    The method trims RAD-ChestCT scans to 20 slices: the middle of a chest CT holds most lung.
    The crop goes through MONAI's SpatialCrop, so a MetaTensor's affine follows the kept slices.
    """

    def __init__(self, num_slices: int = 20):
        middle_slice_range(1, num_slices)  # validates
        self.num_slices = num_slices

    def __call__(self, img):
        if img.ndim != 4:
            raise ValueError(f"TrimSlices expects a channel-first 3D volume (C, X, Y, Z), got shape {tuple(img.shape)}")
        start, stop = middle_slice_range(img.shape[-1], self.num_slices)
        return SpatialCrop(roi_start=(0, 0, start), roi_end=(img.shape[1], img.shape[2], stop))(img)


class TrimSlicesd(MapTransform):
    """Dictionary twin of :class:`TrimSlices` (image and label are cut at the same slices)."""

    def __init__(self, keys: KeysCollection, num_slices: int = 20, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.trim = TrimSlices(num_slices)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.trim(d[key])
        return d
