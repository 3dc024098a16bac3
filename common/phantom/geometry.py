"""Geometry and noise: interpolation, smooth random fields, tubes as capsule segments, filtered noise."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from common.phantom.core import F32


def _interp(w, xp, fp):
    w = np.asarray(w)
    out = np.interp(w.ravel(), xp, fp).reshape(w.shape)
    return out.astype(w.dtype) if np.issubdtype(w.dtype, np.floating) else out


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _kernel_radius(sigma: float, truncate: float = 4.0) -> int:
    return int(truncate * float(sigma) + 0.5) if sigma > 0 else 0


def _noise_norm(sigma) -> float:
    """Standard deviation of unit white noise after scipy's Gaussian filter with ``sigma`` (voxels)."""
    norm = 1.0
    for s in sigma:
        if s <= 0:
            continue
        r = _kernel_radius(s)
        x = np.arange(-r, r + 1, dtype=np.float64)
        k = np.exp(-0.5 * (x / s) ** 2)
        k /= k.sum()
        norm *= math.sqrt(float((k**2).sum()))
    return norm


def _filtered_noise(seed: int, key: int, shape, k0: int, k1: int, sigma) -> np.ndarray:
    """Unit-variance Gaussian noise for slices [k0, k1) of a (nk, nj, ni) volume, smoothed by ``sigma``
    (voxels, z/y/x).  Each white-noise slice has its own random stream, so the result does not
    depend on how the volume is split into slabs."""
    nk, nj, ni = shape
    h = _kernel_radius(sigma[0])
    lo, hi = max(0, k0 - h), min(nk, k1 + h)
    block = np.empty((hi - lo, nj, ni), F32)
    for k in range(lo, hi):
        block[k - lo] = np.random.default_rng([seed, key, k]).standard_normal((nj, ni), dtype=F32)
    if any(s > 0 for s in sigma):
        block = ndimage.gaussian_filter(block, sigma, mode="reflect")
        block *= F32(1.0 / _noise_norm(sigma))
    return block[k0 - lo : k1 - lo]


def _blur_inplace(arr: np.ndarray, sigma, chunk: int = 16) -> None:
    """Gaussian filter of a (nk, nj, ni) array, in place, slab by slab with exact halos."""
    if all(s <= 0 for s in sigma):
        return
    nk = arr.shape[0]
    h = _kernel_radius(sigma[0])
    chunk = max(chunk, h, 1)
    tail = None
    for k0 in range(0, nk, chunk):
        k1 = min(nk, k0 + chunk)
        lo, hi = max(0, k0 - h), min(nk, k1 + h)
        block = arr[lo:hi].copy()
        if tail is not None and k0 > lo:
            block[: k0 - lo] = tail[len(tail) - (k0 - lo) :]
        tail = arr[max(0, k1 - h) : k1].copy()
        arr[k0:k1] = ndimage.gaussian_filter(block, sigma, mode="nearest")[k0 - lo : k1 - lo]


def _interp_matrix(x: np.ndarray, lo: float, step: float, n: int) -> np.ndarray:
    """Dense linear-interpolation weights (len(x), n) from a regular grid lo + step * arange(n)."""
    f = np.clip((x.astype(np.float64) - lo) / step, 0, n - 1 - 1e-6)
    i0 = np.floor(f).astype(int)
    t = f - i0
    m = np.zeros((len(x), n), F32)
    rows = np.arange(len(x))
    m[rows, i0] = 1 - t
    m[rows, np.minimum(i0 + 1, n - 1)] += t
    return m


