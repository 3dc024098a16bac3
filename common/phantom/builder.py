"""The builder that puts a phantom together (anatomy, tubes, rasterisation, image formation, captions), and
:func:`generate_phantom`."""

from __future__ import annotations


import numpy as np

from common.classes import CLASS_NAMES, LEFT_LUNG, RIGHT_LUNG
from common.io.volume import CTVolume
from common.phantom.core import F32, PAD_HU, Phantom, _CLASS_OF_LABEL
from common.phantom.geometry import _blur_inplace, _filtered_noise
from common.phantom.anatomy import _Anatomy
from common.phantom.trees import _TubeBuilder
from common.phantom.rasterise import _Rasteriser
from common.phantom.captions import _Captions


class _Builder(_TubeBuilder, _Rasteriser, _Captions):
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
