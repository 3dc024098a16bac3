"""Spatial transforms specific to the method: keep the middle N axial slices; the in-plane field a slice network
should see."""

from __future__ import annotations

import logging
from typing import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialCrop, Transform
from monai.utils import convert_to_numpy

from common.lungmask import patient_extent
from common.transforms.arrays import _spacing

log = logging.getLogger(__name__)


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


class PatientFieldOfView(Transform):
    """The in-plane box ``(i0, i1, j0, j1)`` a slice network should see of a ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) HU
    volume: the whole slice, unless the patient (:func:`common.lungmask.patient_extent`) fills less than
    ``min_patient_fraction`` of it, as on a wide reconstruction field (a 600-700 mm planning CT); then a square (in
    mm, at ``pixdim``, else the MetaTensor's spacing) around the patient that they fill ``patient_fraction`` of, the
    share H-SAM learnt from (0.94 of LIDC's 440 mm field). The network then sees the chest at the scale it was trained
    at. ``min_patient_fraction`` 0 never crops."""

    def __init__(
        self, min_patient_fraction: float = 0.9, patient_fraction: float = 0.9, pixdim: Sequence[float] | None = None
    ):
        if not 0.0 <= min_patient_fraction <= patient_fraction <= 1.0:
            raise ValueError(
                "0 <= min_patient_fraction <= patient_fraction <= 1 is needed, got "
                f"{min_patient_fraction} and {patient_fraction}"
            )
        self.min_patient_fraction, self.patient_fraction, self.pixdim = (
            float(min_patient_fraction),
            float(patient_fraction),
            pixdim,
        )

    def __call__(self, hu) -> tuple[int, int, int, int]:
        volume = convert_to_numpy(hu)
        volume = volume.reshape(volume.shape[-3:])
        nx, ny = volume.shape[:2]
        whole = (0, nx, 0, ny)
        extent = patient_extent(volume) if self.min_patient_fraction > 0 else None
        if extent is None:
            return whole
        centre, width = extent
        if max(width[0] / nx, width[1] / ny) >= self.min_patient_fraction:
            return whole
        spacing = _spacing(hu, self.pixdim)
        side_mm = max(width[0] * spacing[0], width[1] * spacing[1]) / self.patient_fraction
        box = []
        for c, n, sp in zip(centre, (nx, ny), spacing[:2]):
            side = min(int(round(side_mm / sp)), n)
            start = int(np.clip(round(c - side / 2.0), 0, n - side))
            box += [start, start + side]
        log.info(
            "wide field: the patient fills %.2f of the %d x %d slice; the network sees the %.0f mm square %s around them",
            max(width[0] / nx, width[1] / ny),
            nx,
            ny,
            side_mm,
            box,
        )
        return tuple(box)


class PatientFieldOfViewd(MapTransform):
    """Dictionary twin of :class:`PatientFieldOfView`: the box of ``keys``' HU volume goes to ``box_key``, and into
    the metadata of the network's input ``image_key`` under the same name. :class:`common.inferers.SliceEnsembleInferer`
    runs the network on it (the rest of the slice is 0), given it or finding it in its input's metadata, as it does
    under MONAI Label, which calls the bundle's inferer with the input alone."""

    def __init__(
        self,
        keys: KeysCollection,
        box_key: str = "field_of_view",
        image_key: str | None = "image",
        min_patient_fraction: float = 0.9,
        patient_fraction: float = 0.9,
        pixdim: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.box_key, self.image_key = box_key, image_key
        self.field_of_view = PatientFieldOfView(min_patient_fraction, patient_fraction, pixdim)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            box = np.asarray(self.field_of_view(d[key]), dtype=np.int64)  # an array collates as one tensor
            d[self.box_key] = box
            if self.image_key is not None and isinstance(d.get(self.image_key), MetaTensor):
                d[self.image_key].meta[self.box_key] = box
        return d
