"""ignite metrics over the SA-1 engines' outputs, computed with the functions of :mod:`common.metrics`.

They accumulate a whole validation pass (zero-shot accuracy and recall@k are set-level figures,
not batch means) and attach to MONAI workflows as ``key_val_metric`` / ``additional_metrics``.
"""

from __future__ import annotations

import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric

from common.metrics import embedding_cosine, retrieval_recall_at_k, zero_shot_accuracy


class _DictOutputMetric(Metric):
    """A metric that reads the engine's output dict itself (ignite's default wants (y_pred, y))."""

    @torch.no_grad()
    def iteration_completed(self, engine) -> None:
        output = self._output_transform(engine.state.output)
        # the SA-1 engines output [record]: MONAI's decollated layout with one batch-level dict
        self.update(output[0] if isinstance(output, list) and output else output)


class ZeroShotAccuracy(_DictOutputMetric):
    """Share of labelled samples (``label`` >= 0: held-out patches) whose closest class prompt is their class."""

    def reset(self):
        self._embeds, self._labels, self._classes = [], [], None

    def update(self, output):
        if not output or output.get("class_text_embeds") is None:
            return
        keep = output["label"] >= 0
        if bool(keep.any()):
            self._embeds.append(output["image_embeds"][keep])
            self._labels.append(output["label"][keep])
        self._classes = output["class_text_embeds"]

    def compute(self) -> float:
        if not self._labels:
            raise NotComputableError("zero-shot accuracy needs labelled patches in the validation set (held-out phantom patches)")
        return zero_shot_accuracy(torch.cat(self._embeds), self._classes, torch.cat(self._labels))


class RetrievalRecall(_DictOutputMetric):
    """Image-to-text recall@k over the validation samples that have a text (texts of the same set are the pool)."""

    def __init__(self, k: int = 5, output_transform=lambda x: x, device="cpu"):
        self.k = int(k)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self):
        self._images, self._texts, self._strings = [], [], []

    def update(self, output):
        if not output or output.get("text_embeds") is None:
            return
        mask = output["has_text"]
        self._images.append(output["image_embeds"][mask])
        self._texts.append(output["text_embeds"])
        self._strings += [t for t, m in zip(output["text"], mask.tolist()) if m]

    def compute(self) -> float:
        if not self._strings:  # no text-bearing validation samples: nothing to retrieve
            return float("nan")
        return retrieval_recall_at_k(torch.cat(self._images), torch.cat(self._texts), self._strings, k=self.k)


class DistillationCosine(_DictOutputMetric):
    """Mean cosine similarity between the student's distillation output and the teacher's embedding."""

    def reset(self):
        self._sum, self._n = 0.0, 0

    def update(self, output):
        if not output or output.get("student") is None:
            return
        n = output["student"].shape[0]
        self._sum += embedding_cosine(output["student"], output["teacher"]) * n
        self._n += n

    def compute(self) -> float:
        if not self._n:  # no teacher (ablation without distillation) or no slices
            return float("nan")
        return self._sum / self._n


class EpochAverage(_DictOutputMetric):
    """Mean of one scalar output key over an epoch (per-epoch training losses); None values are left out."""

    def __init__(self, key: str = "loss", output_transform=lambda x: x, device="cpu"):
        self.key = key
        super().__init__(output_transform=output_transform, device=device)

    def reset(self):
        self._sum, self._n = 0.0, 0

    def update(self, output):
        value = output.get(self.key) if output else None
        if value is None:
            return
        self._sum += float(value)
        self._n += 1

    def compute(self) -> float:
        if not self._n:  # e.g. the distillation loss of a run without teacher
            return float("nan")
        return self._sum / self._n


__all__ = ["DistillationCosine", "EpochAverage", "RetrievalRecall", "ZeroShotAccuracy"]
