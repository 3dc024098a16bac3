"""Inferers: how a trained network is run over whole CT volumes (MONAI ``Inferer`` subclasses)."""

from common.inferers.patch_similarity import (
    PatchSimilarityInferer,
    algorithm1_literal,
    class_text_embeddings,
    dense_similarity_maps,
    patch_similarity_maps,
)

__all__ = ["PatchSimilarityInferer", "algorithm1_literal", "class_text_embeddings", "dense_similarity_maps", "patch_similarity_maps"]
