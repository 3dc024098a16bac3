"""The classical HU-threshold lung mask: QC's lung-coverage check, test references and a baseline.

Lung parenchyma is air-filled (about -850 HU) and enclosed by the body; air outside the body is
connected to the image border. Crops may cut through the lungs, so border-touching air is only
discarded when it is as dark as free air (outside air is about -1000 HU and uniform).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LUNG_HU_THRESHOLD = -400.0
FREE_AIR_MEDIAN_HU = -960.0


def hu_threshold_lung_mask(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    threshold: float = LUNG_HU_THRESHOLD,
    min_component_ml: float = 20.0,
    max_components: int = 2,
) -> np.ndarray:
    """Boolean lung mask of an [i, j, k] HU volume: dark, enclosed, large air components, holes filled per slice."""
    air = hu < threshold
    labels, n = ndimage.label(air)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.zeros(n + 1, dtype=bool)
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        border[np.unique(face)] = True
    big = np.flatnonzero(sizes * voxel_ml >= min_component_ml)
    big = big[big > 0]
    candidates = []
    if big.size:
        # One pass over the big components' voxels gives each one's median HU.
        objects = ndimage.find_objects(labels)
        for lab in big:
            if border[lab]:
                box = objects[lab - 1]
                if np.median(hu[box][labels[box] == lab]) < FREE_AIR_MEDIAN_HU:
                    continue  # air outside the body
            candidates.append(int(lab))
    candidates = sorted(candidates, key=lambda lab: sizes[lab], reverse=True)[:max_components]
    keep = np.zeros(n + 1, dtype=bool)
    keep[candidates] = True
    mask = keep[labels]
    for k in np.flatnonzero(mask.any(axis=(0, 1))):  # vessels and nodules inside the lung belong to it
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


def split_left_right(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a lung mask into (right, left) along RAS x (+x is the patient's right, as in nibabel's RAS+)."""
    i, j, k = np.nonzero(mask)
    if i.size == 0:
        return mask.copy(), mask.copy()
    xyz = affine[:3, :3] @ np.vstack([i, j, k]) + affine[:3, 3:4]
    labels, n = ndimage.label(mask)
    right, left = np.zeros_like(mask), np.zeros_like(mask)
    comps = labels[i, j, k]
    midline = float(np.median(xyz[0]))
    if n >= 2:
        sizes = np.bincount(comps)
        big = np.argsort(sizes)[::-1][:2]
        xs = {lab: float(xyz[0][comps == lab].mean()) for lab in big if lab > 0}
        if len(xs) == 2:
            midline = float(np.mean(list(xs.values())))
    is_left = xyz[0] < midline
    left[i[is_left], j[is_left], k[is_left]] = True
    right[i[~is_left], j[~is_left], k[~is_left]] = True
    return right, left
