"""H-SAM's named label-free post-processing, step by step, measured with and without each step.

    .venv/bin/python -m monai.bundle run --config_file bundles/hsam_finetune/configs/inference.json \\
        --bundle_root bundles/hsam_finetune --dataset_dir ../shared/data --output_dir outputs/hsam_real
    .venv/bin/python benchmarks/hsam_postprocessing.py --scans ../shared/data --outputs outputs/hsam_real \\
        [--phantoms data/default/phantoms --phantom-outputs outputs/hsam_phantoms] [--out outputs/hsam_postprocessing]

Each case's saved network probability (``<case>_lung_probability.nii.gz``, written before any post-processing) goes
through the ``postprocessing`` of ``bundles/hsam_finetune/configs/inference.json`` once per variant (config
overrides), so the answer of each variant is exactly what the bundle would write with those settings:

- ``p > 0.5``: the network's probability alone;
- ``clean-up``: the largest components and holes filled (``LungMaskCleanupd``) only;
- ``+ inside the body``: and what lies outside the body dropped first (``RestrictToBodyd``);
- ``+ surface refined B mm``: and the surface moved onto the -400 HU edge within B mm (``RefineLungBoundaryd``);
  the bundle's default B is marked.

Real scans are scored against the classical HU threshold (agreement, not truth: the refinement uses the same
-400 HU edge, so it raises this figure by construction); phantoms against their true lungs, the only truth here.
Prints Dice and HD95 per case and the mean per variant; writes ``OUT/hsam_postprocessing.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "bundles" / "hsam_finetune" / "configs" / "inference.json"


def variants(bands_mm) -> dict[str, dict | None]:
    out = {
        "p > 0.5": None,
        "clean-up": {"restrict_to_body": False, "refine_boundary_mm": 0.0},
        "+ inside the body": {"restrict_to_body": True, "refine_boundary_mm": 0.0},
    }
    out.update(
        {f"+ surface refined {b:g} mm": {"restrict_to_body": True, "refine_boundary_mm": float(b)} for b in bands_mm}
    )
    return out


def postprocessing(overrides: dict):
    from common.bundle_run import BundleRun

    return BundleRun("hsam_finetune", ["inference.json"], overrides).parser().get_parsed_content("postprocessing")


def cases(scans: str, outputs: str, truth_postfix: str | None):
    """(case id, HU volume, spacing, probability, affine, truth or None) per case with a saved probability."""
    from common.data import scan_datalist
    from common.io import read_ct

    for case in scan_datalist(scans):
        cid = case["case_id"]
        p = Path(outputs) / cid / f"{cid}_lung_probability.nii.gz"
        if not p.is_file():
            print(f"{cid}: no {p.name} under {outputs}; skipped", file=sys.stderr)
            continue
        vol = read_ct(case["image"])
        img = nib.load(str(p))
        prob = np.asarray(img.dataobj, dtype=np.float32)
        if prob.shape != vol.hu.shape:
            raise SystemExit(f"{p}: grid {prob.shape} is not the scan's {vol.hu.shape}")
        truth = None
        if truth_postfix:
            t = Path(str(case["image"]).replace("_ct.nii.gz", truth_postfix))
            truth = np.asarray(nib.load(str(t)).dataobj) > 0
        yield cid, vol.hu, vol.spacing, prob, img.affine, truth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", action="append", default=[], help="a folder of real scans (as the bundle's dataset_dir)")
    ap.add_argument(
        "--outputs", action="append", default=[], help="the hsam_finetune inference output_dir for each --scans"
    )
    ap.add_argument("--phantoms", default=None, help="phantom folder (phantom_*_ct.nii.gz with *_lungs.nii.gz)")
    ap.add_argument("--phantom-outputs", default=None)
    ap.add_argument("--bands-mm", default="2,3,4", help="surface bands to try (comma-separated mm)")
    ap.add_argument("--out", default=str(REPO / "outputs" / "hsam_postprocessing"))
    args = ap.parse_args(argv)
    if len(args.scans) != len(args.outputs):
        ap.error("give one --outputs for each --scans")

    from monai.data import MetaTensor

    from common.lungmask import hu_threshold_lung_mask
    from common.metrics import segmentation_scores

    default_band = json.loads(CONFIG.read_text())["refine_boundary_mm"]
    chains = {
        name: (None if o is None else postprocessing(o))
        for name, o in variants([float(b) for b in args.bands_mm.split(",")]).items()
    }
    sources = [(s, o, None, "HU threshold") for s, o in zip(args.scans, args.outputs)]
    if args.phantoms:
        sources.append((args.phantoms, args.phantom_outputs, "_lungs.nii.gz", "truth"))
    rows = []
    for scans, outputs, truth_postfix, reference_name in sources:
        for cid, hu, spacing, prob, affine, truth in cases(scans, outputs, truth_postfix):
            reference = truth if truth is not None else hu_threshold_lung_mask(hu, spacing)
            a, hu32 = (
                torch.from_numpy(affine),
                torch.from_numpy(np.asarray(hu, np.float32)),
            )  # once a case; every variant only reads them
            for name, chain in chains.items():
                if chain is None:
                    mask = prob > 0.5
                else:
                    d = chain(
                        {
                            "pred": MetaTensor(torch.from_numpy(prob)[None], affine=a),
                            "hu": MetaTensor(hu32[None], affine=a),
                        }
                    )
                    mask = np.asarray(d["pred"])[0] > 0
                s = segmentation_scores(mask, reference, spacing)
                rows.append(
                    {
                        "case": cid,
                        "reference": reference_name,
                        "variant": name,
                        "lung_ml": round(float(mask.sum()) * float(np.prod(spacing)) / 1000.0, 1),
                        "dice": round(s["dice"], 4),
                        "hd95_mm": round(s["hd95_mm"], 2),
                    }
                )
                print(
                    f"{cid[:34]:34s} vs {reference_name:12s} {name:28s} {rows[-1]['lung_ml']:8.1f} mL  Dice {s['dice']:.4f}  HD95 {s['hd95_mm']:6.2f} mm",
                    flush=True,
                )
    print(f"\nmean per variant (the bundle's default band is {default_band:g} mm):")
    summary = {}
    for reference_name in dict.fromkeys(r["reference"] for r in rows):
        for name in chains:
            sel = [r for r in rows if r["reference"] == reference_name and r["variant"] == name]
            summary[f"{reference_name} | {name}"] = {
                "n": len(sel),
                "dice": round(float(np.mean([r["dice"] for r in sel])), 4),
                "min_dice": round(float(np.min([r["dice"] for r in sel])), 4),
                "hd95_mm": round(float(np.mean([r["hd95_mm"] for r in sel])), 2),
            }
            print(
                f"  vs {reference_name:12s} {name:28s} n={len(sel)}  Dice {summary[f'{reference_name} | {name}']['dice']:.4f} "
                f"(min {summary[f'{reference_name} | {name}']['min_dice']:.4f})  HD95 {summary[f'{reference_name} | {name}']['hd95_mm']:.2f} mm"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from common.io.atomic import write_json_atomic

    write_json_atomic(
        out / "hsam_postprocessing.json", {"rows": rows, "summary": summary, "default_band_mm": default_band}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
