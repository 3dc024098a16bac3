"""Overlap metrics on binary numpy masks, through MONAI's metric functions."""

from __future__ import annotations

import numpy as np


def _mask_pair(prediction: np.ndarray, truth: np.ndarray):
    """Two boolean masks of one shape as (batch, channel, ...) float tensors for MONAI's metrics."""
    import torch

    p, t = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"masks differ in shape: {p.shape} vs {t.shape}")
    return torch.from_numpy(p)[None, None].float(), torch.from_numpy(t)[None, None].float()


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (MONAI ``compute_dice``); 1.0 when both are empty."""
    from monai.metrics import compute_dice

    return float(compute_dice(*_mask_pair(prediction, truth), include_background=True, ignore_empty=False).item())


def iou_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard index of two boolean masks (MONAI ``compute_iou``); 1.0 when both are empty."""
    from monai.metrics import compute_iou

    return float(compute_iou(*_mask_pair(prediction, truth), include_background=True, ignore_empty=False).item())


# --------------------------------------------------------------------------- image-text (SA-1) metrics


def zero_shot_accuracy(image_embeds, class_text_embeds, labels) -> float:
    """Share of images whose most cosine-similar class prompt is their class (Eq. 4 + argmax).

    ``image_embeds`` (N, D), ``class_text_embeds`` (C, D) one per class, ``labels`` (N,) class indices.
    """
    import torch
    import torch.nn.functional as F

    image_embeds, class_text_embeds = torch.as_tensor(image_embeds), torch.as_tensor(class_text_embeds)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if image_embeds.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_embeds.shape[0]} embeddings for {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("zero-shot accuracy of an empty set is undefined")
    sims = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(class_text_embeds.float(), dim=-1).t()
    return float((sims.argmax(dim=1) == labels).float().mean())


def retrieval_recall_at_k(image_embeds, text_embeds, texts: list[str], k: int = 5) -> float:
    """Image-to-text recall@k: image i is a hit when a text equal to ``texts[i]`` ranks in its top k.

    Texts that repeat (several slices share a report sentence) count as the same answer, so a
    tie between identical captions is not scored as a miss.
    """
    import torch
    import torch.nn.functional as F

    image_embeds, text_embeds = torch.as_tensor(image_embeds).float(), torch.as_tensor(text_embeds).float()
    if not (image_embeds.shape[0] == text_embeds.shape[0] == len(texts)):
        raise ValueError(f"need one text per image: {image_embeds.shape[0]} images, {text_embeds.shape[0]} text embeddings, {len(texts)} texts")
    sims = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t()
    top = sims.topk(min(k, sims.shape[1]), dim=1).indices
    hits = [any(texts[j] == texts[i] for j in row.tolist()) for i, row in enumerate(top)]
    return float(sum(hits)) / max(len(hits), 1)


def embedding_cosine(student, teacher) -> float:
    """Mean cosine similarity between flattened student and teacher embeddings (distillation quality)."""
    import torch
    import torch.nn.functional as F

    s, t = torch.as_tensor(student).float(), torch.as_tensor(teacher).float()
    if s.shape != t.shape:
        raise ValueError(f"student {tuple(s.shape)} and teacher {tuple(t.shape)} differ in shape")
    return float(F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1).mean())
