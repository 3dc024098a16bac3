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
    SplitLungSides,
    SplitLungSidesd,
)
from common.transforms.mixing import MixingBatch
from common.transforms.pipeline import ct_preprocessing
from common.transforms.probability import (
    SimilarityToProbability,
    SimilarityToProbabilityd,
    SmoothProbability,
    SmoothProbabilityd,
)
from common.transforms.savers import (
    PROBMAP_OUTPUTS,
    PSEUDOLABEL_OUTPUTS,
    SEGMENTATION_OUTPUTS,
    SaveProbmapd,
    SavePseudoLabeld,
    SaveSegmentationd,
    probmap_outputs,
    pseudolabel_outputs,
)
from common.transforms.spatial import PatientFieldOfView, PatientFieldOfViewd, TrimSlices, TrimSlicesd
from common.transforms.threshold import ClassLabelMap, ClassLabelMapd, ThresholdProbability, ThresholdProbabilityd

__all__ = [
    "PatientFieldOfView",
    "PatientFieldOfViewd",
    "ClassLabelMap",
    "ClassLabelMapd",
    "CTRandAugment",
    "CTRandAugmentd",
    "HU_WINDOW",
    "HUWindow",
    "HUWindowd",
    "LungMaskCleanup",
    "LungMaskCleanupd",
    "MixingBatch",
    "NLMDenoise",
    "RefineLungBoundary",
    "RefineLungBoundaryd",
    "NLMDenoised",
    "RemoveInconsistentSlices",
    "RemoveInconsistentSlicesd",
    "RestrictToBody",
    "RestrictToBodyd",
    "SplitLungSides",
    "SplitLungSidesd",
    "PROBMAP_OUTPUTS",
    "PSEUDOLABEL_OUTPUTS",
    "SEGMENTATION_OUTPUTS",
    "SaveProbmapd",
    "SavePseudoLabeld",
    "SaveSegmentationd",
    "SimilarityToProbability",
    "SimilarityToProbabilityd",
    "SmoothProbability",
    "SmoothProbabilityd",
    "ThresholdProbability",
    "ThresholdProbabilityd",
    "TrimSlices",
    "TrimSlicesd",
    "ct_preprocessing",
    "probmap_outputs",
    "pseudolabel_outputs",
]
