"""Preprocessing and augmentation transforms, MONAI style: each array transform with its dictionary twin."""

from common.transforms.augment import CTRandAugment, CTRandAugmentd
from common.transforms.intensity import HU_WINDOW, HUWindow, HUWindowd, NLMDenoise, NLMDenoised
from common.transforms.mask import (
    LungMaskCleanup,
    LungMaskCleanupd,
    RefineLungBoundary,
    RefineLungBoundaryd,
    RemoveInconsistentSlices,
    RemoveInconsistentSlicesd,
    RestrictToBody,
    RestrictToBodyd,
)
from common.transforms.pipeline import ct_preprocessing
from common.transforms.probability import (
    SimilarityToProbability,
    SimilarityToProbabilityd,
    SmoothProbability,
    SmoothProbabilityd,
)
from common.transforms.spatial import TrimSlices, TrimSlicesd
from common.transforms.threshold import ClassLabelMap, ClassLabelMapd, ThresholdProbability, ThresholdProbabilityd

__all__ = [
    "ClassLabelMap",
    "ClassLabelMapd",
    "CTRandAugment",
    "CTRandAugmentd",
    "HU_WINDOW",
    "HUWindow",
    "HUWindowd",
    "LungMaskCleanup",
    "LungMaskCleanupd",
    "NLMDenoise",
    "RefineLungBoundary",
    "RefineLungBoundaryd",
    "NLMDenoised",
    "RemoveInconsistentSlices",
    "RemoveInconsistentSlicesd",
    "RestrictToBody",
    "RestrictToBodyd",
    "SimilarityToProbability",
    "SimilarityToProbabilityd",
    "SmoothProbability",
    "SmoothProbabilityd",
    "ThresholdProbability",
    "ThresholdProbabilityd",
    "TrimSlices",
    "TrimSlicesd",
    "ct_preprocessing",
]
