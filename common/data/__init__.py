"""Datasets and datalists the stages train on: SA-1 image-text pairs, SA-3 axial slices of labelled volumes."""

from common.data.clip_pairs import PATCH_PROMPT, build_clip_datalist, class_prompts, load_clip_datalist, patch_caption, validation_phantoms
from common.data.datalists import (
    DEFAULT_EXCLUDE,
    merge_pseudolabels,
    phantom_datalist,
    probmap_datalist,
    pseudolabel_datalist,
    scan_datalist,
    segmentation_datalist,
)
from common.data.feature_cache import CachedViewDataset, build_feature_cache, training_dataset
from common.data.dataset import SkippingDataset, collate_skipping
from common.data.slices import load_datalist, training_slices, volume_slices

__all__ = [
    "DEFAULT_EXCLUDE",
    "merge_pseudolabels",
    "phantom_datalist",
    "probmap_datalist",
    "pseudolabel_datalist",
    "scan_datalist",
    "segmentation_datalist",
"PATCH_PROMPT", "CachedViewDataset", "SkippingDataset", "build_feature_cache", "build_clip_datalist", "class_prompts", "collate_skipping", "load_clip_datalist", "load_datalist",
           "patch_caption", "training_dataset", "training_slices", "validation_phantoms", "volume_slices"]
