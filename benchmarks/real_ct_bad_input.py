"""Bad input on real CT, made from a sound real scan: lungs cut by the border, an airway open to the air, a wide field.

    .venv/bin/python benchmarks/real_ct_bad_input.py --case border-crop|open-airway|wide-field
        [--scan ../shared/data/lidc_idri_1011_dicom] [--cut-mm 20] [--channel-mm 10] [--zoom-out 1.5]
        [--out outputs/bad_input/<case>] [--clip-ckpt ...] [--hsam-ckpt ...] [--overlays]

``border-crop``: the scan is cropped in-plane ``--cut-mm`` inside the lungs' left, right and anterior extent
(the lungs then touch three image edges, as on a tight reconstruction field or a scan with the arms up against
the border).

``open-airway``: an air channel ``--channel-mm`` wide and as high is drawn from the trachea above the lung
apices, straight forward through the neck, to the air in front of it, as a tracheostomy does (and as an open
mouth and nose inside the field do, through the pharynx). The lungs are then joined to the air around the
patient, and a rule that discards air reaching the image border as dark as free air discards them with it.
The rest of the scan is unchanged.

``wide-field``: the same patient on a reconstruction field ``--zoom-out`` times wider (a 440 mm field becomes
660 mm, as on a radiotherapy planning CT), still 512 pixels across: every slice is shrunk in-plane by that factor
and set in air (-1024 HU, below which the scan's own padding is clipped), its pixels that much larger.

The reference is the classical HU threshold of the *unmodified* scan, cut the same way: on the full field that
mask is sound (its label-free row in ``docs/real_ct.md``), so it is the best label-free reference there is for
the modified scan. Scored against it: ``make segment``'s mask (the shipped SA-1 and H-SAM by default, the whole
``common.segment`` path, its QC included) and the HU threshold run on the modified scan itself. Prints one line
per method (Dice, HD95, lung mL) and writes ``OUT/scores.json`` (``--overlays``: ``OUT/overlays.png``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FREE_AIR_HU = -1000.0


def border_crop(hu: np.ndarray, reference: np.ndarray, affine: np.ndarray, spacing, cut_mm: float):
    """``hu`` and ``reference`` cropped ``cut_mm`` inside the reference's left, right and anterior extent, and the
    crop's affine (the scan's voxel grid: anterior is low j)."""
    xs = np.flatnonzero(reference.any(axis=(1, 2)))
    ys = np.flatnonzero(reference.any(axis=(0, 2)))
    cut = [int(round(cut_mm / s)) for s in spacing[:2]]
    x0, x1, y0 = xs.min() + cut[0], xs.max() - cut[0], ys.min() + cut[1]
    box = (slice(x0, x1 + 1), slice(y0, None), slice(None))
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ np.array([x0, y0, 0]) + affine[:3, 3]
    return hu[box], reference[box], crop_affine


def trachea_slice(reference: np.ndarray, affine: np.ndarray, spacing) -> tuple[int, np.ndarray]:
    """The most cranial slice whose HU-threshold mask is one airway-sized piece near the midline (the trachea
    above the apices), and that piece's 2D mask."""
    from scipy import ndimage

    ks = np.flatnonzero(reference.any(axis=(0, 1)))
    pixel_mm2 = float(spacing[0] * spacing[1])
    for k in sorted(ks.tolist(), reverse=bool(affine[2, 2] > 0)):  # from the most cranial slice down
        labels, n = ndimage.label(reference[:, :, k])
        sizes = np.bincount(labels.ravel())[1:] * pixel_mm2
        pieces = np.flatnonzero((sizes >= 100.0) & (sizes <= 1000.0)) + 1  # a trachea's lumen: 1-3.5 cm across
        if n == 1 and pieces.size == 1:
            piece = labels == pieces[0]
            centre = np.argwhere(piece).mean(axis=0)[0]
            if abs(centre - reference.shape[0] / 2) < reference.shape[0] / 6:
                return int(k), piece
    raise SystemExit("no slice above the lung apices holds the trachea alone near the midline: no airway to open")


