"""SA-3 first half: SAM-family masks prompted from SA-2 probability maps, voted into pseudo labels.

Algorithm 2 of the method, twice: :func:`algorithm2_literal` runs it line by line (the image
encoder once per dot) and is kept as the reference; :func:`pseudo_label_slice` is the production
path (the embedding of the slice computed once, every prompt of the slice through the prompt
encoder and mask decoder in batches, Eq. 9 and Eq. 10 as tensor reductions).
:class:`PromptedSamInferer` runs the production path over whole volumes.

Prompts are dots (grid intersections inside the thresholded lung map, the method's), boxes (one
per connected lung component of the slice, the MedLSAM idea and what MedSAM and LiteMedSAM were
trained on), or both. The other classes' maps can act as negative points or veto candidates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from monai.inferers import Inferer

from common.classes import CLASS_NAMES
from common.inferers.patch_similarity import to_axcodes
from common.prompts import (
    component_box_prompts,
    grid_dot_prompts,
    negative_point_prompts,
    overlap_ratio,
    union_of_selected,
)
from common.transforms.intensity import HU_WINDOW, HUWindow

log = logging.getLogger(__name__)

PROMPT_MODES = ("dots", "boxes", "both")
AUX_MODES = ("none", "negative_points", "veto")
FALLBACK_MODES = ("none", "map")


@torch.no_grad()
def algorithm2_literal(
    sam, slice01: np.ndarray, region: np.ndarray, grid_size: int, overlap_threshold: float, mask_threshold: float = 0.0
) -> np.ndarray:
    """Algorithm 2 as written: for each dot prompt a mask from the model run on the image and that dot
    (encoder included), then each candidate kept when its overlap ratio (Eq. 9) with the map exceeds
    ``overlap_threshold`` and unioned (Eq. 10). ``slice01`` (H, W) in [0, 1], ``region`` (H, W) bool."""
    hw = tuple(np.shape(slice01))
    reference = torch.as_tensor(np.asarray(region, dtype=bool))
    dots = grid_dot_prompts(region, grid_size)
    masks = []
    for dot in dots:
        embedding = sam.encode(np.asarray(slice01, dtype=np.float32)[None])
        point = sam.points_to_input(dot[None, None], hw)
        low_res, _ = sam.decode(embedding, points=(point, torch.ones(1, 1, dtype=torch.int64)))
        masks.append(sam.postprocess(low_res, hw)[0, 0].cpu() > mask_threshold)
    seg = torch.zeros(hw, dtype=torch.bool)
    for candidate in masks:
        if overlap_ratio(candidate[None], reference)[0] > overlap_threshold:
            seg |= candidate
    return seg.numpy()


def _check_modes(prompts: str, aux: str, fallback: str) -> None:
    for name, value, modes in (
        ("prompts", prompts, PROMPT_MODES),
        ("aux", aux, AUX_MODES),
        ("fallback", fallback, FALLBACK_MODES),
    ):
        if value not in modes:
            raise ValueError(f"{name} must be one of {modes}, got {value!r}")


@dataclass
class SliceResult:
    """One slice's pseudo label and what the vote saw."""

    mask: np.ndarray
    n_candidates: int = 0
    n_kept: int = 0
    kept_iou: list[float] = field(default_factory=list)  # SAM's predicted IoU of each kept candidate
    n_dots: int = 0
    n_boxes: int = 0
    n_fallback: int = 0  # rejected boxes whose part of the map went into the label instead


def _prompt_sets(
    region: np.ndarray,
    aux_regions: np.ndarray | None,
    prompts: str,
    aux: str,
    grid_size: int,
    box_margin: int,
    min_box_area: int,
    negatives_per_class: int,
) -> list[tuple[str, np.ndarray | None, np.ndarray, np.ndarray]]:
    """(kind, boxes (N, 4) or None, points (N, P, 2), labels (N, P)) per prompt kind of one slice."""
    negatives = np.zeros((0, 2), dtype=np.float32)
    if aux == "negative_points" and aux_regions is not None and len(aux_regions):
        negatives = negative_point_prompts(aux_regions, grid_size, per_region=negatives_per_class)
    sets = []
    if prompts in ("dots", "both"):
        dots = grid_dot_prompts(region, grid_size)
        if len(dots):
            pts = np.concatenate(
                [dots[:, None], np.broadcast_to(negatives[None], (len(dots), *negatives.shape))], axis=1
            )
            labels = np.concatenate([np.ones((len(dots), 1)), np.zeros((len(dots), len(negatives)))], axis=1)
            sets.append(("dots", None, pts, labels))
    if prompts in ("boxes", "both"):
        boxes = component_box_prompts(region, margin=box_margin, min_area=min_box_area)
        if len(boxes):
            pts = np.broadcast_to(negatives[None], (len(boxes), *negatives.shape))
            sets.append(("boxes", boxes, pts, np.zeros((len(boxes), len(negatives)))))
    return sets


