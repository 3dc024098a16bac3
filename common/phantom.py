"""Synthetic chest CT phantoms with ground truth, a short report and grounded region captions.

``generate_phantom(shape, spacing, seed)`` builds a chest CT in Hounsfield units together with

* ``labels`` (uint8): 0 background, 1 lung parenchyma, 2 heart, 3 blood vessel, 4 airway (lumen),
  5 bone -- the values of :mod:`common.classes`;
* ``lungs`` (uint8): the whole pleural cavity of each lung, intrapulmonary vessels, airways and
  nodules included: 1 right lung, 2 left lung (the lung-segmentation ground truth);
* ``report``: short radiology-report sentences that describe what was generated;
* ``captions``: one dict per visible structure with its class, a text, a voxel bounding box and
  2D boxes on a few axial slices (for cropping patches around each structure).

Geometry and orientation
------------------------
The anatomy is defined analytically in millimetres, so the same seed gives the same patient at
any shape and spacing (only the sampling changes).  Arrays are indexed ``[i, j, k]`` like
nibabel / MONAI ``LoadImage``; the affine is the one a DICOM-derived NIfTI of an axial scan
usually has, ``diag(-sx, -sy, sz)`` in RAS+ world coordinates:

* ``i`` increases towards the patient's **left**   (world x = -sx * i + x0, RAS x > 0 is patient right),
* ``j`` increases towards **posterior**             (world y = -sy * j + y0),
* ``k`` increases towards **superior**              (world z = +sz * k + z0).

The world origin is the centre of the field of view, so displaying ``hu[:, :, k].T`` with the
origin at the top gives the usual radiological view (patient right on the image left, anterior
up).  The generator works slice-major, so the returned arrays are Fortran-ordered ``[i, j, k]``
views (what nibabel writes without a copy).  Bounding boxes are inclusive voxel indices: ``[[i0, j0, k0], [i1, j1, k1]]``; 2D boxes are
``[i0, j0, i1, j1]``.

Image formation: structures are rasterised with analytic partial-volume anti-aliasing, then the
volume is blurred with a Gaussian of standard deviation ``blur_mm`` (mm, per axis) and Gaussian
noise of standard deviation ``noise_hu`` (slightly correlated in-plane) is added; voxels outside
the circular reconstruction field of view are set to -1024 (``fov_circle``).  Everything is
float32 and processed slab by slab, so a 512 x 512 x 133 volume needs a few hundred MB.

Command line::

    python -m common.phantom --out DIR --n 4 --shape 160 160 96 --spacing 2 2 2.5 --seed 0
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.special import ndtr

from common.classes import AIRWAY, BACKGROUND, BONE, CLASS_NAMES, HEART, LEFT_LUNG, LUNG, RIGHT_LUNG, VESSEL
from common.io.atomic import atomic_path, write_json_atomic
from common.io.nifti import save_nifti_array
from common.io.volume import CTVolume

__all__ = ["Phantom", "generate_phantom", "write_phantom", "render_slice_png", "main"]

F32 = np.float32
AIR_HU = -1000.0
PAD_HU = -1024.0
FAT_HU = -95.0
MED_FAT_HU = -85.0
MUSCLE_HU = 45.0
LUNG_OR_BG = -1  # layer label: LUNG inside the lungs, background elsewhere
_CLASS_OF_LABEL = {LUNG: "lung", HEART: "heart", VESSEL: "blood vessel", AIRWAY: "airway", BONE: "bone"}
_ORDINAL = {1: "1st", 2: "2nd", 3: "3rd"}


@dataclass
class Phantom:
    """A generated chest CT with its ground truth (see the module docstring for conventions)."""

    ct: CTVolume
    labels: np.ndarray
    lungs: np.ndarray
    report: list[str]
    captions: list[dict]
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- helpers


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


# ----------------------------------------------------------------------------------- anatomy

_W = np.array([-260, -125, -60, 0, 50, 80, 110, 260], np.float64)
_CU = np.array([64, 64, 63, 61, 56, 53, 50, 48], np.float64)
_RA = np.array([58, 58, 57, 55, 50, 47, 44, 42], np.float64)
_RB = np.array([92, 92, 90, 85, 76, 70, 64, 60], np.float64)
_CV = np.array([2, 2, 4, 7, 12, 16, 20, 22], np.float64)


class _Anatomy:
    """All anatomical parameters and analytic shapes of one phantom (anatomical mm: u = patient
    left, v = posterior, w = superior; w = 0 is the middle of the lungs)."""

    def __init__(
        self, rng: np.random.Generator, rng_find: np.random.Generator, nodules: int | None, emphysema: bool | None
    ):
        self.rng = rng
        s = self.s = float(rng.uniform(0.9, 1.03))
        sl = self.sl = float(rng.uniform(0.96, 1.04))
        self.sc = np.array([s * sl, s, s])  # scale of (u, v, w)
        self.w_sh = 45.0 * s
        self.w_apex = {RIGHT_LUNG: 115.0 * s, LEFT_LUNG: 118.0 * s}
        self.dome_top = {RIGHT_LUNG: -48.0 * s + rng.normal(0, 3), LEFT_LUNG: -62.0 * s + rng.normal(0, 3)}
        self.w_min = -124.0 * s
        self.right_wider = 1.04
        self.fat = np.array([rng.uniform(6, 22), rng.uniform(5, 18), rng.uniform(3, 8)])  # lateral, anterior, posterior
        self.contrast = bool(rng.random() < 0.5)
        self.blood_hu = float(rng.uniform(150, 250)) if self.contrast else float(rng.uniform(35, 50))
        self.myo_hu = 100.0 if self.contrast else 42.0
        self.liver_hu = 105.0 if self.contrast else 58.0
        self.spleen_hu = 115.0 if self.contrast else 48.0
        self.cardiomegaly = bool(rng.random() < 0.2)
        self.heart_scale = float(rng.uniform(1.22, 1.32)) if self.cardiomegaly else float(rng.uniform(0.94, 1.04))
        hs = self.heart_scale
        self.heart_c = self.S([24 + 30 * (hs - 1), -20, -24 - 15 * (hs - 1)]) + rng.normal(0, 2, 3)
        e1 = _unit([0.62, -0.50, -0.60] + rng.normal(0, 0.04, 3))
        e2 = _unit(np.cross([0, 0, 1.0], e1))
        e3 = np.cross(e1, e2)
        self.heart_e = np.stack([e1, e2, e3])
        self.heart_ax = np.array([64.0, 42.0, 38.0]) * s * hs
        self.vb_ax = (19.0 * s, 16.0 * s)
        # findings come from their own stream: switching them on or off keeps the same patient
        r_emph, target, r_nod, n_nod = (
            rng_find.random(),
            rng_find.uniform(0.05, 0.22),
            rng_find.random(),
            int(rng_find.integers(1, 4)),
        )
        self.emphysema = bool(r_emph < 0.3) if emphysema is None else bool(emphysema)
        self.emph_target = float(target) if self.emphysema else 0.0
        self.n_nodules = (0 if r_nod < 0.4 else n_nod) if nodules is None else int(nodules)
        if self.n_nodules < 0:
            raise ValueError(f"nodules must be >= 0, got {nodules}")
        self._build_vertebrae()

    # -- scaling
    def S(self, p) -> np.ndarray:
        return np.asarray(p, np.float64) * self.sc

    # -- profiles
    def prof(self, w):
        x = w / self.s
        sl = self.s * self.sl
        return (
            _interp(x, _W, _CU) * F32(sl),
            _interp(x, _W, _RA) * F32(sl),
            _interp(x, _W, _RB) * F32(self.s),
            _interp(x, _W, _CV) * F32(self.s),
        )

    def cap(self, w, side):
        t = np.clip((w - self.w_sh) / (self.w_apex[side] - self.w_sh), 0, 1)
        return np.sqrt(np.clip(1 - t * t, 0, 1))

    def cage_cap(self, w):
        t = np.clip((w - self.w_sh) / (self.w_apex[LEFT_LUNG] + 35 * self.s - self.w_sh), 0, 1)
        return np.maximum(np.sqrt(np.clip(1 - t * t, 0, 1)), 0.45)

    def neck(self, w):
        """Body narrowing above the lung apices (1 in the thorax)."""
        t = np.clip((w - 112 * self.s) / (70 * self.s), 0, 1)
        t = t * t * (3 - 2 * t)
        return 1 - 0.42 * t, 1 - 0.35 * t, 1 - 0.1 * t

    def spine_v(self, w):
        return (60.0 + 3.0 * (1 - np.clip(w / (150 * self.s), -1, 1) ** 2)) * self.s

    def mediastinum(self, w):
        mc = _interp(w / self.s, [-200, -60, 0, 60, 200], [6, 8, 5, 1, 0]) * F32(self.s)
        hw = _interp(w / self.s, [-200, 0, 60, 200], [8, 8, 9, 10]) * F32(self.s)
        return mc, hw

    def sternum_v(self, w):
        cu, ra, rb, cv = self.prof(w)
        return cv - 0.9 * rb * self.cage_cap(w) - 7.0 * self.s

    def dome(self, side, u, v):
        sgn = -1.0 if side == RIGHT_LUNG else 1.0
        s = self.s
        du = (u - sgn * 55 * s * self.sl) / (58 * s * self.sl)
        dv = (v + 5 * s) / (92 * s)
        depth = 46 * s * du * du + np.where(dv > 0, 64 * s, 30 * s) * dv * dv
        return self.dome_top[side] - depth

    def abdomen_top(self, u, v):
        return np.maximum(np.maximum(self.dome(RIGHT_LUNG, u, v), self.dome(LEFT_LUNG, u, v)), F32(-80 * self.s))

    def lung_side(self, u, v, w, exclude: bool = True) -> np.ndarray:
        """0 / RIGHT_LUNG / LEFT_LUNG for points (broadcast arrays), before tubes are carved."""
        shape = np.broadcast_shapes(np.shape(u), np.shape(v), np.shape(w))
        out = np.zeros(shape, np.uint8)
        cu, ra, rb, cv = self.prof(w)
        mc, hw = self.mediastinum(w)
        for side, sgn in ((RIGHT_LUNG, -1.0), (LEFT_LUNG, 1.0)):
            g = self.cap(w, side)
            a = np.maximum(ra * g * (self.right_wider if side == RIGHT_LUNG else 1.0), 1e-3)
            b = np.maximum(rb * g, 1e-3)
            du = (u - sgn * cu) / a
            dv = (v - cv) / b
            f = du * du + np.where(dv > 0, dv * dv * np.abs(dv), dv * dv)
            ins = (f <= 1) & (sgn * (u - mc) > hw) & (w > self.dome(side, u, v)) & (w > self.w_min)
            if exclude:
                ins &= ~self.heart_excl(u, v, w) & ~self.spine_excl(u, v, w)
            out[ins] = side
        return out

    def heart_q(self, u, v, w, margin: float = 0.0, center=None, axes=None):
        c = self.heart_c if center is None else center
        ax = (self.heart_ax if axes is None else np.asarray(axes)) + margin
        du, dv, dw = u - F32(c[0]), v - F32(c[1]), w - F32(c[2])
        q = 0
        for e, a in zip(self.heart_e, ax):
            x = (du * F32(e[0]) + dv * F32(e[1]) + dw * F32(e[2])) / F32(a)
            q = q + x * x
        return q

    def heart_excl(self, u, v, w):
        return self.heart_q(u, v, w, margin=7.0 * self.s) <= 1

    def spine_excl(self, u, v, w):
        a, b = self.vb_ax
        vs = self.spine_v(w)
        m = 4.0 * self.s
        body = (u / (a + m)) ** 2 + ((v - vs) / (b + m)) ** 2 <= 1
        return body | ((np.abs(u) < 25 * self.s) & (v > vs))

    def lobe(self, side, u, v, w):
        """Lobe names for points of one lung."""
        s = self.s
        w_ob = self.oblique(side, u, v)
        lower = w < w_ob
        if side == LEFT_LUNG:
            return np.where(lower, "left lower lobe", "left upper lobe")
        middle = ~lower & (w < 8 * s - 0.1 * v)
        return np.where(lower, "right lower lobe", np.where(middle, "right middle lobe", "right upper lobe"))

    def oblique(self, side, u, v):
        """Height of the oblique fissure (lower lobe below / behind it)."""
        s = self.s
        x = np.abs(u) - 60 * s
        return (-45 if side == RIGHT_LUNG else -40) * s + 0.62 * (v + 60 * s) + 0.25 * x - 0.002 * x * x / s

    def fissure_dist(self, side, u, v, w):
        s = self.s
        w_ob = self.oblique(side, u, v)
        d = np.abs(w - w_ob) / F32(math.sqrt(1 + 0.62**2))
        if side == RIGHT_LUNG:
            dh = np.abs(w - (8 * s - 0.1 * v)) / F32(math.sqrt(1.01))
            d = np.where(w > w_ob, np.minimum(d, dh), d)
        return d

    def cage_radius(self, side, w, phi, offset):
        """Distance from the lung-side centre to the thoracic cage (+offset) along direction phi
        (0 = posterior, pi/2 = lateral, pi = anterior), solved by bisection."""
        cu, ra, rb, cv = self.prof(w)
        gc = self.cage_cap(w)
        a = ra * gc * (self.right_wider if side == RIGHT_LUNG else 1.0) + 3 * self.s + offset
        b = rb * gc + 3 * self.s + offset
        su, cvv = np.sin(phi), np.cos(phi)
        lo, hi = np.zeros_like(w), np.full_like(w, 400.0)
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            x, y = mid * su / a, mid * cvv / b
            f = x * x + np.where(y > 0, np.abs(y) ** 3, y * y)
            inside = f <= 1
            lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
        return lo

    def cage_point(self, side, w, phi, offset):
        sgn = -1.0 if side == RIGHT_LUNG else 1.0
        cu, ra, rb, cv = self.prof(np.asarray(w, np.float64))
        r = self.cage_radius(side, np.asarray(w, np.float64), phi, offset)
        return np.stack([sgn * (cu + r * np.sin(phi)), cv + r * np.cos(phi), np.asarray(w, np.float64)], axis=-1)

    def _build_vertebrae(self):
        s = self.s
        levels = []
        # T1 top at +124 mm; thoracic pitch 23.5, cervical 19, lumbar 30 (scaled)
        top = 124.0 * s
        names = ["T%d" % i for i in range(1, 13)] + ["L%d" % i for i in range(1, 5)]
        w = top
        for n in names:
            pitch = (23.5 if n.startswith("T") else 30.0) * s
            disc = (5.0 if n.startswith("T") else 8.0) * s
            levels.append((n, w - disc / 2 - (pitch - disc) / 2, pitch - disc, disc, pitch))
            w -= pitch
        w = top
        for n in ["C7", "C6", "C5", "C4"]:
            pitch, disc = 19.0 * s, 4.5 * s
            w += pitch
            levels.insert(0, (n, w - disc / 2 - (pitch - disc) / 2, pitch - disc, disc, pitch))
        self.vertebrae = levels  # (name, centre w, body height, disc height, pitch)

    def vert_size(self, name):
        kind, n = name[0], int(name[1:])
        if kind == "C":
            f = 0.8
        elif kind == "T":
            f = 0.9 + 0.2 * (n - 1) / 11
        else:
            f = 1.12 + 0.03 * n
        return self.vb_ax[0] * f, self.vb_ax[1] * f

    def full_name(self, name):
        kind = {"C": "cervical", "T": "thoracic", "L": "lumbar"}[name[0]]
        return f"{name} {kind} vertebra"


# ----------------------------------------------------------------------------------- trees


def _grow_tree(rng, roots, r_ref: float, n_ref: int, expo: float, r_min: float, frac=(0.35, 0.6)):
    """Recursive-bisection vascular / bronchial tree.  roots: list of (start point, points).
    Returns segments (p0, p1, r0, r1, depth)."""
    segs = []

    def radius(n):
        return max(r_ref * (n / n_ref) ** expo, r_min)

    def rec(p0, pts, depth):
        n = len(pts)
        r = radius(n)
        if n == 1:
            end = pts[0]
            segs.append((p0, end, r, max(r * 0.8, r_min), depth))
            return
        c = pts.mean(0)
        p1 = p0 + rng.uniform(*frac) * (c - p0)
        segs.append((p0, p1, r, r, depth))
        x = pts - c
        _, vecs = np.linalg.eigh(x.T @ x)
        axis = vecs[:, -1] + rng.normal(0, 0.25, 3)
        order = np.argsort(x @ axis)
        cut = int(np.clip(round(n * rng.uniform(0.35, 0.65)), 1, n - 1))
        rec(p1, pts[order[:cut]], depth + 1)
        rec(p1, pts[order[cut:]], depth + 1)

    for start, pts in roots:
        if len(pts):
            rec(np.asarray(start, np.float64), np.asarray(pts, np.float64), 0)
    return segs


# ----------------------------------------------------------------------------------- builder


class _Builder:
    def __init__(self, shape, spacing, seed, nodules, emphysema, noise_hu, blur_mm, fov_circle, table):
        self.shape = tuple(int(x) for x in shape)
        self.spacing = tuple(float(x) for x in spacing)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be 3 positive ints, got {shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing}")
        self.seed = int(seed)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.noise_hu = float(noise_hu)
        self.blur_mm = float(blur_mm)
        self.fov_circle = bool(fov_circle)
        self.table = bool(table)
        self.rng = np.random.default_rng(self.seed)  # anatomy
        self.rng_find = np.random.default_rng([self.seed, 7919])  # nodules and emphysema
        self.A = _Anatomy(self.rng, self.rng_find, nodules, emphysema)
        ni, nj, nk = self.shape
        sx, sy, sz = self.spacing
        # anatomy offset from the FOV centre (mm); the lungs span about -124 .. +118 mm (scaled)
        self.shift = self.rng.normal(0, [3.0, 3.0, 3.0]) + np.array([0.0, 0.0, 3.0 * self.A.s])
        self.ci, self.cj, self.ck = (ni - 1) / 2, (nj - 1) / 2, (nk - 1) / 2
        # anatomical coordinates of voxel centres
        self.u = ((np.arange(ni) - self.ci) * sx - self.shift[0]).astype(F32)
        self.v = ((np.arange(nj) - self.cj) * sy - self.shift[1]).astype(F32)
        self.w = ((np.arange(nk) - self.ck) * sz - self.shift[2]).astype(F32)
        self.h = float(np.prod(self.spacing)) ** (1 / 3)
        self.parts: dict[int, dict] = {}
        self.nodules: list[dict] = []

    # -- parts (structures that get a caption)
    def part(self, cls: str, text: str, **extra) -> int:
        pid = len(self.parts) + 1
        if pid > 255:
            raise RuntimeError("too many parts")
        self.parts[pid] = dict(cls=cls, text=text, **extra)
        return pid

    # -- index helpers
    def irange(self, lo, hi, axis):
        coord = (self.u, self.v, self.w)[axis]
        step = self.spacing[axis]
        n = len(coord)
        a = int(np.floor((lo - coord[0]) / step))
        b = int(np.ceil((hi - coord[0]) / step)) + 1
        return max(0, a), min(n, b)

    # ------------------------------------------------------------------ tubes
    def build_tubes(self):
        A, s, rng = self.A, self.A.s, self.rng
        S = A.S
        blood = A.blood_hu
        vessel = lambda: [_Layer(0.0, blood, VESSEL)]  # noqa: E731
        self.med_tubes: list[_Tube] = []
        self.tubes_pre: list[_Tube] = []  # mediastinal structures drawn first
        j = lambda: rng.normal(0, 1.5, 3)  # noqa: E731

        def tube(points, radii, layers, part=0, carve=2.5 * s, n_per=4, lung_only=False, jitter=True):
            p = np.array([S(q) + (j() if jitter else 0) for q in points])
            r = np.asarray(radii, np.float64) * s
            p, r = _polyline(p, r, n_per)
            t = _Tube(p, r, layers, part, carve, lung_only)
            return t

        # esophagus
        esoph = tube(
            [[-2, 8, 190], [0, 24, 120], [2, 30, 60], [4, 32, 0], [12, 28, -60], [28, 8, -98]],
            [8, 8, 8, 8, 8, 9],
            [_Layer(0.0, 38.0, BACKGROUND, False), _Layer(-6.5 * s, AIR_HU, BACKGROUND, False)],
            carve=2.0 * s,
        )
        # aorta
        p_ao = self.part("blood vessel", "aorta")
        aorta = tube(
            [
                [-2, -20, -14],
                [-10, -27, 8],
                [-8, -26, 36],
                [2, -13, 52],
                [16, 9, 51],
                [24, 30, 40],
                [26, 38, 18],
                [22, 42, -40],
                [14, 40, -100],
                [6, 36, -170],
                [4, 34, -260],
            ],
            [14, 15, 14.5, 13.5, 13, 12.5, 12, 11.5, 11, 10.5, 10],
            vessel(),
            p_ao,
        )
        p_pa = self.part("blood vessel", "pulmonary artery")
        pa_main = tube([[14, -40, -8], [14, -30, 8], [12, -18, 18]], [14, 14, 13], vessel(), p_pa)
        rpa_end = S([-44, 4, 10]) + j()
        lpa_end = S([50, 14, 20]) + j()
        rpa = tube(
            [[12, -18, 18], [-6, -3, 17], [-28, 3, 13], rpa_end / A.sc], [11, 10.5, 10, 9], vessel(), p_pa, jitter=False
        )
        lpa = tube(
            [[12, -18, 18], [28, -4, 26], [42, 8, 24], lpa_end / A.sc], [11, 10.5, 10, 9], vessel(), p_pa, jitter=False
        )
        p_svc = self.part("blood vessel", "superior vena cava")
        svc = tube([[-30, -12, 78], [-31, -12, 40], [-30, -11, 10], [-28, -8, -6]], [9, 9.5, 10, 10], vessel(), p_svc)
        p_ivc = self.part("blood vessel", "inferior vena cava")
        ivc = tube([[-24, 8, -260], [-24, 4, -120], [-22, 0, -70], [-20, -4, -52]], [12, 12, 12.5, 12], vessel(), p_ivc)
        p_az = self.part("blood vessel", "azygos vein")
        azy = tube(
            [[-12, 44, -200], [-12, 46, -60], [-13, 45, 18], [-20, 32, 32], [-28, 2, 34], [-30, -8, 32]],
            [4, 4.2, 4.5, 5, 5, 5],
            vessel(),
            p_az,
            carve=1.5 * s,
        )
        p_bca = self.part("blood vessel", "brachiocephalic artery")
        bca = tube([[-4, -17, 50], [-16, -12, 90], [-26, -6, 130], [-32, -2, 200]], [7, 6.5, 6, 5.5], vessel(), p_bca)
        p_lcca = self.part("blood vessel", "left common carotid artery")
        lcca = tube([[6, -11, 52], [12, -8, 100], [18, -4, 200]], [5, 4.5, 4.5], vessel(), p_lcca)
        p_lsa = self.part("blood vessel", "left subclavian artery")
        lsa = tube([[15, 0, 50], [24, 0, 100], [42, -6, 128], [80, -12, 136]], [6, 5.5, 5, 5], vessel(), p_lsa)
        p_bcv = self.part("blood vessel", "brachiocephalic vein")
        lbcv = tube(
            [[80, -18, 112], [50, -26, 96], [18, -27, 82], [-22, -16, 76], [-30, -12, 78]],
            [6, 6.5, 6.5, 7, 8],
            vessel(),
            p_bcv,
        )
        rbcv = tube([[-70, -14, 130], [-44, -12, 110], [-30, -12, 80]], [7, 7.5, 8], vessel(), p_bcv)
        # pulmonary veins into the left atrium
        p_pv = self.part("blood vessel", "pulmonary veins")
        la = A.heart_c - 35 * s * A.heart_e[0] * A.heart_scale + 16 * s * A.heart_e[1]
        pv_ends = {
            ("R", "sup"): S([-46, -6, 0]) + j(),
            ("R", "inf"): S([-44, 18, -26]) + j(),
            ("L", "sup"): S([50, 0, 6]) + j(),
            ("L", "inf"): S([48, 22, -22]) + j(),
        }
        pv_tubes = []
        for (sd, lvl), end in pv_ends.items():
            start = la + np.array(
                [(-12 if sd == "R" else 12) * s, 4 * s if lvl == "inf" else -4 * s, (-8 if lvl == "inf" else 6) * s]
            )
            mid = 0.5 * (start + end) + np.array([0, 0, 0])
            p, r = _polyline(np.array([start, mid, end]), np.array([8.0, 7.5, 7.0]) * s)
            pv_tubes.append(_Tube(p, r, vessel(), p_pv, 2.0 * s))
        # central airways
        p_tr = self.part("airway", "trachea")
        carina = S([2, 12, 26]) + j() * 0.5
        trachea_pts = np.array([S([0, 0, 220]), S([0, 2, 150]), S([1, 6, 90]), S([2, 9, 50]), carina])
        trachea = _Tube(
            *_polyline(trachea_pts, np.array([11, 11, 11, 11, 10]) * s, 4),
            [_Layer(0.0, 30.0, LUNG_OR_BG, False), _Layer(-2.2 * s, AIR_HU, AIRWAY)],
            p_tr,
            2.0 * s,
        )
        p_rmb = self.part("airway", "right main bronchus")
        rmb_end = S([-26, 18, 10]) + j() * 0.5
        bi_end = S([-38, 26, -18]) + j() * 0.5
        rmb = _Tube(
            *_polyline(np.array([carina, S([-12, 14, 20]), rmb_end, bi_end]), np.array([8.5, 8.2, 7.2, 6.2]) * s, 4),
            [_Layer(0.0, 30.0, LUNG_OR_BG, False), _Layer(-1.8 * s, AIR_HU, AIRWAY)],
            p_rmb,
            2.0 * s,
        )
        p_lmb = self.part("airway", "left main bronchus")
        lmb_end = S([42, 22, 4]) + j() * 0.5
        lmb = _Tube(
            *_polyline(
                np.array([carina, S([18, 16, 18]), S([32, 19, 10]), lmb_end]), np.array([8.2, 7.8, 7.4, 7.0]) * s, 4
            ),
            [_Layer(0.0, 30.0, LUNG_OR_BG, False), _Layer(-1.8 * s, AIR_HU, AIRWAY)],
            p_lmb,
            2.0 * s,
        )

        for t in (aorta, pa_main, rpa, lpa, svc, ivc, *pv_tubes):
            t.outside_heart = True
        self.med_tubes = [
            esoph,
            aorta,
            pa_main,
            rpa,
            lpa,
            svc,
            ivc,
            azy,
            bca,
            lcca,
            lsa,
            lbcv,
            rbcv,
            *pv_tubes,
            trachea,
            rmb,
            lmb,
        ]
        self.central_airways = [trachea, rmb, lmb]

        # ---- lung trees (attraction points sampled inside the analytic lungs)
        p_vr = self.part("blood vessel", "pulmonary vessels of the right lung")
        p_vl = self.part("blood vessel", "pulmonary vessels of the left lung")
        p_br = self.part("airway", "bronchi of the right lung")
        p_bl = self.part("airway", "bronchi of the left lung")
        self.tree_segs: list[_Segs] = []
        self.airway_segs: list[_Segs] = []
        self.airway_tubes: list[_Tube] = []
        for side, part_v, part_b in ((RIGHT_LUNG, p_vr, p_br), (LEFT_LUNG, p_vl, p_bl)):
            right = side == RIGHT_LUNG
            n_art, n_vein, n_air = (1100, 950, 50) if right else (950, 820, 44)
            art = self.sample_lung(side, n_art, 4.0 * s)
            vein = self.sample_lung(side, n_vein, 4.0 * s)
            air = self.sample_lung(side, n_air, 14.0 * s)
            lobes_a = A.lobe(side, *art.T)
            lobes_v = A.lobe(side, *vein.T)
            lobes_b = A.lobe(side, *air.T)
            names = sorted(set(lobes_a.tolist()))
            root_a = rpa_end if right else lpa_end
            segs = _grow_tree(rng, [(root_a, art[lobes_a == n]) for n in names], 6.5 * s, len(art), 0.34, 0.45)
            sd = "R" if right else "L"
            upper_v = np.isin(lobes_v, ["right upper lobe", "right middle lobe", "left upper lobe"])
            segs += _grow_tree(
                rng,
                [(pv_ends[(sd, "sup")], vein[upper_v]), (pv_ends[(sd, "inf")], vein[~upper_v])],
                6.5 * s,
                len(vein),
                0.34,
                0.45,
            )
            self.tree_segs.append(
                self.branch_segs(segs, part_v, [_Layer(0.0, blood, VESSEL)], lambda r: [np.zeros_like(r)])
            )
            if right:
                bases = [rmb_end, 0.5 * (rmb_end + bi_end), None]
                roots_b = [
                    (rmb_end + S([-10, 0, 6]), air[lobes_b == "right upper lobe"]),
                    (0.5 * (rmb_end + bi_end) + S([-4, -8, 0]), air[lobes_b == "right middle lobe"]),
                    (bi_end, air[lobes_b == "right lower lobe"]),
                ]
            else:
                bases = [lmb_end, lmb_end]
                roots_b = [
                    (lmb_end + S([6, -6, 8]), air[lobes_b == "left upper lobe"]),
                    (lmb_end + S([6, 6, -8]), air[lobes_b == "left lower lobe"]),
                ]
            bsegs = _grow_tree(rng, roots_b, 5.2 * s, len(air), 0.36, 0.9, frac=(0.3, 0.5))
            self.airway_segs.append(
                self.branch_segs(
                    bsegs,
                    part_b,
                    [_Layer(0.0, 30.0, LUNG_OR_BG, False), _Layer(0.0, AIR_HU, AIRWAY)],
                    lambda r: [0.22 * r + 0.35, np.zeros_like(r)],
                )
            )
            # lobar bronchi from the main bronchi to the tree roots
            for (start, _), base in zip(roots_b, bases):
                if base is None:
                    continue
                self.airway_tubes.append(
                    _Tube(
                        np.array([base, start]),
                        np.array([5.0, 4.6]) * s,
                        [_Layer(1.4 * s, 30.0, LUNG_OR_BG, False), _Layer(0.0, AIR_HU, AIRWAY)],
                        part_b,
                        None,
                    )
                )

        # ---- spine posterior elements, ribs, cartilage, clavicles
        self.bone_tubes: list[_Tube] = []
        self.vert_tubes: list[_Tube] = []
        self.rib_tubes: list[_Tube] = []
        self.cart_tubes: list[_Tube] = []
        self.clav_tubes: list[_Tube] = []
        self.vert_part = {}
        for name, wc, hgt, disc, pitch in A.vertebrae:
            pid = self.part("bone", A.full_name(name), level=name)
            self.vert_part[name] = pid
            a, b = A.vert_size(name)
            vs = float(A.spine_v(np.array(wc)))
            canal_v = vs + b + 8.5 * s
            rc = 12.5 * s
            th = np.linspace(-2.3, 2.3, 11)
            ring = np.stack([rc * np.sin(th), canal_v + rc * np.cos(th), np.full_like(th, wc + 0.18 * hgt)], 1)
            ring[:, 2] -= 0.12 * hgt * np.cos(th)  # laminae slope down posteriorly
            layers = self.bone_layers(700.0, 240.0, 1.4 * s)
            self.vert_tubes.append(_Tube(ring, np.full(len(ring), 4.6 * s), layers, pid, 2.0 * s))
            ring2 = ring.copy()  # laminae / facets of the lower half of the level
            ring2[:, 2] -= 0.42 * hgt
            ring2[:, :2] = ring2[:, :2] * [1.05, 1.0] + [0, 1.5 * s]
            self.vert_tubes.append(_Tube(ring2[2:-2], np.full(len(ring2) - 4, 4.2 * s), layers, pid, 2.0 * s))
            sp_len = {"C": 20, "T": 40, "L": 30}[name[0]] * s
            sp_drop = 0.75 * pitch if name[0] == "T" else 0.2 * pitch
            self.vert_tubes.append(
                _Tube(
                    np.array([[0, canal_v + rc, wc + 0.06 * hgt], [0, canal_v + rc + sp_len, wc - sp_drop]]),
                    np.array([4.6, 3.6]) * s,
                    layers,
                    pid,
                    2.0 * s,
                )
            )
            tp = 27.0 * s if name[0] == "T" else 34 * s
            for sg in (-1, 1):
                self.vert_tubes.append(
                    _Tube(
                        np.array(
                            [[sg * 10 * s, canal_v, wc + 0.2 * hgt], [sg * tp, canal_v + 12 * s, wc + 0.25 * hgt]]
                        ),
                        np.array([4.8, 4.2]) * s,
                        layers,
                        pid,
                        2.0 * s,
                    )
                )
        # ribs
        drops = [34, 52, 62, 68, 72, 74, 76, 76, 70, 62, 46, 36]
        phi_end = [158, 160, 160, 160, 158, 156, 152, 146, 138, 128, 108, 88]
        sternal_w = [80, 56, 36, 18, 0, -20, -36]
        self.st_top, self.st_man, self.st_bot, self.st_xi = 84 * s, 56 * s, -46 * s, -70 * s
        vt = {n: (wc, hgt) for n, wc, hgt, _, _ in A.vertebrae}
        cart_layers = [_Layer(0.0, 120.0, BACKGROUND, False)]
        for n in range(1, 13):
            wc, hgt = vt[f"T{n}"]
            w0 = wc + 0.45 * hgt
            vs = float(A.spine_v(np.array(w0)))
            a, b = A.vert_size(f"T{n}")
            r_rib = (4.8 if n == 1 else 3.8 if n >= 11 else 4.3) * s
            off = r_rib + 2.5 * s
            for side, sg in ((RIGHT_LUNG, -1), (LEFT_LUNG, 1)):
                pid = self.part(
                    "bone", f"{'right' if side == RIGHT_LUNG else 'left'} {_ORDINAL.get(n, f'{n}th')} rib", rib=n
                )
                drop = drops[n - 1] * s + rng.normal(0, 2)
                phi = np.radians(np.linspace(-22, phi_end[n - 1], 26))
                t = (phi - phi[0]) / (phi[-1] - phi[0])
                ww = w0 - 6 * s - drop * t**1.35
                pts = A.cage_point(side, ww, phi, off)
                head = np.array([[sg * (a + 2 * s), vs + 2 * s, w0], [sg * 30 * s, vs + 30 * s, w0 - 3 * s]])
                pts = np.vstack([head, pts])
                rad = np.full(len(pts), r_rib)
                p, r = _polyline(pts, rad, 3)
                self.rib_tubes.append(_Tube(p, r, self.bone_layers(620.0, 190.0, 1.2 * s), pid, 1.5 * s))
                end = pts[-1]
                if n <= 7:  # costal cartilage to the sternum
                    ws = sternal_w[n - 1] * s
                    st = np.array([sg * (self.st_half_width(ws) + 1 * s), float(A.sternum_v(np.array(ws))), ws])
                    mid = 0.5 * (end + st) + np.array([0, -6 * s, 0])
                    p, r = _polyline(np.array([end, mid, st]), np.full(3, r_rib * 1.05), 4)
                    self.cart_tubes.append(_Tube(p, r, cart_layers, 0, 1.5 * s))
                elif n <= 10:
                    tgt = np.array(
                        [
                            sg * (30 + 12 * (n - 8)) * s,
                            float(A.sternum_v(np.array(-50 * s))) + 8 * s,
                            -52 * s - 14 * (n - 7) * s,
                        ]
                    )
                    p, r = _polyline(
                        np.array([end, 0.5 * (end + tgt) + np.array([0, -4 * s, 0]), tgt]), np.full(3, r_rib), 4
                    )
                    self.cart_tubes.append(_Tube(p, r, cart_layers, 0, 1.5 * s))
        # clavicles
        for side, sg in ((RIGHT_LUNG, -1), (LEFT_LUNG, 1)):
            pid = self.part("bone", f"{'right' if side == RIGHT_LUNG else 'left'} clavicle")
            pts = np.array([[sg * 24, 0, 90], [sg * 60, 4, 96], [sg * 100, 16, 104], [sg * 135, 32, 112]]) * A.sc
            pts[:, 1] += float(A.sternum_v(np.array(90.0 * s))) - 4 * s
            p, r = _polyline(pts, np.array([8, 7, 6.5, 7]) * s, 4)
            self.clav_tubes.append(_Tube(p, r, self.bone_layers(650.0, 200.0, 1.8 * s), pid, 1.5 * s))

        self.bone_tubes = self.vert_tubes + self.rib_tubes + self.cart_tubes + self.clav_tubes
        for t in self.bone_tubes:
            t.inside_body = True

        # ---- nodules
        self.nodule_groups: list[list[_Tube]] = []
        rng = self.rng_find
        for n in range(A.n_nodules):
            d = float(4 + 21 * rng.beta(1.3, 2.6))
            side = RIGHT_LUNG if rng.random() < 0.55 else LEFT_LUNG
            c = self.sample_lung(side, 1, d / 2 + 3.0 * s, avoid_hilum=True, rng=rng)[0]
            lobe = str(A.lobe(side, *c))
            pid = self.part("lung", f"{lobe} nodule", nodule=n)
            hu = float(rng.uniform(5, 50))
            spheres = [(c, d / 2)]
            for _ in range(int(rng.integers(2, 5))):
                dirn = _unit(rng.normal(size=3))
                spheres.append((c + dirn * d * 0.22, d / 2 * rng.uniform(0.55, 0.75)))
            self.nodule_groups.append(
                [
                    _Tube(np.array([cc, cc]), np.array([rr, rr]), [_Layer(0.0, hu, LUNG)], pid, None, True)
                    for cc, rr in spheres
                ]
            )
            self.nodules.append(
                dict(
                    part=pid,
                    side="right" if side == RIGHT_LUNG else "left",
                    lobe=lobe,
                    diameter_mm=round(d, 1),
                    hu=round(hu, 1),
                    center_anat_mm=[round(float(x), 1) for x in c],
                )
            )

    def st_half_width(self, w):
        s = self.A.s
        return float(
            np.interp(
                w,
                [self.st_xi, self.st_bot, self.st_man - 1e-3, self.st_man, self.st_top],
                [5 * s, 13 * s, 14 * s, 22 * s, 25 * s],
            )
        )

    def bone_layers(self, cortex, marrow, thick):
        return [_Layer(0.0, cortex, BONE), _Layer(-thick, marrow, BONE)]

    def branch_segs(self, segs, part, layers, dr_fn) -> _Segs:
        """Tree branches (p0, p1, r0, r1, depth) -> two gently bent capsules each."""
        p0 = np.array([x[0] for x in segs], np.float64)
        p1 = np.array([x[1] for x in segs], np.float64)
        r0 = np.array([x[2] for x in segs], np.float64)
        r1 = np.array([x[3] for x in segs], np.float64)
        depth = np.array([x[4] for x in segs])
        d = p1 - p0
        length = np.linalg.norm(d, axis=1)
        perp = np.cross(d / np.maximum(length, 1e-9)[:, None], self.rng.normal(size=(len(segs), 3)))
        perp /= np.maximum(np.linalg.norm(perp, axis=1), 1e-9)[:, None]
        mid = 0.5 * (p0 + p1) + perp * (self.rng.normal(0, 0.07, len(segs)) * length)[:, None]
        rm = 0.5 * (r0 + r1)
        a, b = np.vstack([p0, mid]), np.vstack([mid, p1])
        ra, rb = np.concatenate([r0, rm]), np.concatenate([rm, r1])
        lung_only = np.concatenate([depth > 0, depth > 0])
        n = len(a)
        false = np.zeros(n, bool)
        return _Segs(
            a,
            b,
            ra,
            rb,
            dr_fn(np.maximum(ra, rb)),
            [lay.hu for lay in layers],
            [lay.label for lay in layers],
            [lay.set_part for lay in layers],
            np.full(n, part),
            np.full(n, np.nan),
            lung_only,
            false,
            false.copy(),
        )

    def sample_lung(self, side, n, margin, avoid_hilum=False, rng=None):
        """n points inside one analytic lung, at least ``margin`` mm from its surface and from
        the carved mediastinal tubes (rejection sampling in millimetres: resolution independent)."""
        A, s = self.A, self.A.s
        sg = -1.0 if side == RIGHT_LUNG else 1.0
        rng = self.rng if rng is None else rng
        out = []
        offs = np.array(
            [
                [0, 0, 0],
                [1, 0, 0],
                [-1, 0, 0],
                [0, 1, 0],
                [0, -1, 0],
                [0, 0, 1],
                [0, 0, -1],
                [0.7, 0.7, 0],
                [-0.7, 0.7, 0],
                [0.7, -0.7, 0],
                [-0.7, -0.7, 0],
            ],
            np.float64,
        )
        tries = 0
        while sum(len(o) for o in out) < n:
            tries += 1
            if tries > 200:
                raise RuntimeError("could not sample points inside the lung")
            m = max(4 * n, 2000)
            p = np.stack(
                [
                    sg * rng.uniform(0, 140 * s * A.sl, m),
                    rng.uniform(-100 * s, 110 * s, m),
                    rng.uniform(A.w_min, 125 * s, m),
                ],
                1,
            )
            ok = np.ones(m, bool)
            for o in offs:
                q = p + o * margin
                ok &= A.lung_side(q[:, 0], q[:, 1], q[:, 2]) == side
            p = p[ok]
            if len(p) == 0:
                continue
            ok = np.ones(len(p), bool)
            for t in self.med_tubes:
                rmax = t.radii + max(lay.dr for lay in t.layers) + (t.carve or 0) + margin
                for a, b, ra_, rb_ in zip(t.pts[:-1], t.pts[1:], rmax[:-1], rmax[1:]):
                    d, tt = _seg_dist(p, a, b)
                    ok &= d > ra_ + tt * (rb_ - ra_)
            if avoid_hilum:
                hil = np.array([(-45 if side == RIGHT_LUNG else 48) * s, 10 * s, 10 * s])
                ok &= np.linalg.norm(p - hil, axis=1) > 30 * s
                ok &= A.heart_q(p[:, 0], p[:, 1], p[:, 2], margin=margin + 8 * s) > 1
            out.append(p[ok])
        return np.concatenate(out)[:n]

    # ------------------------------------------------------------------ slab pass
    def render_slabs(self):
        A = self.A
        ni, nj, nk = self.shape
        shp = (nk, nj, ni)
        self.hu = np.empty(shp, F32)
        self.lab = np.zeros(shp, np.uint8)
        self.lun = np.zeros(shp, np.uint8)
        self.prt = np.zeros(shp, np.uint8)
        self.p_heart = self.part("heart", "heart")
        self.p_sternum = self.part("bone", "sternum")
        self.p_scap = {RIGHT_LUNG: self.part("bone", "right scapula"), LEFT_LUNG: self.part("bone", "left scapula")}
        self.p_emph = self.part("lung", "emphysema") if A.emphysema else 0
        rng = self.rng
        lung_lo, lung_hi = A.S([-140, -105, -135]), A.S([140, 112, 130])
        self.f_large = _CoarseField(rng, lung_lo - 10, lung_hi + 10, 5.0, 14.0)
        self.f_abd = _CoarseField(rng, A.S([-170, -140, -280]), A.S([170, 150, -20]), 4.0, 7.0)
        if A.emphysema:
            self.f_emph = _CoarseField(self.rng_find, lung_lo, lung_hi, 1.4, 2.4)
            self.f_clust = _CoarseField(self.rng_find, lung_lo, lung_hi, 4.0, 12.0)
            # threshold so that the expected emphysema fraction matches the target
            z = np.linspace(0, 1, 201)
            lo, hi = -3.0, 6.0
            for _ in range(60):
                t0 = 0.5 * (lo + hi)
                frac = float(np.mean(ndtr(-(t0 + 1.6 * (1 - z)))))
                lo, hi = (t0, hi) if frac > A.emph_target else (lo, t0)
            self.emph_t0 = 0.5 * (lo + hi)
        sig_tex = tuple(min(1.0 / sp, 3.0) for sp in (self.spacing[2], self.spacing[1], self.spacing[0]))
        chunk = max(1, min(16, int(4e6 // (ni * nj)) or 1))
        u = self.u[None, None, :]
        v = self.v[None, :, None]
        for k0 in range(0, nk, chunk):
            k1 = min(nk, k0 + chunk)
            w = self.w[k0:k1][:, None, None]
            tex = _filtered_noise(self.seed, 1, shp, k0, k1, sig_tex)
            self.slab(k0, k1, u, v, w, tex)

    def slab(self, k0, k1, u, v, w, tex):
        A, s = self.A, self.A.s
        hu = self.hu[k0:k1]
        lab = self.lab[k0:k1]
        lun = self.lun[k0:k1]
        prt = self.prt[k0:k1]
        hu.fill(AIR_HU)
        cu, ra, rb, cv = A.prof(w)
        nl, na, npo = A.neck(w)
        # ---- table (carbon cradle: two thin bright skins around a foam core)
        if self.table:
            t0 = F32(125 * s + A.fat[2])
            vt = t0 - F32(0.0011 / s) * u * u
            dtab = (v - vt) * F32(1.0 / self.spacing[1])
            hv = F32(1.5 / self.spacing[1])

            def frac(lo, hi):  # fraction of each voxel (along v) inside [lo, hi] (in voxels)
                return np.clip(np.minimum(dtab + 0.5, hi) - np.maximum(dtab - 0.5, lo), 0, 1)

            t2 = F32(2.0 / self.spacing[1])
            t16 = F32(16.0 / self.spacing[1])
            skin = frac(t2, t2 + hv) + frac(t16 - hv, t16)
            core = frac(t2 + hv, t16 - hv)
            wide = np.abs(u) < 230
            hu[...] = np.where(wide, AIR_HU + skin * (250.0 - AIR_HU) + core * (-850.0 - AIR_HU), hu)
        # ---- body, skin, muscle
        x0 = cu + ra * F32(A.right_wider) + 3 * s
        ant0 = -(cv - rb) + 3 * s
        post0 = cv + rb + 3 * s
        xm, am, pm = (
            (x0 + 13 * s) * nl,
            (ant0 + (12 + 8 * np.clip((w / s - 20) / 60, 0, 1)) * s) * na,
            (post0 + 26 * s) * npo,
        )
        xb, ab_, pb = xm + A.fat[0], am + A.fat[1], pm + A.fat[2]

        def se(xh, a, p, shrink=0.0):
            x = u / (xh - shrink)
            y = np.where(v < 0, v / (a - shrink), v / (p - shrink))
            y2 = y * y
            return x * x + np.where(v < 0, y2, y2 * np.abs(y))

        body = se(xb, ab_, pb) <= 1
        inner = se(xb, ab_, pb, 2.0) <= 1
        hu[body] = 25.0  # skin
        fat = inner
        hu[fat] = FAT_HU + 8 * tex[fat]
        xx, yy = u / xm, np.where(v < 0, v / am, v / pm)
        muscle = (xx * xx + np.where(v < 0, yy * yy, np.abs(yy) ** 3) <= 1) & inner
        vs = A.spine_v(w)
        para = ((np.abs(u) - 32 * s) / (27 * s)) ** 2 + ((v - vs - 50 * s) / (26 * s)) ** 2 <= 1
        muscle |= para & inner
        hu[muscle] = MUSCLE_HU + 6 * tex[muscle]
        # ---- thoracic cage interior (extrapleural / mediastinal fat by default); above the
        # apices only the mediastinal column remains, the rest of the neck is muscle
        gc = A.cage_cap(w)
        cage = np.zeros(hu.shape, bool)
        for side, sg in ((RIGHT_LUNG, -1.0), (LEFT_LUNG, 1.0)):
            g = A.cap(w, side)
            a = ra * g * F32(A.right_wider if side == RIGHT_LUNG else 1.0) + 3 * s
            b = rb * g + 3 * s
            du, dv = (u - sg * cu) / a, (v - cv) / b
            cage |= du * du + np.where(dv > 0, dv * dv * np.abs(dv), dv * dv) <= 1
        st_post = A.sternum_v(w) + 6 * s
        cage |= (
            (np.abs(u) < cu * 0.9 * np.clip((A.w_apex[RIGHT_LUNG] + 10 * s - w) / (40 * s), 0.3, 1))
            & (v > st_post)
            & (v < vs)
        )
        cage &= muscle | para
        hu[cage] = MED_FAT_HU + 6 * tex[cage]
        # ---- abdomen below the diaphragm
        atop = A.abdomen_top(u, v)
        abd = cage & (w < atop - 4 * s)
        diaph = cage & (w >= atop - 4 * s) & (w < atop)
        hu[diaph] = MUSCLE_HU
        if abd.any():
            mix = self.f_abd.sample(self.u, self.v, self.w[k0:k1])
            hu[abd] = np.where(mix > 0.1, F32(32.0), F32(FAT_HU))[abd] + 8 * tex[abd]
            wr, wl = A.dome_top[RIGHT_LUNG], A.dome_top[LEFT_LUNG]
            q_lr = (
                ((u + 30 * s) / (105 * s)) ** 2 + ((v - 5 * s) / (100 * s)) ** 2 + ((w - wr + 70 * s) / (105 * s)) ** 2
            )
            q_ll = ((u - 15 * s) / (60 * s)) ** 2 + ((v + 45 * s) / (42 * s)) ** 2 + ((w - wr + 35 * s) / (48 * s)) ** 2
            liver = abd & ((q_lr <= 1) | (q_ll <= 1))
            hu[liver] = A.liver_hu + 6 * tex[liver]
            q_sp = ((u - 80 * s) / (26 * s)) ** 2 + ((v - 48 * s) / (44 * s)) ** 2 + ((w - wl + 48 * s) / (52 * s)) ** 2
            spleen = abd & (q_sp <= 1)
            hu[spleen] = A.spleen_hu + 6 * tex[spleen]
            q_st = ((u - 56 * s) / (36 * s)) ** 2 + ((v + 18 * s) / (40 * s)) ** 2 + ((w - wl + 46 * s) / (46 * s)) ** 2
            stom = abd & (q_st <= 1) & ~spleen
            hu[stom & (q_st > 0.8)] = 45.0
            inner_st = stom & (q_st <= 0.8)
            hu[inner_st] = np.where(v < -30 * s, F32(AIR_HU), F32(12.0) + 5 * tex)[inner_st]
            for kc, kv, kw in ((-62, 58, -172), (62, 58, -162)):
                q_k = ((u - kc * s) / (30 * s)) ** 2 + ((v - kv * s) / (24 * s)) ** 2 + ((w - kw * s) / (52 * s)) ** 2
                kid = abd & (q_k <= 1) & ~liver
                hu[kid] = (160.0 if A.contrast else 35.0) + 5 * tex[kid]
        # ---- lungs
        side = A.lung_side(u, v, w, exclude=False)
        side[~cage] = 0
        self.apply_crop_exclusions(side, k0, k1, w)
        inl = side > 0
        if inl.any():
            grad = np.clip((v + 90 * s) / (190 * s), 0, 1)
            lhu = -872.0 + 58.0 * grad + 12.0 * tex
            jr = np.flatnonzero(inl.any(axis=(0, 2)))
            ir = np.flatnonzero(inl.any(axis=(0, 1)))
            j0, j1, i0, i1 = jr[0], jr[-1] + 1, ir[0], ir[-1] + 1
            big = np.zeros_like(hu)
            big[:, j0:j1, i0:i1] = self.f_large.sample(self.u[i0:i1], self.v[j0:j1], self.w[k0:k1])
            lhu = lhu + 9.0 * big
            # fissures (thin pleural sheets, partial volume)
            for sd in (RIGHT_LUNG, LEFT_LUNG):
                d = A.fissure_dist(sd, u, v, w)
                hh = 0.5 * (self.spacing[1] + self.spacing[2])
                t = 0.4
                alpha = np.clip((np.minimum(d + hh / 2, t / 2) - np.maximum(d - hh / 2, -t / 2)) / hh, 0, 1)
                lhu = np.where(side == sd, lhu + alpha * (-100.0 - lhu), lhu)
            hu[inl] = lhu[inl]
            lab[inl] = LUNG
            lun[inl] = side[inl]
            if A.emphysema:
                e = np.zeros_like(hu)
                sub = (slice(None), slice(j0, j1), slice(i0, i1))
                e[sub] = 0.75 * self.f_emph.sample(
                    self.u[i0:i1], self.v[j0:j1], self.w[k0:k1]
                ) + 0.66 * self.f_clust.sample(self.u[i0:i1], self.v[j0:j1], self.w[k0:k1])
                zone = np.clip((w - (-40 * s)) / (150 * s), 0, 1)
                em = inl & (e > self.emph_t0 + 1.6 * (1 - zone))
                hu[em] = (-988.0 + 6.0 * tex)[em]
                prt[em] = self.p_emph
        # ---- heart, spine, sternum, scapulae (on crops)
        self.slab_heart(k0, k1, w, tex)
        self.slab_spine(k0, k1, w, tex)
        self.slab_sternum(k0, k1, w, tex)
        self.slab_scapulae(k0, k1, w, cu, ra, rb, cv, gc)

    def crop(self, ulo, uhi, vlo, vhi):
        i0, i1 = self.irange(ulo, uhi, 0)
        j0, j1 = self.irange(vlo, vhi, 1)
        if i0 >= i1 or j0 >= j1:
            return None
        return (slice(None), slice(j0, j1), slice(i0, i1)), self.u[None, None, i0:i1], self.v[None, j0:j1, None]

    def heart_bbox(self, margin):
        A = self.A
        ext = np.sqrt(((A.heart_e * (A.heart_ax + margin)[:, None]) ** 2).sum(0))
        return A.heart_c - ext, A.heart_c + ext

    def apply_crop_exclusions(self, side, k0, k1, w):
        A, s = self.A, self.A.s
        lo, hi = self.heart_bbox(7 * s)
        c = self.crop(lo[0], hi[0], lo[1], hi[1])
        if c is not None:
            sl, uu, vv = c
            side[sl][A.heart_excl(uu, vv, w)] = 0
        c = self.crop(-60 * s, 60 * s, 20 * s, 140 * s)
        if c is not None:
            sl, uu, vv = c
            side[sl][A.spine_excl(uu, vv, w)] = 0

    def slab_heart(self, k0, k1, w, tex):
        A, s = self.A, self.A.s
        lo, hi = self.heart_bbox(6 * s)
        if w.max() < lo[2] or w.min() > hi[2]:
            return
        c = self.crop(lo[0], hi[0], lo[1], hi[1])
        if c is None:
            return
        sl, uu, vv = c
        hu, lab, prt = self.hu[k0:k1][sl], self.lab[k0:k1][sl], self.prt[k0:k1][sl]
        lun = self.lun[k0:k1][sl]
        q = A.heart_q(uu, vv, w)
        # pericardium: a thin soft-tissue line in the fat around the heart
        qp = np.sqrt(A.heart_q(uu, vv, w, margin=4.5 * s))
        peri = (np.abs(qp - 1) * 50 * s < 0.7) & (lun == 0) & (q > 1)
        hu[peri] = 20.0
        heart = q <= 1
        hu[heart] = A.myo_hu + 5 * tex[sl][heart]
        e, hs = A.heart_e, A.heart_scale
        cham = np.zeros(heart.shape, bool)
        hc = A.heart_c
        for off, ax in (
            ((14, 12, -2), (34, 17, 22)),  # left ventricle
            ((4, -17, -4), (36, 13, 26)),  # right ventricle
            ((-36, 14, 4), (20, 18, 24)),  # left atrium
            ((-24, -22, -10), (24, 17, 22)),
        ):  # right atrium
            cc = hc + (off[0] * e[0] + off[1] * e[1] + off[2] * e[2]) * s * hs
            cham |= A.heart_q(uu, vv, w, center=cc, axes=np.array(ax) * s * hs) <= 1
        cham &= A.heart_q(uu, vv, w, margin=-3 * s) <= 1
        hu[cham] = A.blood_hu + 5 * tex[sl][cham]
        lab[heart] = HEART
        prt[heart] = self.p_heart
        lun[heart] = 0

    def slab_spine(self, k0, k1, w, tex):
        A, s = self.A, self.A.s
        c = self.crop(-45 * s, 45 * s, 25 * s, 110 * s)
        if c is None:
            return
        sl, uu, vv = c
        hu, lab, prt, lun = self.hu[k0:k1][sl], self.lab[k0:k1][sl], self.prt[k0:k1][sl], self.lun[k0:k1][sl]
        tx = tex[sl]
        vs = A.spine_v(w)
        for kk in range(w.shape[0]):
            wk = float(w[kk, 0, 0])
            for name, wc, hgt, disc, pitch in A.vertebrae:
                if abs(wk - wc) > pitch / 2 + 1e-6:
                    continue
                a, b = A.vert_size(name)
                vsk = float(vs[kk, 0, 0])
                canal_v = vsk + b + 8.5 * s
                canal = (uu[0] / (8 * s)) ** 2 + ((vv[0] - canal_v) / (8 * s)) ** 2 <= 1
                hu[kk][canal] = 32.0
                f = (uu[0] / a) ** 2 + ((vv[0] - vsk) / b) ** 2
                dz = abs(wk - wc)
                if dz <= hgt / 2:
                    ins = f <= 1
                    cort = ins & ((f > (1 - 1.6 * s / a) ** 2) | (dz > hgt / 2 - 1.6 * s))
                    hu[kk][ins] = 230.0 + 25 * tx[kk][ins]
                    hu[kk][cort] = 820.0
                    lab[kk][ins] = BONE
                    prt[kk][ins] = self.vert_part[name]
                    lun[kk][ins] = 0
                else:
                    dsc = f <= 0.95
                    hu[kk][dsc] = 85.0
                    lab[kk][dsc] = BACKGROUND
                    lun[kk][dsc] = 0
                break

    def slab_sternum(self, k0, k1, w, tex):
        A, s = self.A, self.A.s
        c = self.crop(-30 * s, 30 * s, -140 * s, -40 * s)
        if c is None:
            return
        sl, uu, vv = c
        hu, lab, prt, lun = self.hu[k0:k1][sl], self.lab[k0:k1][sl], self.prt[k0:k1][sl], self.lun[k0:k1][sl]
        for kk in range(w.shape[0]):
            wk = float(w[kk, 0, 0])
            if not (self.st_xi <= wk <= self.st_top):
                continue
            a = self.st_half_width(wk)
            b = (7.5 if wk > self.st_man else 6.0 if wk > self.st_bot else 3.5) * s
            vc = float(A.sternum_v(np.array(wk)))
            f = (uu[0] / a) ** 2 + ((vv[0] - vc) / b) ** 2
            ins = f <= 1
            cort = ins & (f > (1 - 1.5 * s / b) ** 2)
            hu[kk][ins] = 180.0 + 20 * tex[sl][kk][ins]
            hu[kk][cort] = 650.0
            lab[kk][ins] = BONE
            prt[kk][ins] = self.p_sternum
            lun[kk][ins] = 0

    def slab_scapulae(self, k0, k1, w, cu, ra, rb, cv, gc):
        A, s = self.A, self.A.s
        w_top, w_bot = 104 * s, -20 * s
        if w.max() < w_bot or w.min() > w_top:
            return
        for side, sg in ((RIGHT_LUNG, -1.0), (LEFT_LUNG, 1.0)):
            c = self.crop(min(sg * 40, sg * 175) * s, max(sg * 40, sg * 175) * s, -40 * s, 150 * s)
            if c is None:
                continue
            sl, uu, vv = c
            hu, lab, prt, lun = self.hu[k0:k1][sl], self.lab[k0:k1][sl], self.prt[k0:k1][sl], self.lun[k0:k1][sl]
            off = 15.0 * s
            a = ra * gc * F32(A.right_wider if side == RIGHT_LUNG else 1.0) + 3 * s + off
            b = rb * gc + 3 * s + off
            du, dv = (uu - sg * cu) / a, (vv - cv) / b
            f = np.sqrt(du * du + np.where(dv > 0, dv * dv * np.abs(dv), dv * dv))
            phi = np.degrees(np.arctan2(sg * (uu - sg * cu), vv - cv))
            t = np.clip((w - w_bot) / (w_top - w_bot), 0, 1)
            phi_lat = 22 + 62 * t
            phi_med = 4 + 6 * t
            thick = (2.2 + 2.5 * (t > 0.82)) * s
            plate = (
                (np.abs(f - 1) * 0.5 * (a + b) < thick) & (phi > phi_med) & (phi < phi_lat) & (w > w_bot) & (w < w_top)
            )
            plate &= lun == 0
            hu[plate] = 520.0
            lab[plate] = BONE
            prt[plate] = self.p_scap[side]

    # ------------------------------------------------------------------ tube pass
    def _pairs(self, a, b, reach, max_pairs: int = 1_500_000):
        """Enumerate (segment, voxel) pairs of the voxels inside each segment's bounding box,
        in chunks.  Yields (segment ids, pair->segment, flat voxel index, i, j, k)."""
        ni, nj, nk = self.shape
        lo = np.minimum(a, b) - reach[:, None]
        hi = np.maximum(a, b) + reach[:, None]
        rng_ = []
        for ax, n in ((0, ni), (1, nj), (2, nk)):
            c0, st = float((self.u, self.v, self.w)[ax][0]), self.spacing[ax]
            i0 = np.clip(np.floor((lo[:, ax] - c0) / st).astype(np.int64), 0, n)
            i1 = np.clip(np.ceil((hi[:, ax] - c0) / st).astype(np.int64) + 1, 0, n)
            rng_.append((i0, np.maximum(i1 - i0, 0)))
        (i0, ci), (j0, cj), (k0, ck) = rng_
        cnt = ci * cj * ck
        order = np.flatnonzero(cnt > 0)
        if len(order) == 0:
            return
        cum = np.cumsum(cnt[order])
        start = 0
        while start < len(order):
            base = cum[start - 1] if start > 0 else 0
            end = max(int(np.searchsorted(cum, base + max_pairs, side="right")), start + 1)
            ids = order[start:end]
            c = cnt[ids]
            seg = np.repeat(np.arange(len(ids)), c)
            loc = np.arange(int(c.sum()), dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
            n_i, n_j = ci[ids][seg], cj[ids][seg]
            ii = loc % n_i
            rest = loc // n_i
            jj = rest % n_j
            kk = rest // n_j
            ii += i0[ids][seg]
            jj += j0[ids][seg]
            kk += k0[ids][seg]
            yield ids, seg, (kk * nj + jj) * ni + ii, ii, jj, kk
            start = end

    def _geometry(self, sg: _Segs, ids, seg, ii, jj, kk):
        a = sg.a[ids].astype(F32)[seg]
        ab = (sg.b[ids] - sg.a[ids]).astype(F32)[seg]
        du = self.u[ii] - a[:, 0]
        dv = self.v[jj] - a[:, 1]
        dw = self.w[kk] - a[:, 2]
        l2 = (ab * ab).sum(1)
        t = np.clip((du * ab[:, 0] + dv * ab[:, 1] + dw * ab[:, 2]) / np.maximum(l2, F32(1e-9)), 0, 1)
        t[l2 < 1e-9] = 0
        du -= t * ab[:, 0]
        dv -= t * ab[:, 1]
        dw -= t * ab[:, 2]
        d = np.sqrt(du * du + dv * dv + dw * dw)
        ra = sg.ra[ids].astype(F32)[seg]
        r = ra + t * (sg.rb[ids].astype(F32)[seg] - ra)
        return d, r

    def carve_segs(self, sg: _Segs):
        """Remove the lungs around extrapulmonary tubes (radius + outer layer + carve margin)."""
        keep = np.isfinite(sg.carve)
        if not keep.any():
            return
        outer = np.max(np.stack(sg.dr), axis=0)
        extra = np.where(keep, outer + np.nan_to_num(sg.carve), 0.0)
        reach = np.maximum(sg.ra, sg.rb) + extra + 1e-3
        lun, lab, prt, hu = self.lun.reshape(-1), self.lab.reshape(-1), self.prt.reshape(-1), self.hu.reshape(-1)
        sub = np.flatnonzero(keep)
        sg2 = _Segs(
            sg.a[sub],
            sg.b[sub],
            sg.ra[sub] + extra[sub],
            sg.rb[sub] + extra[sub],
            [],
            [],
            [],
            [],
            sg.part[sub],
            sg.carve[sub],
            sg.lung_only[sub],
            sg.outside_heart[sub],
            sg.inside_body[sub],
        )
        for ids, seg, flat, ii, jj, kk in self._pairs(sg2.a, sg2.b, reach[sub]):
            d, r = self._geometry(sg2, ids, seg, ii, jj, kk)
            m = (d <= r) & (lun[flat] > 0)
            f = flat[m]
            lun[f] = 0
            lab[f] = BACKGROUND
            prt[f] = 0
            hu[f] = MED_FAT_HU

    def draw_segs(self, sg: _Segs):
        """Draw a batch layer by layer.  Within a layer, a voxel takes the largest partial-volume
        weight of all capsules (no double counting where capsules meet)."""
        if len(sg) == 0:
            return
        lun, lab, prt, hu = self.lun.reshape(-1), self.lab.reshape(-1), self.prt.reshape(-1), self.hu.reshape(-1)
        buf = self._alpha_buf
        h = F32(self.h)
        for li in range(len(sg.dr)):
            dr = sg.dr[li]
            reach = np.maximum(sg.ra, sg.rb) + np.maximum(dr, 0) + 0.5 * self.h + 1e-3
            touched = []
            labelled = []
            rmean = 0.5 * (sg.ra + sg.rb) + dr
            thin = (np.clip(2 * rmean / self.h, 0, 1) ** 0.5).astype(F32)
            for ids, seg, flat, ii, jj, kk in self._pairs(sg.a, sg.b, reach):
                d, r = self._geometry(sg, ids, seg, ii, jj, kk)
                r += dr[ids].astype(F32)[seg]
                alpha = np.clip((r - d) / h + F32(0.5), 0, 1) * thin[ids][seg]
                inl = lun[flat] > 0
                ok = np.ones(len(flat), bool)
                lo_ = sg.lung_only[ids][seg]
                if lo_.any():
                    ok &= ~lo_ | inl
                oh = sg.outside_heart[ids][seg]
                if oh.any():
                    ok &= ~oh | (lab[flat] != HEART)
                ib = sg.inside_body[ids][seg]
                if ib.any():
                    ok &= ~ib | (hu[flat] > -500) | inl
                alpha *= ok
                sel = alpha > 0
                f = flat[sel]
                np.maximum.at(buf, f, alpha[sel])
                touched.append(f)
                m = sel & (d <= r)
                labelled.append((flat[m], sg.part[ids][seg][m]))
            if not touched:
                continue
            f = np.concatenate(touched)
            val = F32(sg.hu[li])
            old = hu[f]
            hu[f] = old + buf[f] * (val - old)
            buf[f] = 0
            fl = np.concatenate([x[0] for x in labelled])
            pl = np.concatenate([x[1] for x in labelled])
            label = sg.label[li]
            if label is not None:
                lab[fl] = np.where(lun[fl] > 0, LUNG, BACKGROUND) if label == LUNG_OR_BG else label
            if sg.set_part[li]:
                nz = pl > 0
                prt[fl[nz]] = pl[nz]
            elif label is not None:
                prt[fl] = 0  # e.g. an airway wall or cartilage over a vessel or rib: that voxel leaves the part

    def render_tubes(self):
        self._alpha_buf = np.zeros(int(np.prod(self.shape)), F32)
        med_vessels = [t for t in self.med_tubes if t not in self.central_airways and len(t.layers) == 1]
        esoph = [t for t in self.med_tubes if t not in self.central_airways and len(t.layers) == 2]
        airways = [_segs_from_tubes(self.central_airways + self.airway_tubes)] + self.airway_segs
        groups = [_segs_from_tubes(esoph), _segs_from_tubes(med_vessels), _cat_segs(self.tree_segs), _cat_segs(airways)]
        groups += [
            _segs_from_tubes(g) for g in (self.vert_tubes, self.rib_tubes, self.cart_tubes, self.clav_tubes) if g
        ]
        groups += [_segs_from_tubes(g) for g in self.nodule_groups]
        for g in groups:
            self.carve_segs(g)
        for g in groups:
            self.draw_segs(g)
        del self._alpha_buf

    # ------------------------------------------------------------------ image formation
    def finish(self):
        ni, nj, nk = self.shape
        sx, sy, sz = self.spacing
        shp = (nk, nj, ni)
        # emphysema statistics before noise (ground truth)
        n_lung = int(np.count_nonzero(self.lun))
        self.emph_voxels = int(np.count_nonzero(self.prt == self.p_emph)) if self.p_emph else 0
        self.emph_frac = self.emph_voxels / max(n_lung, 1)
        if self.blur_mm > 0:
            _blur_inplace(self.hu, (self.blur_mm / sz, self.blur_mm / sy, self.blur_mm / sx))
        if self.noise_hu > 0:
            sig = (0.3, 0.7, 0.7)
            chunk = max(1, min(16, int(4e6 // (ni * nj)) or 1))
            for k0 in range(0, nk, chunk):
                k1 = min(nk, k0 + chunk)
                n = _filtered_noise(self.seed, 2, shp, k0, k1, sig)
                n *= F32(self.noise_hu)
                self.hu[k0:k1] += n
        if self.fov_circle:
            rad = min(ni * sx, nj * sy) / 2
            x = (np.arange(ni) - self.ci) * sx
            y = (np.arange(nj) - self.cj) * sy
            out = (x[None, :] ** 2 + y[:, None] ** 2) > rad * rad
            if out.any():
                self.hu[:, out] = PAD_HU
                self.lab[:, out] = 0
                self.lun[:, out] = 0
                self.prt[:, out] = 0

    def affine(self):
        ni, nj, nk = self.shape
        sx, sy, sz = self.spacing
        aff = np.diag([-sx, -sy, sz, 1.0])
        aff[:3, 3] = [sx * self.ci, sy * self.cj, -sz * self.ck]
        return aff

    # ------------------------------------------------------------------ captions & report
    def captions(self):
        caps = []
        objs = ndimage.find_objects(self.prt)
        lung_objs = ndimage.find_objects(self.lun)
        entries = []
        for side, text in ((RIGHT_LUNG, "right lung"), (LEFT_LUNG, "left lung")):
            if side <= len(lung_objs) and lung_objs[side - 1] is not None:
                entries.append(("lung", text, lung_objs[side - 1], self.lun, side, {}))
        for pid, info in self.parts.items():
            if pid <= len(objs) and objs[pid - 1] is not None:
                extra = {k: v for k, v in info.items() if k not in ("cls", "text")}
                entries.append((info["cls"], info["text"], objs[pid - 1], self.prt, pid, extra))
        for cls, text, obj, arr, val, extra in entries:
            ks, js, is_ = obj
            bbox = [[is_.start, js.start, ks.start], [is_.stop - 1, js.stop - 1, ks.stop - 1]]
            sub = arr[obj] == val
            present = np.flatnonzero(sub.any(axis=(1, 2))) + ks.start
            pick = present[np.unique(np.linspace(0, len(present) - 1, min(5, len(present))).round().astype(int))]
            boxes = {}
            for k in pick.tolist():
                m = sub[k - ks.start]
                jj = np.flatnonzero(m.any(axis=1)) + js.start
                ii = np.flatnonzero(m.any(axis=0)) + is_.start
                boxes[int(k)] = [int(ii[0]), int(jj[0]), int(ii[-1]), int(jj[-1])]
            cap = {
                "class": cls,
                "text": text,
                "bbox_ijk": bbox,
                "slices": [int(k) for k in pick],
                "boxes_2d": boxes,
                "voxels": int(sub.sum()),
            }
            cap.update(extra)
            caps.append(cap)
        return caps

    def report(self, caps):
        A = self.A
        sz = self.spacing[2]
        vml = float(np.prod(self.spacing)) / 1000
        vr = np.count_nonzero(self.lun == RIGHT_LUNG) * vml
        vl = np.count_nonzero(self.lun == LEFT_LUNG) * vml
        rep = [
            f"{'Contrast-enhanced' if A.contrast else 'Non-contrast'} CT of the chest, {sz:g} mm slices (synthetic phantom)."
        ]
        visible = {c.get("nodule"): c for c in caps if "nodule" in c}
        nods = [n for i, n in enumerate(self.nodules) if i in visible]
        if nods:
            for n in sorted(nods, key=lambda n: -n["diameter_mm"]):
                rep.append(f"{int(round(n['diameter_mm']))} mm solid pulmonary nodule in the {n['lobe']}.")
        else:
            rep.append("No pulmonary nodules.")
        if A.emphysema and self.emph_frac > 0.005:
            pct = 100 * self.emph_frac
            grade = "Mild" if pct < 10 else "Moderate" if pct < 20 else "Severe"
            rep.append(f"{grade} centrilobular emphysema, upper-lobe predominant ({pct:.0f}% of lung volume).")
        else:
            rep.append("No emphysema.")
        rep.append("The trachea and central airways are patent.")
        rep.append("The heart is enlarged (cardiomegaly)." if A.cardiomegaly else "The heart is normal in size.")
        rep.append("No pleural effusion. No pneumothorax.")
        rep.append(f"Lung volumes: right {vr:.0f} mL, left {vl:.0f} mL.")
        return rep, vr, vl


def generate_phantom(
    shape=(160, 160, 96),
    spacing=(2.0, 2.0, 2.5),
    seed: int = 0,
    nodules: int | None = None,
    emphysema: bool | None = None,
    noise_hu: float = 20.0,
    blur_mm: float = 1.0,
    fov_circle: bool = True,
    table: bool = True,
) -> Phantom:
    """Generate a synthetic chest CT (float32 HU) with labels, lung masks, report and captions.

    ``nodules`` / ``emphysema`` = None lets the seed decide.  The same arguments always give the
    same phantom; the anatomy (in millimetres) does not depend on ``shape`` and ``spacing``."""
    b = _Builder(shape, spacing, seed, nodules, emphysema, noise_hu, blur_mm, fov_circle, table)
    b.build_tubes()
    b.render_slabs()
    b.render_tubes()
    b.finish()
    caps = b.captions()
    report, vr, vl = b.report(caps)
    A = b.A
    aff = b.affine()

    def ijk(p_anat):
        p = np.asarray(p_anat) + b.shift
        return [float(p[0] / b.spacing[0] + b.ci), float(p[1] / b.spacing[1] + b.cj), float(p[2] / b.spacing[2] + b.ck)]

    nodules_meta = []
    for n in b.nodules:
        c_ijk = ijk(n["center_anat_mm"])
        world = (aff @ np.array([*c_ijk, 1.0]))[:3]
        nodules_meta.append(
            {
                **{k: v for k, v in n.items() if k != "part"},
                "center_ijk": [round(x, 1) for x in c_ijk],
                "center_ras_mm": [round(float(x), 1) for x in world],
                "visible": any(c.get("nodule") == len(nodules_meta) for c in caps),
            }
        )
    k_default = int(np.clip(round((-12 * A.s + b.shift[2]) / b.spacing[2] + b.ck), 0, b.shape[2] - 1))
    j_default = int(np.clip(round((8 * A.s + b.shift[1]) / b.spacing[1] + b.cj), 0, b.shape[1] - 1))
    meta = {
        "generator": "common.phantom",
        "seed": b.seed,
        "shape": list(b.shape),
        "spacing": list(b.spacing),
        "noise_hu": b.noise_hu,
        "blur_mm": b.blur_mm,
        "fov_circle": b.fov_circle,
        "table": b.table,
        "orientation": "RAS affine diag(-sx,-sy,sz): i -> patient left, j -> posterior, k -> superior",
        "scale": round(A.s, 4),
        "lateral_scale": round(A.sl, 4),
        "contrast": A.contrast,
        "blood_hu": round(A.blood_hu, 1),
        "cardiomegaly": A.cardiomegaly,
        "heart_scale": round(A.heart_scale, 3),
        "emphysema": A.emphysema and b.emph_frac > 0.005,
        "emphysema_fraction": round(b.emph_frac, 4),
        "nodules": nodules_meta,
        "lung_volume_ml": {"right": round(vr, 1), "left": round(vl, 1)},
        "default_slice_k": k_default,
        "default_coronal_j": j_default,
        "class_names": list(CLASS_NAMES),
        "labels": {"0": "background", **{str(v): n for v, n in _CLASS_OF_LABEL.items()}},
        "lungs": {"0": "background", str(RIGHT_LUNG): "right lung", str(LEFT_LUNG): "left lung"},
    }
    ct = CTVolume(
        hu=b.hu.T, affine=aff, meta={"source": f"phantom(seed={b.seed})", "modality": "CT", "synthetic": True}
    )
    return Phantom(ct=ct, labels=b.lab.T, lungs=b.lun.T, report=report, captions=caps, meta=meta)


# ----------------------------------------------------------------------------------- output


def phantom_paths(out_dir, case_id) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "ct": out_dir / f"{case_id}_ct.nii.gz",
        "label": out_dir / f"{case_id}_label.nii.gz",
        "lungs": out_dir / f"{case_id}_lungs.nii.gz",
        "report": out_dir / f"{case_id}_report.json",
    }


def write_phantom(phantom: Phantom, out_dir, case_id: str, overwrite: bool = False) -> dict[str, str]:
    """Write ``{case_id}_ct.nii.gz`` (int16 HU), ``_label.nii.gz``, ``_lungs.nii.gz`` (uint8, same
    affine) and ``_report.json``, each through a temporary name.  Existing complete outputs are
    kept unless ``overwrite``.  Returns the paths."""
    paths = phantom_paths(out_dir, case_id)
    if not overwrite and all(p.exists() for p in paths.values()):
        return {k: str(p) for k, p in paths.items()}
    phantom.ct.to_nifti(paths["ct"])
    for key, arr in (("label", phantom.labels), ("lungs", phantom.lungs)):
        save_nifti_array(arr, phantom.ct.affine, paths[key], np.uint8, xyz_units="mm", sform=False)
    write_json_atomic(
        paths["report"],
        {"case_id": case_id, "report": phantom.report, "captions": phantom.captions, "meta": phantom.meta},
    )
    return {k: str(p) for k, p in paths.items()}


_LABEL_COLOURS = {
    LUNG: (0.25, 0.55, 1.0, 0.35),
    HEART: (1.0, 0.2, 0.2, 0.55),
    VESSEL: (1.0, 0.35, 0.9, 0.75),
    AIRWAY: (0.1, 1.0, 0.4, 0.8),
    BONE: (1.0, 0.9, 0.2, 0.65),
}


def _window(img, width, level):
    lo = level - width / 2
    return np.clip((img - lo) / width, 0, 1)


def render_slice_png(
    phantom: Phantom, path, k: int | None = None, coronal: bool = False, j: int | None = None, dpi: int = 100
) -> Path:
    """Save a PNG: the axial slice ``k`` in lung window (W1500/L-600), mediastinal window
    (W400/L40) and with the label overlay; ``coronal`` adds the same for coronal row ``j``.
    Radiological display: patient right on the image left, anterior (or superior) up."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from PIL import Image

    hu, lab = phantom.ct.hu, phantom.labels
    sx, sy, sz = phantom.ct.spacing
    k = int(phantom.meta.get("default_slice_k", hu.shape[2] // 2) if k is None else k)
    j = int(phantom.meta.get("default_coronal_j", hu.shape[1] // 2) if j is None else j)
    views = [("axial", hu[:, :, k].T, lab[:, :, k].T, sy / sx, "upper", f"axial k={k}")]
    if coronal:
        views.append(("coronal", hu[:, j, :].T, lab[:, j, :].T, sz / sx, "lower", f"coronal j={j}"))
    cm = ListedColormap([(0, 0, 0, 0)] + [_LABEL_COLOURS[v] for v in (LUNG, HEART, VESSEL, AIRWAY, BONE)])
    fig_w = 3 * 4.2
    heights = [4.2 * img.shape[0] * asp / img.shape[1] for _, img, _, asp, _, _ in views]
    fig, axes = plt.subplots(
        len(views),
        3,
        figsize=(fig_w, sum(heights) + 0.5 * len(views)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    fig.patch.set_facecolor("black")
    for row, (name, img, lb, asp, origin, title) in enumerate(views):
        ax = axes[row]
        ax[0].imshow(
            _window(img, 1500, -600), cmap="gray", vmin=0, vmax=1, aspect=asp, origin=origin, interpolation="bilinear"
        )
        ax[1].imshow(
            _window(img, 400, 40), cmap="gray", vmin=0, vmax=1, aspect=asp, origin=origin, interpolation="bilinear"
        )
        ax[2].imshow(
            _window(img, 1500, -600), cmap="gray", vmin=0, vmax=1, aspect=asp, origin=origin, interpolation="bilinear"
        )
        ax[2].imshow(lb, cmap=cm, vmin=-0.5, vmax=5.5, aspect=asp, origin=origin, interpolation="nearest")
        for a, t in zip(ax, ("lung window W1500/L-600", "mediastinal window W400/L40", "labels")):
            a.set_title(f"{t} - {title}", color="white", fontsize=9)
            a.axis("off")
            a.text(0.01, 0.5, "R", color="yellow", transform=a.transAxes, fontsize=9, va="center")
            a.text(0.97, 0.5, "L", color="yellow", transform=a.transAxes, fontsize=9, va="center")
    handles = [
        Patch(color=_LABEL_COLOURS[v][:3], label=_CLASS_OF_LABEL[v]) for v in (LUNG, HEART, VESSEL, AIRWAY, BONE)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False, labelcolor="white")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, facecolor="black", format="png")
    plt.close(fig)
    buf.seek(0)
    im = Image.open(buf).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    path = Path(path)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", optimize=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m common.phantom", description="Write synthetic chest CT phantoms (NIfTI + report JSON)."
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=4, help="number of phantoms (seeds seed .. seed+n-1)")
    p.add_argument("--shape", type=int, nargs=3, default=[160, 160, 96])
    p.add_argument("--spacing", type=float, nargs=3, default=[2.0, 2.0, 2.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-hu", type=float, default=20.0)
    p.add_argument("--blur-mm", type=float, default=1.0)
    p.add_argument("--prefix", default="phantom")
    p.add_argument("--png", action="store_true", help="also write a PNG of one axial and one coronal slice per phantom")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    from tqdm import tqdm

    for seed in tqdm(range(args.seed, args.seed + args.n), desc="phantoms", unit="case"):
        case_id = f"{args.prefix}_{seed:03d}"
        paths = phantom_paths(args.out, case_id)
        if not args.overwrite and all(q.exists() for q in paths.values()):
            continue
        ph = generate_phantom(
            tuple(args.shape), tuple(args.spacing), seed=seed, noise_hu=args.noise_hu, blur_mm=args.blur_mm
        )
        write_phantom(ph, args.out, case_id, overwrite=args.overwrite)
        if args.png:
            render_slice_png(ph, Path(args.out) / f"{case_id}_slice.png", coronal=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