def open_airway(hu: np.ndarray, reference: np.ndarray, affine: np.ndarray, spacing, channel_mm: float):
    """``hu`` with a free-air channel ``channel_mm`` wide (x) and high (z) from the trachea's centre straight to
    the anterior image border, and the slices it spans."""
    if abs(affine[1, 1]) < np.abs(affine[:3, 1]).max() or abs(affine[2, 2]) < np.abs(affine[:3, 2]).max():
        raise SystemExit("open-airway needs an axial scan whose j axis runs antero-posterior and k cranio-caudal")
    k, piece = trachea_slice(reference, affine, spacing)
    ci, cj = np.argwhere(piece).mean(axis=0).round().astype(int)
    half_i = max(int(round(channel_mm / spacing[0] / 2)), 1)
    n_k = max(int(round(channel_mm / spacing[2])), 1)
    cranial = 1 if affine[2, 2] > 0 else -1
    k0 = k - cranial * (n_k - 1)  # from the trachea slice down into the neck, never above the scan
    ks = slice(min(k, k0), max(k, k0) + 1)
    js = slice(0, cj + 1) if affine[1, 1] < 0 else slice(cj, None)  # RAS y grows anteriorly
    out = hu.copy()
    out[ci - half_i : ci + half_i + 1, js, ks] = FREE_AIR_HU
    return out, list(range(ks.start, ks.stop))


def wide_field(hu: np.ndarray, reference: np.ndarray, affine: np.ndarray, zoom_out: float):
    """``hu`` and ``reference`` shrunk in-plane by ``zoom_out`` about the slice centre and set in air on the same
    number of pixels, and the affine of those larger pixels."""
    from scipy import ndimage

    if not zoom_out > 1.0:
        raise SystemExit(f"--zoom-out must be above 1, got {zoom_out}")
    nx, ny = hu.shape[:2]
    small = ndimage.zoom(np.maximum(hu, -1024.0), (1 / zoom_out, 1 / zoom_out, 1), order=1)
    small_ref = ndimage.zoom(reference.astype(np.uint8), (1 / zoom_out, 1 / zoom_out, 1), order=0) > 0
    i0, j0 = (nx - small.shape[0]) // 2, (ny - small.shape[1]) // 2
    box = (slice(i0, i0 + small.shape[0]), slice(j0, j0 + small.shape[1]), slice(None))
    out, out_ref = np.full(hu.shape, -1024.0, np.float32), np.zeros(hu.shape, bool)
    out[box], out_ref[box] = small, small_ref
    scale = np.array([nx / small.shape[0], ny / small.shape[1], 1.0])
    wide = affine.copy()
    wide[:3, :3] = affine[:3, :3] * scale  # column j scaled: pixel size along i and j
    # the slice centre stays where it was: world(centre) = A @ c + t, with c the centre index on each grid
    centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0, 0.0])
    wide[:3, 3] = affine[:3, :3] @ centre + affine[:3, 3] - wide[:3, :3] @ centre
    return out, out_ref, wide


