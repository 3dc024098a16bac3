"""ignite engines, metrics and handlers the bundles wire in their configs (MONAI workflows)."""

from common.engines.cases import (
    CaseEvaluator,
    ProbmapEvaluator,
    PseudoLabelEvaluator,
    SegmentationEvaluator,
    write_scores,
)
from common.engines.clip import CLIPEvaluator, CLIPTrainer, teacher_embeddings
from common.engines.handlers import (
    CachedViewEpoch,
    ParameterCountReport,
    MetricsHistory,
    MLflowArtifactsHandler,
    SaveBestCheckpoint,
    SkippedSamplesReport,
    TrackingParams,
)
from common.engines.metrics import DistillationCosine, EpochAverage, LungMapDice, RetrievalRecall, ZeroShotAccuracy

__all__ = [
    "CachedViewEpoch",
    "CaseEvaluator",
    "ParameterCountReport",
    "ProbmapEvaluator",
    "PseudoLabelEvaluator",
    "SegmentationEvaluator",
    "write_scores",
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