@torch.no_grad()
def pseudo_label_slice(
    sam,
    embedding: torch.Tensor,
    hw: tuple[int, int],
    region: np.ndarray,
    aux_regions: np.ndarray | None = None,
    prompts: str = "boxes",
    aux: str = "none",
    grid_size: int = 16,
    box_margin: int = 0,
    min_box_area: int = 1,
    overlap_threshold: float = 0.5,
    veto_threshold: float = 0.2,
    negatives_per_class: int = 1,
    multimask_output: bool = False,
    mask_threshold: float = 0.0,
    prompt_batch: int = 64,
    fallback: str = "none",
) -> SliceResult:
    """Algorithm 2 on one slice whose ``embedding`` (1, 256, 64, 64) is already computed: all prompts in
    batches of ``prompt_batch`` through one decoder call each; candidates voted by Eq. 9 against
    ``region`` and unioned by Eq. 10. With ``aux="veto"`` a candidate that covers more than
    ``veto_threshold`` of its area with another class's map (``aux_regions`` (A, H, W)) is dropped;
    with ``aux="negative_points"`` the deepest grid point of each such map is a negative point of
    every prompt. ``multimask_output`` takes SAM's three masks per prompt and keeps the one with the
    highest predicted IoU (SAM's advice for single points). With ``fallback="map"`` a box whose
    candidate fails the vote (the lung wraps around the heart or the liver dome, the box holds
    mostly that organ and SAM segments it) contributes the part of ``region`` inside the box
    instead, so the slice does not lose that lung."""
    _check_modes(prompts, aux, fallback)
    region = np.asarray(region, dtype=bool)
    reference = torch.as_tensor(region)
    veto = None
    if aux == "veto" and aux_regions is not None and len(aux_regions):
        veto = torch.as_tensor(np.asarray(aux_regions, dtype=bool).any(0))
    result = SliceResult(mask=np.zeros(hw, dtype=bool))
    union = torch.zeros(hw, dtype=torch.bool)
    for kind, boxes, pts, labels in _prompt_sets(
        region, aux_regions, prompts, aux, grid_size, box_margin, min_box_area, negatives_per_class
    ):
        n = len(pts)
        result.n_dots += n if kind == "dots" else 0
        result.n_boxes += n if kind == "boxes" else 0
        for start in range(0, n, prompt_batch):
            sl = slice(start, start + prompt_batch)
            b = sam.box_to_input(boxes[sl], hw) if boxes is not None else None
            p = None
            if pts.shape[1]:
                p = (
                    sam.points_to_input(np.ascontiguousarray(pts[sl]), hw),
                    torch.as_tensor(labels[sl], dtype=torch.int64),
                )
            low_res, iou = sam.decode_prompts(embedding, boxes=b, points=p, multimask_output=multimask_output)
            if multimask_output:  # the mask SAM itself rates best
                best = iou.argmax(1)
                low_res = low_res[torch.arange(len(best)), best][:, None]
                iou = iou[torch.arange(len(best)), best][:, None]
            candidates = (sam.postprocess(low_res, hw)[:, 0] > mask_threshold).cpu()
            keep = overlap_ratio(candidates, reference) > overlap_threshold
            if veto is not None:
                keep &= overlap_ratio(candidates, veto) <= veto_threshold
            union |= union_of_selected(candidates, keep)
            if fallback == "map" and boxes is not None:
                for x0, y0, x1, y1 in np.asarray(boxes[sl])[~keep.numpy()].astype(int):
                    union[y0 : y1 + 1, x0 : x1 + 1] |= reference[y0 : y1 + 1, x0 : x1 + 1]
                    result.n_fallback += 1
            result.n_candidates += len(candidates)
            result.n_kept += int(keep.sum())
            result.kept_iou += iou[:, 0].cpu()[keep].tolist()
    result.mask = union.numpy()
    return result


