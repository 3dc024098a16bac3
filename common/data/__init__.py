"""Datasets and datalists the stages train on (SA-1 image-text pairs; later stages add theirs)."""

from common.data.clip_pairs import PATCH_PROMPT, build_clip_datalist, class_prompts, load_clip_datalist, patch_caption
from common.data.dataset import SkippingDataset, collate_skipping

__all__ = ["PATCH_PROMPT", "SkippingDataset", "build_clip_datalist", "class_prompts", "collate_skipping", "load_clip_datalist", "patch_caption"]
