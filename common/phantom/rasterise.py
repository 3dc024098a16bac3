"""Rasterisation: the slab pass (body, lungs, heart, bones) and the tube pass (vessels and airways, analytic
partial volume)."""

from __future__ import annotations


import numpy as np
from scipy.special import ndtr

from common.classes import BACKGROUND, BONE, HEART, LEFT_LUNG, LUNG, RIGHT_LUNG
from common.phantom.core import AIR_HU, F32, FAT_HU, LUNG_OR_BG, MED_FAT_HU, MUSCLE_HU
from common.phantom.geometry import _CoarseField, _Segs, _cat_segs, _filtered_noise, _segs_from_tubes


class _Rasteriser:
    """The slab and tube passes of :class:`common.phantom.builder._Builder` (a mixin)."""

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
