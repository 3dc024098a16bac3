"""What can be measured on real chest CT without labels, for every method's lung mask on every real scan.

    .venv/bin/python benchmarks/real_ct_labelfree.py --method "H-SAM=outputs/release/hsam/shared" \\
        --method "SA-2=outputs/release/probmap/shared" --method "SA-3a=outputs/release/pseudolabel/shared" \\
        --scans ../shared/data --scans data/default/pyradiomics [--out docs/real_ct] [--overlays]

A method is ``NAME=DIR`` where ``DIR/<case>/<case>_<postfix>`` holds its mask (``lung_mask.nii.gz``, or a
pseudolabel bundle's ``pseudo_label.nii.gz``). Per scan and method: lung volume per side (mL; sides by
:func:`common.lungmask.split_left_right`), the share of mask voxels below -400 HU, the share of the
thorax's air-like voxels (below -400 HU inside the body, :func:`common.lungmask.body_mask`) the mask
covers, and its Dice against the classical HU threshold (:func:`common.lungmask.hu_threshold_lung_mask`)
and against SA-2's mask; with ``--probmap-dir``, SA-2's raw map (lung probability > 0.5) with the share of its lung
outside the body (``outside_body``). A method whose folder also holds ``<case>_lung_probability.nii.gz`` (the
hsam_finetune bundle's) gets a second row, ``NAME without clean-up``: its probability > 0.5 before the named
label-free post-processing (``LungMaskCleanupd``: the largest components, holes filled), so the clean-up is
measured with and without. ``--overlays`` draws each scan's masks at base, middle and apex. ``--surface-mm D`` splits
each mask's disagreement with the HU threshold by distance from the HU threshold's lung surface: ``missed_surface_ml``
(HU-threshold lung the mask leaves out, at most D mm deep) and ``missed_deep_ml`` (deeper), ``extra_surface_ml``
(mask outside the HU-threshold lung, at most D mm from it) and ``extra_far_ml``: a boundary drawn a few mm inside
or outside, against a region missed or added.
Writes ``OUT/labelfree.json`` and ``OUT/labelfree.md`` (the table the bundle docs quote) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.classes import LEFT_LUNG, RIGHT_LUNG  # noqa: E402

MASK_POSTFIXES = ("lung_mask.nii.gz", "pseudo_label.nii.gz", "pseudolabel.nii.gz")


def _mask_of(method_dir: Path, case_id: str):
    for postfix in MASK_POSTFIXES:
        p = method_dir / case_id / f"{case_id}_{postfix}"
        if p.is_file():
            return p
    return None


def _sides_of(method_dir: Path | None, case_id: str, mask: np.ndarray):
    """(right, left) from the method's own ``lung_sides`` output (1 right, 2 left: the same split_left_right, run by the
    bundle on the same mask), or (None, None) when there is none or it does not cover exactly ``mask``."""
    p = None if method_dir is None else method_dir / case_id / f"{case_id}_lung_sides.nii.gz"
    if p is None or not p.is_file():
        return None, None
    sides = np.asarray(nib.load(str(p)).dataobj)
    if sides.shape != mask.shape or not np.array_equal(sides > 0, mask):
        return None, None
    return sides == RIGHT_LUNG, sides == LEFT_LUNG


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", action="append", required=True, help="NAME=DIR of a method's per-case outputs")
    ap.add_argument(
        "--scans", action="append", required=True, help="a folder of real scans (as the bundles' dataset_dir)"
    )
    ap.add_argument("--sa2", default=None, help="the method NAME that is SA-2 (default: the one named SA-2)")
    ap.add_argument(
        "--probmap-dir",
        default=None,
        help="SA-2's outputs: adds a row for its raw map (lung probability > 0.5, before clean-up)",
    )
    ap.add_argument("--out", default=str(REPO / "outputs" / "labelfree"))
    ap.add_argument("--overlays", action="store_true")
    ap.add_argument(
        "--surface-mm",
        type=float,
        default=None,
        help="split the disagreement with the HU threshold at this distance (mm) from its surface",
    )
    args = ap.parse_args(argv)

    from common.data import scan_datalist
    from common.io import read_ct
    from common.lungmask import body_mask, hu_threshold_lung_mask, split_left_right
    from common.metrics import dice_score

    methods = dict(m.split("=", 1) for m in args.method)
    sa2 = args.sa2 or next((n for n in methods if n.upper().startswith("SA-2")), None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for scans in args.scans:
        for case in scan_datalist(scans):
            cid = case["case_id"]
            try:
                vol = read_ct(case["image"])
            except Exception as e:  # noqa: BLE001 - a scan that does not read is a row with its reason
                rows.append({"case": cid, "error": f"{type(e).__name__}: {e}"})
                continue
            hu = vol.hu
            voxel_ml = vol.voxel_volume_ml
            hu_mask = hu_threshold_lung_mask(hu, vol.spacing)
            thorax_air = (hu < -400) & body_mask(hu, vol.spacing)
            if args.surface_mm is not None:  # mm inside / outside the HU threshold's lung surface
                from scipy import ndimage

                depth = ndimage.distance_transform_edt(hu_mask, sampling=vol.spacing)
                distance = ndimage.distance_transform_edt(~hu_mask, sampling=vol.spacing)
            masks = {}
            for name, d in methods.items():
                p = _mask_of(Path(d), cid)
                if p is None:
                    continue
                m = np.asarray(nib.load(str(p)).dataobj) > 0
                if m.shape != hu.shape:
                    rows.append(
                        {"case": cid, "method": name, "error": f"{p}: grid {m.shape} is not the scan's {hu.shape}"}
                    )
                    continue
                masks[name] = m
                probability = Path(d) / cid / f"{cid}_lung_probability.nii.gz"
                if probability.is_file():  # the network's own output before the named clean-up
                    masks[f"{name} without clean-up"] = (
                        np.asarray(nib.load(str(probability)).dataobj, dtype=np.float32) > 0.5
                    )
            for name, m in masks.items():
                right, left = _sides_of(Path(methods[name]) if name in methods else None, cid, m)
                if right is None:
                    right, left = split_left_right(m, vol.affine) if m.any() else (m, m)
                row = {
                    "case": cid,
                    "method": name,
                    "slices": int(hu.shape[2]),
                    "spacing_mm": [round(float(s), 2) for s in vol.spacing],
                    "lung_ml": round(float(m.sum()) * voxel_ml, 1),
                    "right_ml": round(float(right.sum()) * voxel_ml, 1),
                    "left_ml": round(float(left.sum()) * voxel_ml, 1),
                    "share_below_-400": round(float((hu[m] < -400).mean()), 3) if m.any() else None,
                    "thorax_air_covered": round(float((m & thorax_air).sum()) / max(int(thorax_air.sum()), 1), 3),
                    "dice_hu_threshold": round(dice_score(m, hu_mask), 3),
                    "dice_sa2": round(dice_score(m, masks[sa2]), 3) if sa2 in masks and name != sa2 else None,
                }
                if args.surface_mm is not None:
                    near, missed, extra = args.surface_mm, hu_mask & ~m, m & ~hu_mask
                    row.update(
                        {
                            "missed_surface_ml": round(float((missed & (depth <= near)).sum()) * voxel_ml, 1),
                            "missed_deep_ml": round(float((missed & (depth > near)).sum()) * voxel_ml, 1),
                            "extra_surface_ml": round(float((extra & (distance <= near)).sum()) * voxel_ml, 1),
                            "extra_far_ml": round(float((extra & (distance > near)).sum()) * voxel_ml, 1),
                        }
                    )
                rows.append(row)
            if args.probmap_dir:  # SA-2's raw map, before any clean-up: where lung takes more than half the probability
                pm = Path(args.probmap_dir) / cid / f"{cid}_probmap.nii.gz"
                if pm.is_file():
                    prob = np.asarray(nib.load(str(pm)).dataobj, dtype=np.float32)
                    raw = (
                        prob[..., 0] > 0.5
                    )  # the background classes' share is not in the file: argmax alone would miss it
                    del prob
                    outside = ~body_mask(hu, vol.spacing)
                    rows.append(
                        {
                            "case": cid,
                            "method": "SA-2 raw map (lung p > 0.5)",
                            "lung_ml": round(float(raw.sum()) * voxel_ml, 1),
                            "share_below_-400": round(float((hu[raw] < -400).mean()), 3) if raw.any() else None,
                            "thorax_air_covered": round(
                                float((raw & thorax_air).sum()) / max(int(thorax_air.sum()), 1), 3
                            ),
                            "dice_hu_threshold": round(dice_score(raw, hu_mask), 3),
                            "outside_body": round(float((raw & outside).sum()) / max(int(raw.sum()), 1), 3),
                        }
                    )
            rows.append(
                {
                    "case": cid,
                    "method": "HU threshold",
                    "lung_ml": round(float(hu_mask.sum()) * voxel_ml, 1),
                    "share_below_-400": round(float((hu[hu_mask] < -400).mean()), 3) if hu_mask.any() else None,
                    "thorax_air_covered": round(float((hu_mask & thorax_air).sum()) / max(int(thorax_air.sum()), 1), 3),
                    "dice_hu_threshold": 1.0 if hu_mask.any() else None,
                    "dice_sa2": round(dice_score(hu_mask, masks[sa2]), 3) if sa2 in masks else None,
                }
            )
            if args.overlays and masks:
                from common.report import save_method_overlays_png

                save_method_overlays_png(
                    out / f"{cid}.png",
                    hu,
                    [("HU threshold", hu_mask), *masks.items()],
                    vol.affine,
                    fractions=(0.15, 0.5, 0.85),
                    title=f"{cid}: base, middle and apex",
                )
            print(
                f"{cid}: "
                + "; ".join(
                    f"{r['method']} {r.get('lung_ml')} mL, Dice vs HU {r.get('dice_hu_threshold')}"
                    for r in rows
                    if r.get("case") == cid and "error" not in r
                ),
                flush=True,
            )
    cols = [
        "case",
        "method",
        "lung_ml",
        "right_ml",
        "left_ml",
        "share_below_-400",
        "thorax_air_covered",
        "dice_hu_threshold",
        "dice_sa2",
        "outside_body",
    ]
    if args.surface_mm is not None:
        cols += ["missed_surface_ml", "missed_deep_ml", "extra_surface_ml", "extra_far_ml"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += [
        "| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |"
        for r in rows
        if "error" not in r
    ]
    errors = [r for r in rows if "error" in r]
    text = "\n".join(lines) + (
        "\n\nerrors:\n" + "\n".join(f"- {r['case']} {r.get('method', '')}: {r['error']}" for r in errors)
        if errors
        else ""
    )
    (out / "labelfree.json").write_text(json.dumps(rows, indent=1))
    (out / "labelfree.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
