"""Every score the project reports, in one module: overlap and surface metrics on binary numpy masks (through
MONAI's metric functions), SA-1's embedding figures, and each stage's case scorer (``score_probmap``,
``score_pseudolabel``, ``score_segmentation``), the pseudo labels' confidence verdict and the lung report."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from common.classes import CLASS_NAMES, LABEL_OF
from common.io.nifti import as_numpy, first_affine


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
        raise ValueError(
            f"need one text per image: {image_embeds.shape[0]} images, {text_embeds.shape[0]} text embeddings, {len(texts)} texts"
        )
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


# --------------------------------------------------------------------------- segmentation (SA-3) metrics


def surface_distances(prediction: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """HD95 and average symmetric surface distance in mm (MONAI), NaN when either mask is empty."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p, t = _mask_pair(prediction, truth)
    if not p.any() or not t.any():
        return {"hd95_mm": float("nan"), "assd_mm": float("nan")}
    spacing = [float(s) for s in spacing]
    hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)
    assd = compute_average_surface_distance(p, t, include_background=True, symmetric=True, spacing=spacing)
    return {"hd95_mm": float(hd95.item()), "assd_mm": float(assd.item())}


def central_slices(truth: np.ndarray, share: float = 0.5) -> np.ndarray:
    """(Z,) booleans: the middle ``share`` of the axial slices that hold ``truth`` (the method's Table 1
    "central 50 %"); the rest of those slices, apex and base, are the "peripheral" ones."""
    z = np.flatnonzero(np.asarray(truth, dtype=bool).reshape(-1, np.shape(truth)[-1]).any(axis=0))
    central = np.zeros(np.shape(truth)[-1], dtype=bool)
    if z.size:
        lo, hi = z.min(), z.max() + 1
        cut = (hi - lo) * (1.0 - share) / 2.0
        central[int(round(lo + cut)) : int(round(hi - cut))] = True
    return central


