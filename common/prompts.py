"""SAM prompts drawn from SA-2 probability maps, and the candidate vote of Algorithm 2 (Eq. 9-10).

Everything here works on one 2D slice in the image convention SAM uses: arrays are (H, W) =
(rows, columns), points are (x, y) = (column, row), boxes are (x0, y0, x1, y1) in pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def grid_intersections(shape_hw: tuple[int, int], grid_size: int) -> np.ndarray:
    """(N, 2) (x, y) intersections of a grid with a line every ``grid_size`` pixels, centred on the slice."""
    g = int(grid_size)
    if g < 1:
        raise ValueError(f"grid_size must be at least 1 pixel, got {grid_size}")
    h, w = int(shape_hw[0]), int(shape_hw[1])
    xs = np.arange((w - 1) % g // 2, w, g)
    ys = np.arange((h - 1) % g // 2, h, g)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)


def grid_dot_prompts(region_hw: np.ndarray, grid_size: int) -> np.ndarray:
    """Algorithm 2's dot prompts: the grid intersections that fall inside ``region_hw`` (the thresholded
    lung probability), as (N, 2) (x, y)."""
    region = np.asarray(region_hw, dtype=bool)
    pts = grid_intersections(region.shape, grid_size)
    inside = region[pts[:, 1].astype(int), pts[:, 0].astype(int)]
    return pts[inside]


def component_box_prompts(region_hw: np.ndarray, margin: int = 0, min_area: int = 1) -> np.ndarray:
    """One box (x0, y0, x1, y1) per connected component of ``region_hw`` with at least ``min_area`` pixels,
    grown by ``margin`` pixels and clipped to the slice (MedLSAM-style box prompts): (K, 4)."""
    region = np.asarray(region_hw, dtype=bool)
    labels, n = ndimage.label(region)
    if n == 0:
        return np.zeros((0, 4), dtype=np.float32)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    h, w = region.shape
    boxes = []
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or sizes[lab] < min_area:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop - 1, sl[1].start, sl[1].stop - 1
        boxes.append([max(0, x0 - margin), max(0, y0 - margin), min(w - 1, x1 + margin), min(h - 1, y1 + margin)])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def negative_point_prompts(aux_regions: np.ndarray, grid_size: int, per_region: int = 1) -> np.ndarray:
    """Negative points from the other classes' thresholded maps (heart, bone, ...): for each (H, W) map of
    ``aux_regions`` (A, H, W), the ``per_region`` grid intersections deepest inside it: (M, 2) (x, y)."""
    out = []
    for region in np.asarray(aux_regions, dtype=bool).reshape(-1, *np.shape(aux_regions)[-2:]):
        pts = grid_dot_prompts(region, grid_size)
        if not len(pts):
            continue
        depth = ndimage.distance_transform_edt(region)[pts[:, 1].astype(int), pts[:, 0].astype(int)]
        out.append(pts[np.argsort(-depth, kind="stable")[:per_region]])
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 2), dtype=np.float32)


def overlap_ratio(candidates: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Eq. 9: |C_k ∩ P| / |C_k| for (N, H, W) boolean candidates against an (H, W) boolean map; an empty
    candidate scores 0."""
    c = candidates.reshape(candidates.shape[0], -1)
    inter = (c & reference.reshape(1, -1)).sum(1)
    area = c.sum(1)
    return torch.where(area > 0, inter.float() / area.clamp_min(1).float(), torch.zeros_like(area, dtype=torch.float32))


def union_of_selected(candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Eq. 10: the union of the kept (N, H, W) candidates, an (H, W) boolean mask."""
    if candidates.shape[0] == 0 or not bool(keep.any()):
        return torch.zeros(candidates.shape[1:], dtype=torch.bool, device=candidates.device)
    return candidates[keep].any(0)


__all__ = [
    "component_box_prompts",
    "grid_dot_prompts",
    "grid_intersections",
    "negative_point_prompts",
    "overlap_ratio",
    "union_of_selected",
]
