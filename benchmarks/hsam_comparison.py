"""SA-3b evaluation table: lung masks of several methods against the held-out phantoms' true lung
field, as the method's Table 1 (whole lung, central 50 % and peripheral 50 % of the lung's slices).

    .venv/bin/python benchmarks/hsam_comparison.py [--phantoms 3]
        [--method "H-SAM=outputs/hsam_finetune/heldout_phantoms/{case}/{case}_lung_mask.nii.gz" ...]
        [--out outputs/hsam_comparison]

Each ``--method NAME=PATTERN`` names a mask file per case (``{case}`` is the case id); a method
whose files are missing is listed as not run. Rows computed here: the HU-threshold lung mask
(``common.lungmask.hu_threshold_lung_mask``). nnU-Net is optional: train and predict with it
yourself (``nnUNetv2_train`` / ``nnUNetv2_predict`` on the same pseudo labels) and pass its masks as
another ``--method``. Writes ``comparison.md``, ``comparison.csv`` (one row per method and case),
``comparison.json``, ``comparison.png`` (Dice per method, whole / central / peripheral) and
``overlays.png`` (each method's mask on the first case's base, middle and apex, truth dashed).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_METHODS = [
    "pseudo labels (SA-3a; H-SAM learns from such labels)=outputs/pseudolabel/heldout_phantoms/{case}/{case}_pseudo_label.nii.gz",
    "LiteMedSAM + SA-2 boxes, no fine-tuning=outputs/hsam_comparison/untuned_sam/{case}/{case}_pseudo_label.nii.gz",
    "MONAI UNet (2D) on pseudo labels=outputs/hsam_comparison/unet/{case}/{case}_lung_mask.nii.gz",
    "MONAI UNETR (2D) on pseudo labels=outputs/hsam_comparison/unetr/{case}/{case}_lung_mask.nii.gz",
    "H-SAM on pseudo labels (this bundle)=outputs/hsam_finetune/heldout_phantoms/{case}/{case}_lung_mask.nii.gz",
]
HU = "HU threshold (classical)"
METRICS = ["dice", "dice_central", "dice_peripheral", "hd95_mm", "assd_mm", "jaccard", "sensitivity", "specificity"]


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phantom-dir", default=str(REPO / "data/default/phantoms_heldout"))
    p.add_argument("--phantoms", type=int, default=3)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument(
        "--method",
        action="append",
        default=None,
        help="NAME=PATTERN with {case}; repeatable (default: the bundle's rows)",
    )
    p.add_argument("--out", default=str(REPO / "outputs/hsam_comparison"))
    args = p.parse_args(argv)

    from common.data import phantom_datalist
    from common.io import write_json_atomic, write_text_atomic
    from common.io.atomic import atomic_path
    from common.lungmask import hu_threshold_lung_mask
    from common.metrics import segmentation_scores
    from common.report import save_dice_bars, save_method_overlays_png

    cases = phantom_datalist(args.phantom_dir, n=args.phantoms, seed=args.seed)
    methods = [m.split("=", 1) for m in (args.method or DEFAULT_METHODS)]
    rows, missing, first_case = [], {}, None
    for c in cases:
        hu, affine = _read(Path(c["image"]))
        truth = _read(Path(c["lungs"]))[0] > 0
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        preds = {HU: hu_threshold_lung_mask(hu, tuple(spacing))}
        for name, pattern in methods:
            path = Path(pattern.format(case=c["case_id"]))
            path = path if path.is_absolute() else REPO / path
            if not path.is_file():
                missing.setdefault(name, str(path))
                continue
            mask, mask_affine = _read(path)
            if mask.shape != truth.shape or not np.allclose(mask_affine, affine, atol=1e-3):
                raise ValueError(f"{path}: not on the grid of {c['image']} ({mask.shape} vs {truth.shape})")
            preds[name] = mask > 0
        if first_case is None:
            first_case = (c["case_id"], hu, affine, truth, dict(preds))
        for name, mask in preds.items():
            rows.append({"method": name, "case_id": c["case_id"], **segmentation_scores(mask, truth, spacing)})
            print(
                f"{c['case_id']}  {name:45s} Dice {rows[-1]['dice']:.4f}  HD95 {rows[-1]['hd95_mm']:.2f} mm", flush=True
            )
    for name, path in missing.items():
        print(f"not run: {name} (no {path})", flush=True)

    order = [HU] + [n for n, _ in methods if n not in missing]
    summary = {}
    for name in order:
        vals = {m: np.array([r[m] for r in rows if r["method"] == name], dtype=float) for m in METRICS}
        summary[name] = {
            m: {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v)), "n": int(v.size)} for m, v in vals.items()
        }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "comparison.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "case_id"] + METRICS)
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: (round(r[k], 4) if isinstance(r[k], float) else r[k]) for k in ["method", "case_id"] + METRICS}
            )
    header = "| method | Dice (whole lung) | Dice, central 50 % | Dice, peripheral 50 % | HD95 mm | ASSD mm | Jaccard | sensitivity | specificity |"
    lines = [
        f"Held-out phantoms (seeds {args.seed}-{args.seed + args.phantoms - 1}), mean +- sd over {len(cases)} cases, against the true lung field.",
        "",
        header,
        "|" + "---|" * 9,
    ]
    for name in order:
        s = summary[name]
        fmt = lambda m, d=3: f"{s[m]['mean']:.{d}f} +- {s[m]['sd']:.{d}f}"  # noqa: E731
        lines.append(
            f"| {name} | {fmt('dice')} | {fmt('dice_central')} | {fmt('dice_peripheral')} | {fmt('hd95_mm', 2)} | {fmt('assd_mm', 2)} | "
            f"{fmt('jaccard')} | {fmt('sensitivity')} | {fmt('specificity', 4)} |"
        )
    for name, path in missing.items():
        lines.append(f"| {name} | not run (no {Path(path).name}) | | | | | | | |")
    table = "\n".join(lines) + "\n"
    write_text_atomic(out / "comparison.md", table)
    write_json_atomic(
        out / "comparison.json",
        {"cases": [c["case_id"] for c in cases], "summary": summary, "rows": rows, "not_run": missing},
    )
    labels, dice, grey = [], [], []
    for name in order:
        for part, key in (("whole", "dice"), ("central", "dice_central"), ("peripheral", "dice_peripheral")):
            labels.append(f"{name} - {part}")
            dice.append(summary[name][key]["mean"])
            grey.append(part != "whole")
    pseudo = next((summary[n]["dice"]["mean"] for n in order if n.startswith("pseudo labels")), 0.95)
    save_dice_bars(
        out / "comparison.png",
        labels,
        dice,
        grey,
        target=pseudo,
        xlabel="lung Dice vs the phantom lung field (dashed: pseudo labels, whole lung)",
    )
    case_id, hu, affine, truth, preds = first_case
    short = lambda n: n.split(" (")[0].replace(" on pseudo labels", "")  # noqa: E731
    save_method_overlays_png(
        out / "overlays.png",
        hu,
        [(short(n), m) for n, m in preds.items()],
        affine,
        reference=truth,
        title=f"{case_id}: base, middle and apex of the lung",
    )
    print(table)
    print(f"wrote {out}/comparison.md, comparison.csv, comparison.json, comparison.png, overlays.png")
    return summary


if __name__ == "__main__":
    main()
