"""ignite engines, metrics and handlers the bundles wire in their configs (MONAI workflows)."""

from common.engines.clip import CLIPEvaluator, CLIPTrainer, teacher_embeddings
from common.engines.handlers import (
    MetricsHistory,
    MLflowArtifactsHandler,
    SaveBestCheckpoint,
    SkippedSamplesReport,
    TrackingParams,
)
from common.engines.metrics import DistillationCosine, EpochAverage, LungMapDice, RetrievalRecall, ZeroShotAccuracy

__all__ = [
    "CLIPEvaluator",
    "CLIPTrainer",
    "DistillationCosine",
    "EpochAverage",
    "LungMapDice",
    "MetricsHistory",
    "MLflowArtifactsHandler",
    "RetrievalRecall",
    "SaveBestCheckpoint",
    "SkippedSamplesReport",
    "TrackingParams",
    "ZeroShotAccuracy",
    "teacher_embeddings",
]
