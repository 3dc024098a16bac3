"""ignite metrics of the SA-1 engines, computed with the functions of :mod:`common.metrics`.

They accumulate a whole validation pass (zero-shot accuracy and recall@k are set-level figures,
not batch means) and attach to MONAI workflows as ``key_val_metric`` / ``additional_metrics``.
:class:`LungMapDice` is the one that reads no batch: it draws SA-2's lung map of held-out phantoms.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from scipy import ndimage

from common.classes import BACKGROUND_NAMES, CLASS_NAMES
from common.networks.checkpoint import unwrap
from common.inferers.patch_similarity import PatchSimilarityInferer
from common.io import read_ct
from common.metrics import dice_score, embedding_cosine, retrieval_recall_at_k, zero_shot_accuracy
from common.transforms.probability import SimilarityToProbability

log = logging.getLogger(__name__)


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
            raise NotComputableError(
                "zero-shot accuracy needs labelled patches in the validation set (held-out phantom patches)"
            )
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


class LungMapDice(Metric):
    """Dice of SA-2's raw lung map of held-out phantoms against their lung field, drawn with the network as
    it stands at the end of the validation pass: the map-level figure ``benchmarks/clip_checkpoint_choice.py``
    prints beside patch accuracy for every SA-1 epoch.

    Zero-shot accuracy scores patches centred on one class; SA-2 averages the similarities of the sliding
    windows that cover each pixel, and at the lung surface those windows straddle it. Tried as SA-1's key
    metric, it chose a better phantom map and a far worse map of a real scan (docs/reproducibility.md), so
    SA-1 keeps choosing by accuracy. It maps ``num_slices`` axial slices (evenly spread over the middle 80 % of the lungs'
    extent) of each case in ``cases`` (manifest entries with ``path`` and ``lungs``), mapped as SA-2's
    ``inference.json`` maps them (sliding windows, centre-weighted aggregation, softmax with the background classes),
    the lung channel cut at ``tau`` and its holes filled per slice (vessels and airways inside the lung are
    other classes), pooled over all slices. ``preprocessing`` is the one the checkpoint will carry (slice
    size, image size, patch size and mm, HU window). ``last_area_ratio`` keeps mapped / true lung area.
    """

    def __init__(
        self,
        network,
        cases: Sequence[dict],
        preprocessing: dict,
        num_slices: int = 4,
        stride_mm: float = 20.0,
        tau: float = 0.6,
        class_names: Sequence[str] = CLASS_NAMES,
        background_names: Sequence[str] = BACKGROUND_NAMES,
        batch_size: int = 16,
        output_transform=lambda x: x,
        device="cpu",
    ):
        if not cases:
            raise ValueError("LungMapDice needs at least one held-out phantom (val_phantoms >= 1)")
        if int(num_slices) < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        self.network, self.cases, self.num_slices, self.tau = network, list(cases), int(num_slices), float(tau)
        self.num_classes = len(class_names)
        pre = dict(preprocessing)
        self.inferer = PatchSimilarityInferer(
            list(class_names) + list(background_names),
            patch_mm=pre.get("patch_mm"),
            stride_mm=stride_mm,
            batch_size=batch_size,
            slice_size=pre.get("slice_size"),
            image_size=pre.get("image_size"),
            patch_size=pre.get("patch_size"),
            hu_window=pre.get("hu_window"),
            progress=False,
        )
        self._volumes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        self.last_area_ratio = float("nan")
        super().__init__(output_transform=output_transform, device=device)

    def reset(self):
        pass

    def update(self, output):
        pass

    def volumes(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(HU, lung field, affine) of the chosen slices of each case, read once."""
        if self._volumes is None:
            self._volumes = []
            for case in self.cases:
                ct, lungs = read_ct(case["path"], axcodes="LPS"), read_ct(case["lungs"], axcodes="LPS").hu > 0
                if ct.hu.shape != lungs.shape:
                    raise ValueError(
                        f"{case['lungs']}: lung field {lungs.shape} does not match its CT {ct.hu.shape} ({case['path']})"
                    )
                z = np.flatnonzero(lungs.any(axis=(0, 1)))
                if z.size == 0:
                    raise ValueError(f"{case['lungs']}: the lung field is empty, nothing to score a lung map on")
                lo, hi = z[0] + 0.1 * (z[-1] - z[0]), z[-1] - 0.1 * (z[-1] - z[0])
                ks = np.unique(np.linspace(lo, hi, self.num_slices).round().astype(int))
                self._volumes.append((ct.hu[:, :, ks], lungs[:, :, ks], ct.affine))
        return self._volumes

    def to_probability(self, sim: torch.Tensor, scale: float):
        """SA-2's softmax: the background classes take their share of it, then drop out."""
        return SimilarityToProbability("softmax", scale=scale, num_classes=self.num_classes)(sim)

    def compute(self) -> float:
        model = unwrap(self.network)
        was_training = model.training
        model.eval()
        scale = float(model.temperature_scale().detach())
        preds, truths = [], []
        try:
            for hu, lungs, affine in self.volumes():
                sim = self.inferer.volume(hu, affine, model, name="held-out phantom")
                prob = np.asarray(self.to_probability(sim, scale))[0]
                preds.append(
                    np.stack(
                        [ndimage.binary_fill_holes(prob[:, :, k] >= self.tau) for k in range(prob.shape[2])], axis=2
                    ).ravel()
                )
                truths.append(lungs.ravel())
        finally:
            model.train(was_training)
        pred, truth = np.concatenate(preds), np.concatenate(truths)  # pooled over every slice of every case
        self.last_area_ratio = float(pred.sum()) / max(int(truth.sum()), 1)
        dice = dice_score(pred, truth)
        log.info(
            "SA-2 lung map of the held-out phantoms: Dice %.4f, mapped / true lung area %.3f",
            dice,
            self.last_area_ratio,
        )
        return dice


__all__ = ["DistillationCosine", "EpochAverage", "LungMapDice", "RetrievalRecall", "ZeroShotAccuracy"]
