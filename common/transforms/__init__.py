"""Preprocessing transforms, MONAI style: each array transform with its dictionary twin."""

from common.transforms.intensity import HU_WINDOW, HUWindow, HUWindowd, NLMDenoise, NLMDenoised
from common.transforms.pipeline import ct_preprocessing
from common.transforms.spatial import TrimSlices, TrimSlicesd

__all__ = ["HU_WINDOW", "HUWindow", "HUWindowd", "NLMDenoise", "NLMDenoised", "TrimSlices", "TrimSlicesd", "ct_preprocessing"]
