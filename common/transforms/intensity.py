"""Intensity transforms on HU volumes: the lung HU window and non-local-means denoising."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange, Transform
from monai.utils import convert_to_dst_type

# The method's window: it covers lung parenchyma (-900..-500) up to soft tissue and vessels.
HU_WINDOW: tuple[float, float] = (-1000.0, 400.0)


class HUWindow(Transform):
    """Clip HU to ``hu_window`` and map it linearly to [0, 1] (float32, one output buffer)."""

    backend = ScaleIntensityRange.backend

    def __init__(self, hu_window: Sequence[float] = HU_WINDOW):
        lo, hi = float(hu_window[0]), float(hu_window[1])
        if not hi > lo:
            raise ValueError(f"hu_window must be (low, high) with high > low, got {tuple(hu_window)}")
        self.hu_window = (lo, hi)

    def __call__(self, img):
        import torch

        lo, hi = self.hu_window
        t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        # clamp allocates the output once; the rescale then works in place on it (no temporaries
        # the size of the volume, which matters on 512 x 512 x 500 scans).
        out = torch.clamp(t.float() if not t.is_floating_point() else t, lo, hi)
        out.sub_(lo).div_(hi - lo)
        return out if isinstance(img, torch.Tensor) else convert_to_dst_type(out, img, dtype=np.float32)[0]


class HUWindowd(MapTransform):
    """Dictionary twin of :class:`HUWindow`."""

    backend = HUWindow.backend

    def __init__(self, keys: KeysCollection, hu_window: Sequence[float] = HU_WINDOW, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.window = HUWindow(hu_window)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


class NLMDenoise(Transform):
    """Non-local-means denoising of each axial slice (scikit-image's ``denoise_nl_means``).

    Works on channel-first volumes ``(C, X, Y, Z)`` in any intensity unit. ``sigma=None`` estimates
    the noise per slice (wavelet MAD, ``estimate_sigma``); ``h`` is the filter strength relative to
    sigma (0.6 to 1.0 keeps vessel edges while flattening quantum noise).
    """

    def __init__(self, h: float = 0.8, sigma: float | None = None, patch_size: int = 5, patch_distance: int = 6):
        self.h, self.sigma, self.patch_size, self.patch_distance = h, sigma, patch_size, patch_distance

    def __call__(self, img):
        from skimage.restoration import denoise_nl_means, estimate_sigma

        arr = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img, dtype=np.float32)
        if arr.ndim != 4:
            raise ValueError(f"NLMDenoise expects a channel-first 3D volume (C, X, Y, Z), got shape {arr.shape}")
        out = np.empty_like(arr)
        for c in range(arr.shape[0]):
            for k in range(arr.shape[3]):
                plane = arr[c, :, :, k]
                sigma = self.sigma if self.sigma is not None else float(estimate_sigma(plane))
                if sigma <= 0 or not np.isfinite(sigma):
                    out[c, :, :, k] = plane  # a constant slice has nothing to denoise
                    continue
                out[c, :, :, k] = denoise_nl_means(
                    plane,
                    h=self.h * sigma,
                    sigma=sigma,
                    patch_size=self.patch_size,
                    patch_distance=self.patch_distance,
                    fast_mode=True,
                )
        return convert_to_dst_type(out, img)[0]


class NLMDenoised(MapTransform):
    """Dictionary twin of :class:`NLMDenoise`."""

    def __init__(
        self,
        keys: KeysCollection,
        h: float = 0.8,
        sigma: float | None = None,
        patch_size: int = 5,
        patch_distance: int = 6,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.denoise = NLMDenoise(h, sigma, patch_size, patch_distance)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.denoise(d[key])
        return d
