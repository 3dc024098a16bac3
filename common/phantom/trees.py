"""Vessel and airway trees: grown branches, and the builder's tubes (mediastinal vessels, pulmonary trees,
airways) as capsule segments."""

from __future__ import annotations


import numpy as np

from common.classes import AIRWAY, BACKGROUND, BONE, LEFT_LUNG, LUNG, RIGHT_LUNG, VESSEL
from common.phantom.core import AIR_HU, LUNG_OR_BG, _ORDINAL
from common.phantom.geometry import _Layer, _Segs, _Tube, _polyline, _seg_dist, _unit


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


class _TubeBuilder:
    """The tubes of :class:`common.phantom.builder._Builder` (a mixin)."""

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
