"""The patient: body, lungs, heart, great vessels and bones defined analytically in millimetres."""

from __future__ import annotations

import math

import numpy as np

from common.classes import LEFT_LUNG, RIGHT_LUNG
from common.phantom.core import F32
from common.phantom.geometry import _interp, _unit


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
