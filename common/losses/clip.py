"""SA-1 losses: Eq. 1 (cosine), a CLIP InfoNCE alternative, Eq. 2 (distillation MSE) and Eq. 3 (their sum)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)


def _zero(*tensors: torch.Tensor | None) -> torch.Tensor:
    """A 0 that stays on the autograd graph of the first tensor given (so ``backward`` always works)."""
    for t in tensors:
        if t is not None:
            return t.sum() * 0.0
    return torch.zeros(())


def cosine_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 1, L_cos = 1 - (I_e . T_e) / (||I_e|| ||T_e||), averaged over the N matched pairs. 0 when N = 0."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image and text embeddings must pair up, got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape[0] == 0:
        return _zero(image_embeds, text_embeds)
    dot = (image_embeds * text_embeds).sum(dim=-1)
    norms = image_embeds.norm(dim=-1) * text_embeds.norm(dim=-1)
    return (1.0 - dot / norms.clamp_min(eps)).mean()


def info_nce_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    text_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric CLIP InfoNCE; pair i is (image i, text i), every other text/image of the batch a negative.

    ``logit_scale`` is CLIP's log inverse temperature (``LungCLIP.logit_scale``), clamped to ln(100).
    ``text_ids`` (N,) marks rows that carry the same text (several patches of one class share a
    caption): those are positives of each other, not negatives; each row's loss is -log of the
    softmax mass on its positives. Without it every row is its own class, as in CLIP.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image and text embeddings must pair up, got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    n = image_embeds.shape[0]
    if n == 0:
        return _zero(image_embeds, text_embeds)
    scale = (
        torch.as_tensor(logit_scale, dtype=image_embeds.dtype, device=image_embeds.device)
        .clamp(max=MAX_LOGIT_SCALE)
        .exp()
    )
    logits = scale * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t()
    if text_ids is None:
        target = torch.arange(n, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    text_ids = torch.as_tensor(text_ids, device=logits.device)
    if text_ids.shape != (n,):
        raise ValueError(f"text_ids must have shape ({n},), got {tuple(text_ids.shape)}")
    positive = text_ids[:, None] == text_ids[None, :]  # symmetric: one mask serves both directions

    def any_positive(lg: torch.Tensor) -> torch.Tensor:
        # -log of the softmax mass on the positives: 0 when all of it is there, CLIP's loss for one positive
        return (torch.logsumexp(lg, dim=1) - torch.logsumexp(lg.masked_fill(~positive, float("-inf")), dim=1)).mean()

    return 0.5 * (any_positive(logits) + any_positive(logits.t()))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean squared error between student and teacher embeddings (mean over every element). 0 when empty."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings differ in shape"
        )
    if student.numel() == 0:
        return _zero(student)
    return F.mse_loss(student, teacher.to(student.dtype))


def _select(x: torch.Tensor | None, mask: torch.Tensor | None, batch: int, what: str) -> torch.Tensor | None:
    """Rows of ``x`` for the samples in ``mask``: ``x`` holds either one row per sample or one per selected sample."""
    if x is None or mask is None:
        return x
    mask = torch.as_tensor(mask, dtype=torch.bool, device=x.device)
    if mask.shape != (batch,):
        raise ValueError(f"{what} mask must have shape ({batch},), got {tuple(mask.shape)}")
    if x.shape[0] == batch and int(mask.sum()) != batch:
        return x[mask]
    if x.shape[0] != int(mask.sum()):
        raise ValueError(f"{what}: {x.shape[0]} rows for a batch of {batch} with {int(mask.sum())} selected")
    return x


class DualLoss(nn.Module):
    """Eq. 3, L_total = alpha * L_contrastive + beta * L_distill, over a batch where some samples lack text or teacher.

    ``contrastive="cosine"`` is Eq. 1; ``"infonce"`` the symmetric CLIP loss (needs ``logit_scale``).
    ``has_text`` (B,) marks the samples with a text; ``text_embeds`` holds one row per sample or one per
    marked sample. Samples without text contribute only the distillation term. ``text_ids`` (one
    per text row) groups rows with the same text for InfoNCE. ``teacher`` may be
    None (beta term 0) or restricted by ``has_teacher`` the same way.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, contrastive: str = "cosine"):
        super().__init__()
        if contrastive not in ("cosine", "infonce"):
            raise ValueError(f"contrastive must be 'cosine' or 'infonce', got {contrastive!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.contrastive = contrastive

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        student: torch.Tensor | None = None,
        teacher: torch.Tensor | None = None,
        has_text: torch.Tensor | None = None,
        has_teacher: torch.Tensor | None = None,
        logit_scale: torch.Tensor | float | None = None,
        text_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        b = image_embeds.shape[0]
        if text_embeds is None or text_embeds.shape[0] == 0:
            contrastive = _zero(image_embeds)
        else:
            img = _select(image_embeds, has_text, b, "has_text") if has_text is not None else image_embeds
            txt = _select(text_embeds, has_text, b, "has_text") if has_text is not None else text_embeds
            if self.contrastive == "cosine":
                contrastive = cosine_loss(img, txt)
            else:
                if logit_scale is None:
                    raise ValueError("contrastive='infonce' needs logit_scale")
                contrastive = info_nce_loss(img, txt, logit_scale, text_ids=text_ids)
        if student is None or teacher is None or teacher.shape[0] == 0:
            distill = _zero(student, image_embeds)
        else:
            s = _select(student, has_teacher, b, "has_teacher") if has_teacher is not None else student
            t = _select(teacher, has_teacher, b, "has_teacher") if has_teacher is not None else teacher
            distill = distillation_loss(s, t.to(s.device))
        total = self.alpha * contrastive + self.beta * distill
        return {"total": total, "contrastive": contrastive, "distill": distill}