class PromptedSamInferer(Inferer):
    """MONAI inferer for SA-3's pseudo labels: (B, 1, X, Y, Z) HU volume and its SA-2 lung map ``region``
    (B, 1, X, Y, Z) -> (B, 1, X, Y, Z) uint8 voted SAM masks on the input grid.

    Works on axial slices in the radiological view (any input orientation); slices without lung
    in ``region`` are skipped, the others are encoded ``slice_batch`` at a time (the image encoder
    once per slice) and prompted as :func:`pseudo_label_slice` says. ``probmap`` (B, C, X, Y, Z),
    when given, supplies the ``aux_classes`` maps (thresholded at ``aux_threshold``). ``fallback``
    ("map" by default) fills a box whose candidate failed the vote with the map inside it. Distances are
    in millimetres of the slice's pixel spacing. ``last_info`` holds the run's counts and SAM's
    predicted IoU of the kept candidates.
    """

    def __init__(
        self,
        prompts: str = "boxes",
        aux: str = "none",
        aux_classes: Sequence[str] = ("heart", "bone"),
        aux_threshold: float = 0.5,
        class_names: Sequence[str] = CLASS_NAMES,
        grid_mm: float = 10.0,
        box_margin_mm: float = 10.0,
        min_box_area_mm2: float = 50.0,
        overlap_threshold: float = 0.5,
        veto_threshold: float = 0.2,
        negatives_per_class: int = 1,
        multimask_output: bool = False,
        mask_threshold: float = 0.0,
        fallback: str = "map",
        hu_window: Sequence[float] = HU_WINDOW,
        slice_batch: int = 4,
        prompt_batch: int = 64,
        progress: bool = True,
    ):
        super().__init__()
        _check_modes(prompts, aux, fallback)  # at start-up, not at the first slice
        unknown = [c for c in aux_classes if c not in class_names]
        if unknown:
            raise ValueError(f"aux_classes {unknown} are not among the probability map's classes {list(class_names)}")
        if not 0.0 <= overlap_threshold < 1.0:
            raise ValueError(f"overlap_threshold must be in [0, 1), got {overlap_threshold}")
        self.prompts, self.aux, self.fallback = prompts, aux, fallback
        self.aux_channels = [list(class_names).index(c) for c in aux_classes]
        self.aux_threshold = float(aux_threshold)
        self.grid_mm, self.box_margin_mm, self.min_box_area_mm2 = (
            float(grid_mm),
            float(box_margin_mm),
            float(min_box_area_mm2),
        )
        self.overlap_threshold, self.veto_threshold = float(overlap_threshold), float(veto_threshold)
        self.negatives_per_class, self.multimask_output, self.mask_threshold = (
            int(negatives_per_class),
            bool(multimask_output),
            float(mask_threshold),
        )
        self.window = HUWindow(hu_window)
        self.slice_batch, self.prompt_batch, self.progress = (
            max(1, int(slice_batch)),
            max(1, int(prompt_batch)),
            bool(progress),
        )
        self.last_info: dict = {}

    def settings(self) -> dict:
        return {
            "prompts": self.prompts,
            "aux": self.aux,
            "grid_mm": self.grid_mm,
            "box_margin_mm": self.box_margin_mm,
            "overlap_threshold": self.overlap_threshold,
            "veto_threshold": self.veto_threshold,
            "multimask_output": self.multimask_output,
            "fallback": self.fallback,
        }

    @torch.no_grad()
    def __call__(
        self,
        inputs: torch.Tensor,
        network,
        region: torch.Tensor | None = None,
        probmap: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if region is None:
            raise ValueError("PromptedSamInferer needs the SA-2 lung map: call it with region=(B, 1, X, Y, Z)")
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, X, Y, Z) HU volume, got {tuple(inputs.shape)}")
        if tuple(region.shape[2:]) != tuple(inputs.shape[2:]):
            raise ValueError(
                f"the lung map {tuple(region.shape[2:])} is not on the CT's grid {tuple(inputs.shape[2:])}"
            )
        if probmap is not None and tuple(probmap.shape[2:]) != tuple(inputs.shape[2:]):
            raise ValueError(
                f"the probability map {tuple(probmap.shape[2:])} is not on the CT's grid {tuple(inputs.shape[2:])}"
            )
        affines = getattr(inputs, "affine", None)
        outs = []
        for b in range(inputs.shape[0]):
            affine = (
                np.eye(4)
                if affines is None
                else np.asarray(
                    affines.reshape(-1, 4, 4)[min(b, affines.reshape(-1, 4, 4).shape[0] - 1)].cpu(), dtype=np.float64
                )
            )
            hu = np.asarray(inputs[b, 0].detach().cpu().as_subclass(torch.Tensor), dtype=np.float32)
            reg = np.asarray(region[b, 0].detach().cpu().as_subclass(torch.Tensor)) > 0.5
            aux = None
            if self.aux != "none" and probmap is not None and self.aux_channels:
                aux = np.stack(
                    [
                        np.asarray(probmap[b, c].detach().cpu().as_subclass(torch.Tensor)) >= self.aux_threshold
                        for c in self.aux_channels
                    ]
                )
            outs.append(torch.from_numpy(self._volume(network, hu, reg, aux, affine).astype(np.uint8)))
        return torch.stack(outs)[:, None]

    def _volume(
        self, sam, hu: np.ndarray, region: np.ndarray, aux: np.ndarray | None, affine: np.ndarray
    ) -> np.ndarray:
        start = time.perf_counter()
        hu_l, lps_affine, back = to_axcodes(hu, affine)
        reg_l = to_axcodes(region, affine)[0]
        aux_l = None if aux is None else np.stack([to_axcodes(a, affine)[0] for a in aux])
        spacing = np.linalg.norm(lps_affine[:3, :3], axis=0)
        pixel_mm = float(np.mean(spacing[:2]))
        grid = max(1, int(round(self.grid_mm / pixel_mm)))
        margin = int(round(self.box_margin_mm / pixel_mm))
        min_area = max(1, int(round(self.min_box_area_mm2 / (spacing[0] * spacing[1]))))
        out = np.zeros(hu_l.shape, dtype=bool)
        todo = [int(k) for k in np.flatnonzero(reg_l.any(axis=(0, 1)))]
        info = {
            "slices": int(hu_l.shape[2]),
            "slices_with_lung": len(todo),
            "candidates": 0,
            "kept": 0,
            "dots": 0,
            "boxes": 0,
            "fallback_boxes": 0,
            "kept_iou": [],
            "grid_px": grid,
        }
        bar = _progress(len(todo), self.progress)
        for s in range(0, len(todo), self.slice_batch):
            ks = todo[s : s + self.slice_batch]
            # radiological view: rows anterior -> posterior, columns patient right -> left
            slices = np.stack([hu_l[:, :, k].T for k in ks])
            embeddings = sam.encode(self.window(torch.from_numpy(slices)))
            for i, k in enumerate(ks):
                res = pseudo_label_slice(
                    sam,
                    embeddings[i : i + 1],
                    slices.shape[1:],
                    reg_l[:, :, k].T,
                    None if aux_l is None else aux_l[:, :, :, k].transpose(0, 2, 1),
                    prompts=self.prompts,
                    aux=self.aux,
                    grid_size=grid,
                    box_margin=margin,
                    min_box_area=min_area,
                    overlap_threshold=self.overlap_threshold,
                    veto_threshold=self.veto_threshold,
                    negatives_per_class=self.negatives_per_class,
                    multimask_output=self.multimask_output,
                    mask_threshold=self.mask_threshold,
                    prompt_batch=self.prompt_batch,
                    fallback=self.fallback,
                )
                out[:, :, k] = res.mask.T
                info["candidates"] += res.n_candidates
                info["kept"] += res.n_kept
                info["dots"] += res.n_dots
                info["boxes"] += res.n_boxes
                info["fallback_boxes"] += res.n_fallback
                info["kept_iou"] += res.kept_iou
            bar.update(len(ks))
        bar.close()
        info["mean_predicted_iou"] = float(np.mean(info["kept_iou"])) if info["kept_iou"] else None
        info["seconds"] = round(time.perf_counter() - start, 2)
        del info["kept_iou"]
        self.last_info = info
        return back(out)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pseudo label", unit="slice", disable=not enabled or total == 0, leave=False)


__all__ = [
    "AUX_MODES",
    "FALLBACK_MODES",
    "PROMPT_MODES",
    "PromptedSamInferer",
    "SliceResult",
    "algorithm2_literal",
    "pseudo_label_slice",
]