class _CoarseField:
    """A smooth unit-variance random field on a millimetre grid, sampled at any voxel grid.

    Being defined in millimetres it does not change with the output resolution."""

    def __init__(self, rng, lo, hi, grid_mm: float, sigma_mm: float):
        self.lo = np.asarray(lo, np.float64)
        self.step = float(grid_mm)
        n = np.maximum(np.ceil((np.asarray(hi) - self.lo) / self.step).astype(int) + 2, 2)
        g = rng.standard_normal((n[2], n[1], n[0])).astype(F32)  # (w, v, u)
        g = ndimage.gaussian_filter(g, sigma_mm / self.step, mode="wrap")
        g -= g.mean()
        g /= max(float(g.std()), 1e-6)
        self.g = g

    def sample(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Field on the grid u (ni,) x v (nj,) x w (nk,), returned as (nk, nj, ni)."""
        nw, nv, nu = self.g.shape
        wx = _interp_matrix(u, self.lo[0], self.step, nu)
        wy = _interp_matrix(v, self.lo[1], self.step, nv)
        f = np.clip((w.astype(np.float64) - self.lo[2]) / self.step, 0, nw - 1 - 1e-6)
        i0 = np.floor(f).astype(int)
        t = (f - i0).astype(F32)[:, None, None]
        c = self.g[i0] * (1 - t) + self.g[np.minimum(i0 + 1, nw - 1)] * t  # (nk, nv, nu)
        return np.matmul(np.matmul(wy, c), wx.T)


@dataclass
class _Layer:
    dr: float  # added to the tube radius (mm); negative = an inner layer
    hu: float
    label: int | None  # None keeps the labels; LUNG_OR_BG: lung inside the lungs, else background
    set_part: bool = True


@dataclass(eq=False)
class _Tube:
    pts: np.ndarray  # (n, 3) anatomical mm (u, v, w)
    radii: np.ndarray  # (n,)
    layers: list
    part: int = 0
    carve: float | None = None  # remove lung within radius + outer layer + carve (mm)
    lung_only: bool = False  # draw only inside the lungs
    outside_heart: bool = False  # do not draw over the heart (great vessels emerge from it)
    inside_body: bool = False  # never draw into the air around the patient


@dataclass(eq=False)
class _Segs:
    """A batch of tapered capsules drawn together: per-segment geometry and flags, per-layer
    radius offsets (arrays), one HU value and label per layer."""

    a: np.ndarray  # (S, 3)
    b: np.ndarray  # (S, 3)
    ra: np.ndarray  # (S,)
    rb: np.ndarray  # (S,)
    dr: list  # per layer: (S,) radius offsets
    hu: list  # per layer: float
    label: list  # per layer: label, None or LUNG_OR_BG
    set_part: list  # per layer: bool
    part: np.ndarray  # (S,)
    carve: np.ndarray  # (S,) carve margin, NaN = none
    lung_only: np.ndarray  # (S,) bool
    outside_heart: np.ndarray  # (S,) bool
    inside_body: np.ndarray  # (S,) bool

    def __len__(self):
        return len(self.a)


def _segs_from_tubes(tubes: list) -> _Segs:
    """Concatenate tubes with the same layer structure (HU and labels of the first tube)."""
    ref = tubes[0].layers
    cols = {k: [] for k in ("a", "b", "ra", "rb", "part", "carve", "lung_only", "outside_heart", "inside_body")}
    dr = [[] for _ in ref]
    for t in tubes:
        if len(t.layers) != len(ref):
            raise ValueError("tubes of one batch need the same layers")
        n = len(t.pts) - 1
        cols["a"].append(t.pts[:-1])
        cols["b"].append(t.pts[1:])
        cols["ra"].append(t.radii[:-1])
        cols["rb"].append(t.radii[1:])
        cols["part"].append(np.full(n, t.part))
        cols["carve"].append(np.full(n, np.nan if t.carve is None else t.carve))
        cols["lung_only"].append(np.full(n, t.lung_only))
        cols["outside_heart"].append(np.full(n, t.outside_heart))
        cols["inside_body"].append(np.full(n, t.inside_body))
        for li, layer in enumerate(t.layers):
            dr[li].append(np.full(n, layer.dr))
    c = {k: np.concatenate(v) for k, v in cols.items()}
    return _Segs(
        c["a"],
        c["b"],
        c["ra"],
        c["rb"],
        [np.concatenate(d) for d in dr],
        [lay.hu for lay in ref],
        [lay.label for lay in ref],
        [lay.set_part for lay in ref],
        c["part"],
        c["carve"],
        c["lung_only"],
        c["outside_heart"],
        c["inside_body"],
    )


def _cat_segs(batches: list) -> _Segs:
    ref = batches[0]
    f = lambda name: np.concatenate([getattr(x, name) for x in batches])  # noqa: E731
    dr = [np.concatenate([x.dr[i] for x in batches]) for i in range(len(ref.dr))]
    return _Segs(
        f("a"),
        f("b"),
        f("ra"),
        f("rb"),
        dr,
        list(ref.hu),
        list(ref.label),
        list(ref.set_part),
        f("part"),
        f("carve"),
        f("lung_only"),
        f("outside_heart"),
        f("inside_body"),
    )


def _polyline(points, radii, n_per: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Smooth a coarse polyline (Catmull-Rom) into a denser one."""
    p = np.asarray(points, np.float64)
    r = np.asarray(radii, np.float64)
    if len(p) < 3:
        return p, r
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        for t in np.linspace(0, 1, n_per, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(
                0.5
                * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3)
            )
    out.append(p[-1])
    rr = np.interp(np.linspace(0, len(p) - 1, len(out)), np.arange(len(p)), r)
    return np.array(out), rr


def _seg_dist(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ab = b - a
    l2 = float(ab @ ab)
    t = np.zeros(len(points)) if l2 < 1e-12 else np.clip((points - a) @ ab / l2, 0, 1)
    d = np.linalg.norm(points - (a + t[:, None] * ab), axis=1)
    return d, t
