"""Inferers: how a trained network is run over whole CT volumes (MONAI ``Inferer`` subclasses)."""

from common.inferers.patch_similarity import PatchSimilarityInferer
from common.inferers.similarity_maps import (
    algorithm1_literal,
    class_text_embeddings,
    dense_similarity_maps,
    patch_similarity_maps,
    spread_window_scores,
    window_weights,
)
from common.inferers.prompted_sam import PromptedSamInferer, algorithm2_literal, pseudo_label_slice
from common.inferers.slices import SliceEnsembleInferer, foreground_probability

__all__ = [
    "PatchSimilarityInferer",
    "PromptedSamInferer",
    "SliceEnsembleInferer",
    "algorithm1_literal",
    "algorithm2_literal",
    "class_text_embeddings",
    "dense_similarity_maps",
    "foreground_probability",
    "patch_similarity_maps",
    "pseudo_label_slice",
    "spread_window_scores",
    "window_weights",
]
