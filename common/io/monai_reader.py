"""``CTReader``: the project's readers as a MONAI ``ImageReader``, for ``LoadImage``/``LoadImaged``.

In a bundle config: ``{"_target_": "LoadImaged", "keys": "image", "reader": "common.io.CTReader",
"ensure_channel_first": true}``. Works on DICOM series folders, NIfTI, NRRD/MHA, RAD-ChestCT npz
and DeepLesion PNG folders, always in HU with a RAS affine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from common.io.readers import format_of, read_ct
from common.io.volume import CTReadError, CTVolume

# Only plain header facts travel into MONAI's metadata (it collates them across a batch).
_META_KEYS = (
    "format",
    "modality",
    "series_uid",
    "study_uid",
    "patient_id",
    "frame_of_reference_uid",
    "spacing_assumed",
    "volume_id",
)


class CTReader(ImageReader):
    """MONAI image reader backed by ``common.io.read_ct``; ``reader_kwargs`` go to the format's reader."""

    def __init__(self, **reader_kwargs):
        super().__init__()
        self.reader_kwargs = reader_kwargs

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        try:
            return all(format_of(n) is not None for n in names)
        except CTReadError:
            return False

    def read(self, data: Sequence[str] | str, **kwargs) -> CTVolume | list[CTVolume]:
        names = [data] if isinstance(data, (str, Path)) else list(data)
        vols = [read_ct(n, **{**self.reader_kwargs, **kwargs}) for n in names]
        return vols[0] if len(vols) == 1 else vols

    def get_data(self, img: CTVolume | list[CTVolume]) -> tuple[np.ndarray, dict[str, Any]]:
        vols = img if isinstance(img, list) else [img]
        if len(vols) > 1 and len({v.shape for v in vols}) > 1:
            raise CTReadError(vols[1].source, f"cannot stack volumes of shapes {[v.shape for v in vols]}")
        v0 = vols[0]
        array = v0.hu if len(vols) == 1 else np.stack([v.hu for v in vols], axis=0)
        meta: dict[str, Any] = {
            MetaKeys.AFFINE: v0.affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: v0.affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(v0.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if len(vols) == 1 else 0,
            "filename_or_obj": v0.source,
            "pixdim": np.r_[1.0, v0.spacing],
        }
        for key in _META_KEYS:
            if v0.meta.get(key) is not None:
                meta[key] = v0.meta[key]
        return array, meta


def to_metatensor(vol: CTVolume):
    """A CTVolume as a channel-first MONAI MetaTensor (1, X, Y, Z) carrying its affine, for MONAI transforms."""
    import torch
    from monai.data import MetaTensor

    meta = {"filename_or_obj": vol.source, MetaKeys.SPACE: SpaceKeys.RAS, MetaKeys.ORIGINAL_AFFINE: vol.affine.copy()}
    return MetaTensor(torch.from_numpy(vol.hu)[None], affine=torch.from_numpy(vol.affine.copy()), meta=meta)
