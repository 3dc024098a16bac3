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


def touches_border(labels: np.ndarray, n: int) -> np.ndarray:
    """Per component id 0..n of ``labels`` (as ``ndimage.label`` gives them), whether it touches the in-plane
    border (the faces of the first two axes); id 0, the background, never does."""
    border = np.zeros(n + 1, dtype=bool)
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        border[np.unique(face)] = True
    border[0] = False
    return border


def component_medians(hu: np.ndarray, labels: np.ndarray, ids) -> np.ndarray:
    """Median HU of each component ``ids`` of ``labels``, each over its bounding box only (``ndimage.median``
    sorts every labelled voxel of the volume: 3.4 s on a 512 x 512 x 64 scan against 0.2 s)."""
    objects = ndimage.find_objects(labels)
    return np.asarray(
        [np.median(hu[objects[lab - 1]][labels[objects[lab - 1]] == lab]) for lab in ids], dtype=np.float64
    )


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
    border = touches_border(labels, n)
    big = np.flatnonzero(sizes * voxel_ml >= min_component_ml)
    big = big[big > 0]
    candidates = []
    if big.size:
        outside = set(
            int(lab)
            for lab, m in zip(big[border[big]], component_medians(hu, labels, big[border[big]]))
            if m < FREE_AIR_MEDIAN_HU
        )
        candidates = [int(lab) for lab in big if int(lab) not in outside]  # not the air outside the body
    candidates = sorted(candidates, key=lambda lab: sizes[lab], reverse=True)[:max_components]
    keep = np.zeros(n + 1, dtype=bool)
    keep[candidates] = True
    mask = keep[labels]
    for k in np.flatnonzero(mask.any(axis=(0, 1))):  # vessels and nodules inside the lung belong to it
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


def split_left_right(mask: np.ndarray, affine: np.ndarray, max_erosions: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Split a lung mask into (right, left) masks; every voxel of the mask goes to one side.

    Each connected part of the mask is split on its own. The two lungs often touch (anterior
    junction) or are joined by the airways, so a part is eroded until it falls into two large
    pieces; when those lie on either side of the midline they seed a watershed on the part's
    distance map, which cuts along the narrowest neck. A part that does not split that way (one
    lung, or a lobe cut off from the rest by a missing slice) goes whole to the side of its
    centroid. The midline is the centre of the mask's bounding box when the mask has several
    parts; a mask in one part is split wherever it falls into two (both lungs joined), or else
    (a crop through one side) goes to the side of the volume's centre. +x is the patient's right
    in nibabel's RAS+.
    """
    from skimage.segmentation import watershed

    right, left = np.zeros_like(mask, dtype=bool), np.zeros_like(mask, dtype=bool)
    labels, n = ndimage.label(mask)
    if n == 0:
        return right, left
    whole = ndimage.find_objects((labels > 0).astype(np.uint8))[0]
    if n == 1:
        midline = _world_x((np.asarray(mask.shape) - 1) / 2.0, (slice(0, None),) * 3, affine)
    else:
        midline = _world_x(np.asarray([(b.stop - 1 + b.start) / 2.0 for b in whole]), (slice(0, None),) * 3, affine)
    for lab, box in enumerate(ndimage.find_objects(labels), start=1):
        sub = labels[box] == lab
        seeds, k = _two_seeds(sub, max_erosions)
        xs = [_world_x(np.argwhere(seeds == s).mean(axis=0), box, affine) for s in (1, 2)] if k == 2 else []
        if k == 2 and (n == 1 or (xs[0] - midline) * (xs[1] - midline) < 0):
            parts = watershed(-ndimage.distance_transform_edt(sub), seeds, mask=sub)
            right_label = 1 if xs[0] > xs[1] else 2
            right[box] |= parts == right_label
            left[box] |= parts == 3 - right_label
        else:
            side = right if _world_x(np.argwhere(sub).mean(axis=0), box, affine) > midline else left
            side[box] |= sub
    return right, left


def _two_seeds(mask: np.ndarray, max_erosions: int) -> tuple[np.ndarray, int]:
    """Labels 1 and 2 on the two largest parts of the mask, eroded until it splits (0 where none)."""
    current = mask
    total = mask.sum()
    for step in range(max_erosions + 1):
        labels, n = ndimage.label(current)
        if n >= 2:
            sizes = np.bincount(labels.ravel())[1:]
            order = np.argsort(sizes)[::-1]
            if sizes[order[1]] >= 0.1 * total * (sizes.sum() / total):
                seeds = np.zeros(mask.shape, dtype=np.int32)
                seeds[labels == order[0] + 1] = 1
                seeds[labels == order[1] + 1] = 2
                return seeds, 2
        if step < max_erosions:
            current = ndimage.binary_erosion(current, iterations=1)
            if not current.any():
                break
    return np.zeros(mask.shape, dtype=np.int32), 1


def _world_x(ijk: np.ndarray, box: tuple, affine: np.ndarray) -> float:
    offset = np.asarray([b.start or 0 for b in box], dtype=float)
    return float(affine[0, :3] @ (np.asarray(ijk, dtype=float) + offset) + affine[0, 3])


def body_mask(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """Boolean mask of everything but the air around the patient in an [i, j, k] HU volume.

    Outside air is what is darker than ``threshold``, touches the in-plane border and is as dark as
    free air (median below ``FREE_AIR_MEDIAN_HU``): a crop that cuts through a lung leaves the lung
    (about -850 HU) inside the body. Air outside it is never lung."""
    hu = np.asarray(hu)
    air = hu < threshold
    labels, n = ndimage.label(air)
    if n == 0:
        return np.ones(hu.shape, dtype=bool)
    ids = np.flatnonzero(touches_border(labels, n))
    outside = np.zeros(n + 1, dtype=bool)
    if ids.size:
        outside[ids[component_medians(hu, labels, ids) < FREE_AIR_MEDIAN_HU]] = True
    return ~outside[labels]
