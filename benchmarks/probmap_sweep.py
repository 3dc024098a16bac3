"""SA-2 sweep: lung Dice on held-out phantoms against patch size, stride, aggregation and prompt wording.

    .venv/bin/python benchmarks/probmap_sweep.py [--ckpt outputs/demo/foundation_clip/models/model.pt]
        [--phantoms 2] [--every 4] [--out outputs/probmap_sweep]

One factor at a time around the bundle's defaults (``bundles/probmap/configs/inference.json``:
the checkpoint's patch size, stride 20 mm, mean aggregation, "CT patch of the {}"), each run
through the bundle's own inferer and post-processing (softmax, CT-guided filter, threshold 0.5,
body restriction, clean-up). Phantoms come from seeds SA-1 never saw (``phantom_datalist``); to
keep it quick only every ``--every``-th axial slice is mapped. Writes ``sweep.csv``, ``sweep.md``
and ``sweep.png`` (lung-mask Dice per setting) under ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
CONFIG = REPO / "bundles/probmap/configs/inference.json"

# (factor, value shown, bundle overrides)
SETTINGS = [
    ("default", "as configured", {}),
    ("patch_mm", "30", {"patch_mm": [30.0]}),
    ("patch_mm", "50", {"patch_mm": [50.0]}),
    ("patch_mm", "30+50 (multi-window)", {"patch_mm": [30.0, 50.0]}),
    ("stride_mm", "10", {"stride_mm": 10.0}),
    ("stride_mm", "30", {"stride_mm": 30.0}),
    ("aggregation", "max", {"aggregation": "max"}),
    ("aggregation", "gaussian", {"aggregation": "gaussian"}),
    ("prompt", "'{}'", {"prompt_templates": ["{}"]}),
    ("prompt", "'a CT image of the {}'", {"prompt_templates": ["a CT image of the {}"]}),
    ("prompt", "ensemble of 3", {"prompt_templates": ["CT patch of the {}", "{}", "a CT image of the {}"]}),
    ("smoothing", "gaussian 3 mm (no CT guide)", {"smoothing": "gaussian", "smoothing_sigma_mm": 3.0}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(REPO / "outputs/demo/foundation_clip/models/model.pt"))
    ap.add_argument("--phantoms", type=int, default=2)
    ap.add_argument("--every", type=int, default=4, help="map every n-th axial slice")
    ap.add_argument("--phantom-dir", default=str(REPO / "data/default/phantoms_heldout"))
    ap.add_argument("--out", default=str(REPO / "outputs/probmap_sweep"))
    ap.add_argument("--only", nargs="*", help="factors to run (default: all)")
    args = ap.parse_args(argv)

    import nibabel as nib
    import numpy as np
    import torch
    from common.bundle_run import BundleRun
    from monai.data import MetaTensor

    from common.data import phantom_datalist
    from common.io import write_json_atomic
    from common.metrics import dice_score
    from common.report import save_dice_bars

    if not Path(args.ckpt).is_file():
        print(f"{args.ckpt}: no checkpoint; train SA-1 first (make demo) or pass --ckpt", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = phantom_datalist(args.phantom_dir, n=args.phantoms)
    data = []
    for c in cases:
        img = nib.load(c["image"])
        aff = img.affine.copy()
        aff[:3, 2] *= args.every  # every n-th slice: the z step grows
        hu = np.asarray(img.dataobj, dtype=np.float32)[:, :, :: args.every]
        lungs = np.asarray(nib.load(c["lungs"]).dataobj)[:, :, :: args.every] > 0
        data.append((c["case_id"], MetaTensor(torch.from_numpy(hu)[None], affine=torch.from_numpy(aff)), lungs))

    rows = []
    settings = [s for s in SETTINGS if not args.only or s[0] in args.only or s[0] == "default"]
    network = None
    for factor, shown, overrides in settings:
        parser = BundleRun(
            "probmap", ["inference.json"], {"ckpt_path": args.ckpt, "device": "cpu", "progress": False, **overrides}
        ).parser()
        if network is None:
            network = parser.get_parsed_content("network")
        inferer = parser.get_parsed_content("inferer")
        post = _postprocessing(parser, network)
        dices, t0 = [], time.perf_counter()
        for case_id, image, lungs in data:
            pred = inferer(image[None], network)[0]
            d = post({"image": image, "pred": MetaTensor(pred.as_subclass(torch.Tensor), affine=image.affine)})
            dices.append(dice_score(np.asarray(d["lung_mask"])[0] > 0, lungs))
        seconds = time.perf_counter() - t0
        row = {
            "factor": factor,
            "setting": shown,
            "lung_mask_dice": float(np.mean(dices)),
            "per_case": [round(x, 4) for x in dices],
            "seconds": round(seconds, 1),
        }
        rows.append(row)
        print(
            f"{factor:12s} {shown:32s} Dice {row['lung_mask_dice']:.4f} ({', '.join(f'{x:.3f}' for x in dices)}) {seconds:.0f} s",
            flush=True,
        )

    lines = ["| factor | setting | lung-mask Dice (mean) | per phantom | seconds |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['factor']} | {r['setting']} | {r['lung_mask_dice']:.3f} | {', '.join(f'{x:.3f}' for x in r['per_case'])} | {r['seconds']} |"
        for r in rows
    ]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    with open(out / "sweep.csv", "w") as f:
        f.write("factor,setting,lung_mask_dice,seconds\n")
        for r in rows:
            f.write(f'{r["factor"]},"{r["setting"]}",{r["lung_mask_dice"]:.4f},{r["seconds"]}\n')
    write_json_atomic(
        out / "sweep.json", {"phantoms": [c["case_id"] for c in cases], "every": args.every, "rows": rows}
    )
    save_dice_bars(
        out / "sweep.png",
        [f"{r['factor']}: {r['setting']}" for r in rows],
        [r["lung_mask_dice"] for r in rows],
        [r["factor"] == "default" for r in rows],
        0.9,
        f"lung-mask Dice, {len(cases)} held-out phantoms (every {args.every}th slice)",
    )
    print("\n".join(lines))
    return 0


def _postprocessing(parser, network):
    """The bundle's post-processing with the already loaded network (its temperature sets the softmax)."""
    parser["network"] = "$None"
    cfg = parser.get("postprocessing")
    for t in cfg["transforms"]:
        if t.get("_target_", "").endswith("SimilarityToProbabilityd"):
            t["scale"] = float(network.temperature_scale())
    parser["postprocessing"] = cfg
    return parser.get_parsed_content("postprocessing")


if __name__ == "__main__":
    raise SystemExit(main())
