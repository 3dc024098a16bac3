"""Captions and the report: grounded region captions with boxes, and the report sentences."""

from __future__ import annotations


import numpy as np
from scipy import ndimage

from common.classes import LEFT_LUNG, RIGHT_LUNG


class _Captions:
    """The captions and report of :class:`common.phantom.builder._Builder` (a mixin)."""

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