def main(argv=None) -> int:
    from common.segment import DEFAULT_CLIP, DEFAULT_HSAM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("border-crop", "open-airway", "wide-field"), required=True)
    ap.add_argument("--scan", default=str(REPO.parent / "shared/data/lidc_idri_1011_dicom"))
    ap.add_argument("--cut-mm", type=float, default=20.0, help="border-crop: how far inside the lungs to cut")
    ap.add_argument("--channel-mm", type=float, default=10.0, help="open-airway: the channel's width and height")
    ap.add_argument("--zoom-out", type=float, default=1.5, help="wide-field: how many times wider the field")
    ap.add_argument("--out", default=None, help="default outputs/bad_input/<case>")
    ap.add_argument("--clip-ckpt", default=str(DEFAULT_CLIP))
    ap.add_argument("--hsam-ckpt", default=str(DEFAULT_HSAM))
    ap.add_argument("--overlays", action="store_true", help="write OUT/overlays.png (base, middle, apex)")
    args = ap.parse_args(argv)

    import nibabel as nib

    from common.io import read_ct, write_json_atomic
    from common.io.atomic import atomic_path
    from common.lungmask import hu_threshold_lung_mask
    from common.metrics import segmentation_scores
    from common.segment import Models, segment

    out = Path(args.out or REPO / "outputs" / "bad_input" / args.case)
    out.mkdir(parents=True, exist_ok=True)
    vol = read_ct(args.scan)
    reference = hu_threshold_lung_mask(vol.hu, vol.spacing)
    if not reference.any():
        raise SystemExit(f"{args.scan}: the HU threshold finds no lung on the unmodified scan; no reference")
    settings, fractions, spacing = {}, (0.1, 0.5, 0.9), tuple(vol.spacing)
    if args.case == "border-crop":
        hu, reference, affine = border_crop(vol.hu, reference, vol.affine, vol.spacing, args.cut_mm)
        touching = [n for n, f in (("i=0", reference[0]), ("i=-1", reference[-1]), ("j=0", reference[:, 0])) if f.any()]
        settings = {"cut_mm": args.cut_mm, "crop_shape": list(hu.shape), "touches_the_edges": touching}
    elif args.case == "wide-field":
        hu, reference, affine = wide_field(vol.hu, reference, vol.affine, args.zoom_out)
        spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
        settings = {"zoom_out": args.zoom_out, "field_mm": [round(s * n) for s, n in zip(spacing, hu.shape[:2])]}
    else:
        hu, ks = open_airway(vol.hu, reference, vol.affine, vol.spacing, args.channel_mm)
        affine = vol.affine
        extent = np.flatnonzero(reference.any(axis=(0, 1)))
        middle = (ks[len(ks) // 2] - extent.min()) / max(extent.max() - extent.min(), 1)
        fractions = (0.1, 0.5, middle if affine[2, 2] > 0 else 1.0 - middle)
        settings = {"channel_mm": args.channel_mm, "channel_slices": ks}
    modified = out / "input_ct.nii.gz"
    with atomic_path(modified) as tmp:
        nib.save(nib.Nifti1Image(np.round(hu).astype(np.int16), affine), str(tmp))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    reference_ml = round(float(reference.sum()) * voxel_ml, 1)
    print(f"{args.scan}: {args.case} {settings}; reference lung {reference_ml} mL")

    t = time.perf_counter()
    report = segment(
        modified, out / "segment", Models(Path(args.clip_ckpt), Path(args.hsam_ckpt)), source={"input": str(args.scan)}
    )
    seconds = time.perf_counter() - t
    methods = {
        "make segment (H-SAM)": np.asarray(nib.load(str(out / "segment" / "lung_mask.nii.gz")).dataobj) > 0,
        f"HU threshold on the {args.case} scan": hu_threshold_lung_mask(hu, spacing),
    }
    rows = {}
    for name, mask in methods.items():
        s = segmentation_scores(mask, reference, spacing)
        rows[name] = {
            "dice": round(float(s["dice"]), 3),
            "hd95_mm": round(float(s["hd95_mm"]), 1),
            "lung_ml": round(float(mask.sum()) * voxel_ml, 1),
        }
    rows["make segment (H-SAM)"].update({"qc": report.get("qc"), "seconds": round(seconds, 1)})
    write_json_atomic(
        out / "scores.json",
        {"scan": str(args.scan), "case": args.case, **settings, "reference_ml": reference_ml, "methods": rows},
    )
    if args.overlays:
        from common.report import save_method_overlays_png

        save_method_overlays_png(
            out / "overlays.png",
            hu,
            list(methods.items()),
            affine,
            reference=reference,
            fractions=fractions,
            title=f"{Path(args.scan).name}, {args.case}; the HU threshold of the unmodified scan stands for the truth",
        )
    for name, r in rows.items():
        print(
            f"{name}: Dice {r['dice']}, HD95 {r['hd95_mm']} mm, {r['lung_ml']} mL"
            + (f", QC {r['qc']}" if "qc" in r else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
