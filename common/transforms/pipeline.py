"""The standard CT preprocessing chain, built from MONAI transforms and the project's own."""

from __future__ import annotations

from typing import Sequence

from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Resized, Spacingd

from common.transforms.intensity import HU_WINDOW, HUWindowd, NLMDenoised
from common.transforms.spatial import TrimSlicesd


def ct_preprocessing(
    keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = (),
    load: bool = True,
    orientation: str | None = "RAS",
    target_spacing: Sequence[float] | None = None,
    trim_slices: int | None = None,
    spatial_size: Sequence[int] | None = None,
    denoise: bool = False,
    hu_window: Sequence[float] = HU_WINDOW,
) -> Compose:
    """Read -> orient -> resample -> trim -> resize -> (denoise) -> HU window, for images and labels.

    Labels follow every spatial step with nearest-neighbour interpolation and skip intensity steps.
    ``spatial_size`` may use -1 to keep an axis, e.g. ``(512, 512, -1)``.
    """
    keys, label_keys = list(keys), list(label_keys)
    all_keys = keys + label_keys
    modes = ["bilinear"] * len(keys) + ["nearest"] * len(label_keys)
    steps = []
    if load:
        from common.io import CTReader

        # The reader fills the volume in the target orientation, so Orientationd below has
        # nothing to copy for it (it still orients other inputs, e.g. given MetaTensors).
        steps.append(LoadImaged(all_keys, reader=CTReader(axcodes=orientation), image_only=True))
        steps.append(EnsureChannelFirstd(all_keys, channel_dim="no_channel"))
    if orientation:
        steps.append(Orientationd(all_keys, axcodes=orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if target_spacing:
        steps.append(Spacingd(all_keys, pixdim=tuple(target_spacing), mode=modes))
    if trim_slices:
        steps.append(TrimSlicesd(all_keys, num_slices=trim_slices))
    if spatial_size:
        steps.append(
            Resized(all_keys, spatial_size=tuple(spatial_size), mode=["area" if m == "bilinear" else m for m in modes])
        )
    if denoise:
        steps.append(NLMDenoised(keys))
    steps.append(HUWindowd(keys, hu_window=hu_window))
    return Compose(steps)
