"""SA-3 ablation: pseudo-label lung Dice on held-out phantoms for dots vs boxes vs both, with and without
auxiliary channels.

    .venv/bin/python benchmarks/pseudolabel_ablation.py [--probmap-dir bundles/probmap/eval_phantoms]
        [--phantoms 3] [--every 4] [--grid-mm 20] [--out outputs/pseudolabel_ablation]

Needs the probmap bundle's outputs for the held-out phantoms (seeds SA-1 never saw), which
``make chain NAME=probmap`` (the probmap bundle's ``evaluate.json``) writes. Each axial slice with lung
in the SA-2 mask (every ``--every``-th, to keep it quick) is encoded once by LiteMedSAM; every
setting then prompts the same embeddings (``common.inferers.pseudo_label_slice``), and the result
goes through the bundle's 3D clean-up (inconsistent slices, two largest components, holes). Dice is
against the phantom's lung field on the slices used. Writes ``ablation.csv/.md/.json/.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, prompts, aux, multimask, box margin mm; None = --box-margin-mm)
SETTINGS = [
    ("boxes", "boxes", "none", False, None),
    ("boxes, margin 5 mm", "boxes", "none", False, 5.0),
    ("dots", "dots", "none", False, None),
    ("dots, best of 3 masks", "dots", "none", True, None),
    ("dots + boxes", "both", "none", False, None),
    ("boxes + negative points (heart, bone)", "boxes", "negative_points", False, None),
    ("boxes + veto (heart, bone)", "boxes", "veto", False, None),
    ("dots + negative points (heart, bone)", "dots", "negative_points", False, None),
    ("dots + veto (heart, bone)", "dots", "veto", False, None),
]
SA2 = "SA-2 lung mask (the prompts' source)"
CEILING = "perfect boxes (around the true lung, vote against it)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probmap-dir", default=str(REPO / "bundles/probmap/eval_phantoms"))
    ap.add_argument("--phantom-dir", default=str(REPO / "data/default/phantoms_heldout"))
    ap.add_argument("--phantoms", type=int, default=3)
    ap.add_argument("--every", type=int, default=4, help="use every n-th lung slice")
    ap.add_argument("--grid-mm", type=float, default=20.0)
    ap.add_argument("--box-margin-mm", type=float, default=10.0)
    ap.add_argument("--overlap-threshold", type=float, default=0.5)
    ap.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    ap.add_argument("--out", default=str(REPO / "outputs/pseudolabel_ablation"))
    ap.add_argument("--from-json", action="store_true", help="only redraw the table and plot from --out/ablation.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        import json

        saved = json.loads((out / "ablation.json").read_text())
        write_results(out, saved.pop("rows"), saved)
        return 0

    import nibabel as nib
    import numpy as np
    import torch

    from common.classes import CLASS_NAMES
    from common.data import phantom_datalist
    from common.transforms import probmap_outputs
    from common.inferers import pseudo_label_slice
    from common.io.volume import reorient_array
    from common.metrics import dice_score
    from common.networks import load_sam_family
    from common.transforms import LungMaskCleanup, RemoveInconsistentSlices
    from common.transforms.intensity import HUWindow

    torch.set_grad_enabled(False)
    out.mkdir(parents=True, exist_ok=True)
    sam = load_sam_family("litemedsam")
    window = HUWindow()
    aux_channels = [CLASS_NAMES.index("heart"), CLASS_NAMES.index("bone")]
    settings = [s for s in SETTINGS if not args.only or s[0] in args.only]
    dice: dict[str, list[float]] = {s[0]: [] for s in settings}
    dice[SA2] = []
    dice[CEILING] = []
    seconds = {s[0]: 0.0 for s in settings}
    kept = {s[0]: [0, 0] for s in settings}
    cases = phantom_datalist(args.phantom_dir, n=args.phantoms)
    for c in cases:
        pm = probmap_outputs(args.probmap_dir, c["case_id"])
        if not pm["lung_mask"].is_file():
            print(f"{pm['lung_mask']}: missing; run the probmap bundle's evaluate.json first", file=sys.stderr)
            return 2
        img = nib.load(c["image"])
        hu, aff = reorient_array(np.asarray(img.dataobj, dtype=np.float32), img.affine)
        truth = reorient_array(np.asarray(nib.load(c["lungs"]).dataobj) > 0, img.affine)[0]
        sa2 = reorient_array(np.asarray(nib.load(str(pm["lung_mask"])).dataobj) > 0, img.affine)[0]
        prob = np.asarray(nib.load(str(pm["probmap"])).dataobj, dtype=np.float32)
        aux = np.stack([reorient_array(prob[..., a] >= 0.5, img.affine)[0] for a in aux_channels])
        spacing = np.linalg.norm(aff[:3, :3], axis=0)
        px = float(spacing[:2].mean())
        ks = [int(k) for k in np.flatnonzero(sa2.any(axis=(0, 1)))[:: args.every]]
        t0 = time.perf_counter()
        embeddings = [sam.encode(window(torch.from_numpy(np.ascontiguousarray(hu[:, :, k].T)))[None]) for k in ks]
        encode_s = time.perf_counter() - t0
        clean_spacing = (spacing[0], spacing[1], spacing[2] * args.every)
        dice[SA2].append(dice_score(sa2[:, :, ks], truth[:, :, ks]))
        # the same model with perfect boxes: around the true lung, voted against it
        ceiling = np.stack(
            [
                pseudo_label_slice(
                    sam,
                    embeddings[i],
                    (hu.shape[1], hu.shape[0]),
                    truth[:, :, k].T,
                    prompts="boxes",
                    box_margin=round(args.box_margin_mm / px),
                    min_box_area=max(1, round(50 / px**2)),
                    overlap_threshold=args.overlap_threshold,
                    prompt_batch=4,
                ).mask.T
                for i, k in enumerate(ks)
            ],
            axis=-1,
        )
        ceiling = LungMaskCleanup(None, 20.0).clean(RemoveInconsistentSlices(0.5).clean(ceiling), clean_spacing)
        dice[CEILING].append(dice_score(ceiling, truth[:, :, ks]))
        print(f"{c['case_id']} {CEILING:40s} Dice {dice[CEILING][-1]:.4f}", flush=True)
        for name, prompts, aux_mode, multimask, margin_mm in settings:
            margin_mm = args.box_margin_mm if margin_mm is None else margin_mm
            t0 = time.perf_counter()
            vol = np.zeros((hu.shape[0], hu.shape[1], len(ks)), dtype=bool)
            for i, k in enumerate(ks):
                res = pseudo_label_slice(
                    sam,
                    embeddings[i],
                    (hu.shape[1], hu.shape[0]),
                    sa2[:, :, k].T,
                    aux[:, :, :, k].transpose(0, 2, 1),
                    prompts=prompts,
                    aux=aux_mode,
                    grid_size=max(1, round(args.grid_mm / px)),
                    box_margin=round(margin_mm / px),
                    min_box_area=max(1, round(50 / px**2)),
                    overlap_threshold=args.overlap_threshold,
                    multimask_output=multimask,
                    prompt_batch=4,
                )
                vol[:, :, i] = res.mask.T
                kept[name][0] += res.n_kept
                kept[name][1] += res.n_candidates
            vol = RemoveInconsistentSlices(0.5).clean(vol)
            vol = LungMaskCleanup(None, 20.0).clean(vol, clean_spacing)
            seconds[name] += time.perf_counter() - t0 + encode_s
            dice[name].append(dice_score(vol, truth[:, :, ks]))
            print(f"{c['case_id']} {name:40s} Dice {dice[name][-1]:.4f}", flush=True)

    rows = []
    for name, vals in dice.items():
        row = {"setting": name, "lung_dice": float(np.mean(vals)), "per_case": [round(v, 4) for v in vals]}
        if name in kept:
            row["kept_share"] = round(kept[name][0] / max(kept[name][1], 1), 3)
            row["seconds"] = round(seconds[name], 1)
        rows.append(row)
    write_results(
        out,
        rows,
        {
            "phantoms": [c["case_id"] for c in cases],
            "every": args.every,
            "grid_mm": args.grid_mm,
            "box_margin_mm": args.box_margin_mm,
        },
    )
    return 0


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    """ablation.md/.csv/.json and a bar plot of the rows; prints the table."""
    from common.io import write_json_atomic
    from common.report import save_dice_bars

    lines = [
        "| setting | lung Dice (mean) | per phantom | candidates kept | seconds (encode + prompts) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['setting']} | {r['lung_dice']:.3f} | {', '.join(f'{v:.3f}' for v in r['per_case'])} | {r.get('kept_share', '')} | {r.get('seconds', '')} |"
        for r in rows
    ]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    with open(out / "ablation.csv", "w") as f:
        f.write("setting,lung_dice,kept_share,seconds\n")
        for r in rows:
            f.write(f'"{r["setting"]}",{r["lung_dice"]:.4f},{r.get("kept_share", "")},{r.get("seconds", "")}\n')
    write_json_atomic(out / "ablation.json", {**meta, "rows": rows})
    save_dice_bars(
        out / "ablation.png",
        [r["setting"] for r in rows],
        [r["lung_dice"] for r in rows],
        [r["setting"] in (SA2, CEILING) for r in rows],
        0.95,
        f"pseudo-label lung Dice, {len(meta['phantoms'])} held-out phantoms (every {meta['every']}th lung slice)",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