def segmentation_scores(prediction: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict:
    """Dice, Jaccard, sensitivity, specificity, HD95 and ASSD (mm) of two (X, Y, Z) masks, and Dice of
    the central and peripheral halves of the lung's slices (:func:`central_slices`)."""
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

    p, t = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    cm = get_confusion_matrix(*_mask_pair(p, t), include_background=True)
    sens = compute_confusion_matrix_metric("sensitivity", cm)
    spec = compute_confusion_matrix_metric("specificity", cm)
    central = central_slices(t)
    lung_slices = t.reshape(-1, t.shape[-1]).any(axis=0) | p.reshape(-1, p.shape[-1]).any(axis=0)
    peripheral = lung_slices & ~central
    return {
        "dice": dice_score(p, t),
        "jaccard": iou_score(p, t),
        "sensitivity": float(sens.item()),
        "specificity": float(spec.item()),
        **surface_distances(p, t, spacing),
        "dice_central": dice_score(p[..., central], t[..., central]),
        "dice_peripheral": dice_score(p[..., peripheral], t[..., peripheral]),
    }


# --------------------------------------------------------------------------- per-structure statistics


def structure_statistics(
    labels: np.ndarray, hu: np.ndarray, affine: np.ndarray, names: dict[int, str], emphysema_hu: float = -950.0
) -> dict:
    """Per structure of a label map: voxels, volume (mL) and mean HU, as TotalSegmentator's ``--statistics``
    gives them, plus the share of the structure below ``emphysema_hu`` (%LAA-950) for every lung.

    ``names`` maps each label value to its name (``{1: "right lung", 2: "left lung"}``); a structure absent
    from the map is listed with 0 voxels and ``None`` for its HU figures. A key ``"lungs"`` sums every lung.
    """
    labels, hu = np.asarray(labels), np.asarray(hu)
    if labels.shape != hu.shape:
        raise ValueError(f"labels {labels.shape} and HU {hu.shape} differ in shape")
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    inside = np.flatnonzero(labels.ravel())  # the structures are a tenth of a chest CT: count only there
    values, hu_in = labels.ravel()[inside].astype(np.intp), hu.ravel()[inside].astype(np.float64)
    size = max(max(names), int(values.max(initial=0))) + 1
    counts = np.bincount(values, minlength=size)
    sums = np.bincount(values, weights=hu_in, minlength=size)
    laa = np.bincount(values, weights=hu_in < emphysema_hu, minlength=size)
    key = f"percent_below_{int(abs(emphysema_hu))}_hu"

    def entry(values: list[int]) -> dict:
        n = int(sum(counts[v] for v in values))
        out = {
            "voxels": n,
            "volume_ml": round(n * voxel_ml, 1),
            "mean_hu": round(float(sum(sums[v] for v in values)) / n, 1) if n else None,
        }
        return out

    stats = {}
    lungs = [v for v, name in names.items() if "lung" in name]
    for value, name in names.items():
        stats[name] = {"label": int(value), **entry([value])}
        if value in lungs:
            stats[name][key] = round(100.0 * float(laa[value]) / counts[value], 2) if counts[value] else None
    if lungs:
        n = int(sum(counts[v] for v in lungs))
        stats["lungs"] = {**entry(lungs), key: round(100.0 * float(sum(laa[v] for v in lungs)) / n, 2) if n else None}
    return stats


def score_probmap(
    d: dict,
    class_names: Sequence[str] = CLASS_NAMES,
    tau: float = 0.5,
    prob_key: str = "pred",
    mask_key: str = "lung_mask",
    label_key: str = "label",
    lungs_key: str = "lungs",
) -> dict:
    """Dice and IoU of the cleaned lung mask against the lung field (``lungs`` > 0) and of every channel
    thresholded at ``tau`` (Eq. 8) against its class in the label map."""
    from common.metrics import dice_score, iou_score

    row: dict = {"case_id": d.get("case_id")}
    mask = as_numpy(d[mask_key])[0] > 0
    if lungs_key in d and d[lungs_key] is not None:
        field = as_numpy(d[lungs_key]).reshape(mask.shape) > 0
        row["lung_mask_dice"], row["lung_mask_iou"] = dice_score(mask, field), iou_score(mask, field)
    if label_key in d and d[label_key] is not None:
        label = as_numpy(d[label_key]).reshape(mask.shape).round().astype(np.int16)
        prob = as_numpy(d[prob_key])
        for c, name in enumerate(class_names):
            if name not in LABEL_OF:
                continue
            truth, pred = label == LABEL_OF[name], prob[c] >= tau
            key = name.replace(" ", "_")
            row[f"{key}_dice"], row[f"{key}_iou"] = dice_score(pred, truth), iou_score(pred, truth)
    return row


def case_confidence(
    pseudo: np.ndarray,
    reference: np.ndarray,
    info: dict,
    lung_ml: float,
    min_predicted_iou: float = 0.75,
    min_agreement: float = 0.875,
    min_kept_share: float = 0.5,
    lung_ml_range: Sequence[float] = (300.0, 9000.0),
) -> dict:
    """The case's confidence figures and QC verdict: SAM's mean predicted IoU of the kept candidates, the
    Dice between the pseudo label and the SA-2 lung mask, the share of candidates kept and the
    lung volume's plausibility; each figure under its bound is a reason to leave the case out."""
    from common.metrics import dice_score

    agreement = dice_score(np.asarray(pseudo) > 0, np.asarray(reference) > 0)
    candidates = int(info.get("candidates", 0))
    kept_share = float(info.get("kept", 0)) / candidates if candidates else 0.0
    iou = info.get("mean_predicted_iou")
    reasons = []
    if iou is None or iou < min_predicted_iou:
        reasons.append(f"SAM's mean predicted IoU {iou if iou is None else round(iou, 3)} < {min_predicted_iou}")
    if agreement < min_agreement:
        reasons.append(f"agreement with the SA-2 lung mask (Dice {agreement:.3f}) < {min_agreement}")
    if kept_share < min_kept_share:
        reasons.append(f"only {kept_share:.0%} of the SAM candidates passed the overlap vote (< {min_kept_share:.0%})")
    lo, hi = float(lung_ml_range[0]), float(lung_ml_range[1])
    if not lo <= lung_ml <= hi:
        reasons.append(f"lung volume {lung_ml:.0f} mL outside the plausible {lo:.0f}-{hi:.0f} mL")
    return {
        "mean_predicted_iou": None if iou is None else round(float(iou), 4),
        "agreement_dice": round(float(agreement), 4),
        "kept_share": round(kept_share, 4),
        "lung_ml_total": round(float(lung_ml), 1),
        "passed": not reasons,
        "reasons": reasons,
    }


def score_pseudolabel(
    d: dict, pred_key: str = "pred", reference_key: str = "lung_mask", lungs_key: str = "lungs"
) -> dict:
    """Dice and IoU of the pseudo label, and of the SA-2 lung mask it was prompted from, against the
    lung field (``lungs`` > 0); SAM's counts from the inferer alongside."""
    from common.metrics import dice_score, iou_score

    pseudo = as_numpy(d[pred_key])[0] > 0
    field = as_numpy(d[lungs_key]).reshape(pseudo.shape) > 0
    sa2 = as_numpy(d[reference_key]).reshape(pseudo.shape) > 0.5
    info = d.get("pseudolabel_info") or {}
    return {
        "case_id": d.get("case_id"),
        "pseudo_dice": dice_score(pseudo, field),
        "pseudo_iou": iou_score(pseudo, field),
        "sa2_mask_dice": dice_score(sa2, field),
        "kept_share": (info.get("kept", 0) / info["candidates"]) if info.get("candidates") else 0.0,
        "mean_predicted_iou": info.get("mean_predicted_iou"),
    }


def score_segmentation(d: dict, pred_key: str = "pred", truth_key: str = "lungs") -> dict:
    """:func:`common.metrics.segmentation_scores` of the case's mask against its ground-truth lung field."""
    from common.metrics import segmentation_scores

    pred = as_numpy(d[pred_key])[0] > 0
    truth = as_numpy(d[truth_key]).reshape(pred.shape) > 0
    spacing = np.linalg.norm(first_affine(d[pred_key])[:3, :3], axis=0)
    return {"case_id": d.get("case_id"), **segmentation_scores(pred, truth, spacing)}


def lung_report(
    mask: np.ndarray, hu: np.ndarray, affine: np.ndarray, sides_ml: dict | None = None, emphysema_hu: float = -950.0
) -> dict:
    """Lung volume (mL, per side when known), mean lung HU and the share of lung below ``emphysema_hu`` (%LAA-950)."""
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    lung_hu = hu[mask]
    report = {"lung_volume_ml": {"total": round(float(mask.sum()) * voxel_ml, 1)}}
    if sides_ml:
        report["lung_volume_ml"].update({k: round(float(v), 1) for k, v in sides_ml.items() if k != "total"})
    report["mean_lung_hu"] = round(float(lung_hu.mean()), 1) if lung_hu.size else None
    report[f"percent_lung_below_{int(abs(emphysema_hu))}_hu"] = (
        round(100.0 * float((lung_hu < emphysema_hu).mean()), 2) if lung_hu.size else None
    )
    return report
