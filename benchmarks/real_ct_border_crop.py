"""Bad input on real CT: a field of view that cuts through both lungs, so that they touch the image border.

    .venv/bin/python benchmarks/real_ct_border_crop.py [--scan ../shared/data/lidc_idri_1011_dicom]
        [--cut-mm 20] [--out outputs/border_crop] [--clip-ckpt ...] [--hsam-ckpt ...]

The scan is cropped in-plane ``--cut-mm`` inside the lungs' left, right and anterior extent (the lungs
then touch three image edges, as on a tight reconstruction field or a scan with the arms up against the
border). The reference is the classical HU threshold of the *uncropped* scan, cut the same way: on the
full field that mask is sound (its label-free row in ``docs/real_ct.md``), so it is the best label-free
reference there is for the crop. Scored against it, on the crop: ``make segment``'s mask (the shipped SA-1
and H-SAM by default, the whole ``common.segment`` path, its QC included) and the HU threshold run on the
crop itself. Prints one line per method (Dice, HD95, lung mL) and writes ``OUT/scores.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from common.segment import DEFAULT_CLIP, DEFAULT_HSAM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", default=str(REPO.parent / "shared/data/lidc_idri_1011_dicom"))
    ap.add_argument("--cut-mm", type=float, default=20.0)
    ap.add_argument("--out", default=str(REPO / "outputs" / "border_crop"))
    ap.add_argument("--clip-ckpt", default=str(DEFAULT_CLIP))
    ap.add_argument("--hsam-ckpt", default=str(DEFAULT_HSAM))
    args = ap.parse_args(argv)

    import nibabel as nib
    import numpy as np

    from common.io import read_ct, write_json_atomic
    from common.io.atomic import atomic_path
    from common.lungmask import hu_threshold_lung_mask
    from common.metrics import segmentation_scores
    from common.segment import Models, segment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vol = read_ct(args.scan)
    reference_full = hu_threshold_lung_mask(vol.hu, vol.spacing)
    if not reference_full.any():
        raise SystemExit(f"{args.scan}: the HU threshold finds no lung on the full field; no reference to crop")
    xs = np.flatnonzero(reference_full.any(axis=(1, 2)))
    ys = np.flatnonzero(reference_full.any(axis=(0, 2)))
    cut = [int(round(args.cut_mm / s)) for s in vol.spacing[:2]]
    x0, x1, y0 = xs.min() + cut[0], xs.max() - cut[0], ys.min() + cut[1]
    box = (slice(x0, x1 + 1), slice(y0, None), slice(None))
    hu = vol.hu[box]
    reference = reference_full[box]
    affine = vol.affine.copy()
    affine[:3, 3] = vol.affine[:3, :3] @ np.array([x0, y0, 0]) + vol.affine[:3, 3]
    crop = out / "crop_ct.nii.gz"
    with atomic_path(crop) as tmp:
        nib.save(nib.Nifti1Image(np.round(hu).astype(np.int16), affine), str(tmp))
    voxel_ml = float(np.prod(vol.spacing)) / 1000.0
    reference_ml = round(float(reference.sum()) * voxel_ml, 1)
    touching = [
        name for name, face in (("i=0", reference[0]), ("i=-1", reference[-1]), ("j=0", reference[:, 0])) if face.any()
    ]
    print(
        f"{args.scan}: crop {hu.shape} of {vol.hu.shape}; reference lung {reference_ml} mL, touches the edges {touching}"
    )

    rows = {}
    t = time.perf_counter()
    report = segment(
        crop, out / "segment", Models(Path(args.clip_ckpt), Path(args.hsam_ckpt)), source={"input": str(args.scan)}
    )
    seconds = time.perf_counter() - t
    methods = {
        "make segment (H-SAM)": np.asarray(nib.load(str(out / "segment" / "lung_mask.nii.gz")).dataobj) > 0,
        "HU threshold on the crop": hu_threshold_lung_mask(hu, vol.spacing),
    }
    for name, mask in methods.items():
        s = segmentation_scores(mask, reference, vol.spacing)
        rows[name] = {
            "dice": round(float(s["dice"]), 3),
            "hd95_mm": round(float(s["hd95_mm"]), 1),
            "lung_ml": round(float(mask.sum()) * voxel_ml, 1),
        }
    rows["make segment (H-SAM)"].update({"qc": report.get("qc"), "seconds": round(seconds, 1)})
    write_json_atomic(
        out / "scores.json",
        {
            "scan": str(args.scan),
            "crop_shape": list(hu.shape),
            "cut_mm": args.cut_mm,
            "reference_ml": reference_ml,
            "methods": rows,
        },
    )
    for name, r in rows.items():
        print(
            f"{name}: Dice {r['dice']}, HD95 {r['hd95_mm']} mm, {r['lung_ml']} mL"
            + (f", QC {r['qc']}" if "qc" in r else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
