"""SA-2's window aggregation against SA-1 models of different sharpness: the demo's SA-2 steps, on phantoms and real CT.

    .venv/bin/python benchmarks/probmap_aggregation.py --clip shipped=bundles/foundation_clip/models/model.pt \\
        --clip seed1_ep6=outputs/ckchoice/seed1/epochs/epoch_6.pt [--aggregation mean gaussian] [--out outputs/aggregation]

For every SA-1 checkpoint (``NAME=PATH``, e.g. the epochs ``benchmarks/clip_checkpoint_choice.py`` keeps) and
every ``aggregation`` of ``probmap``'s ``inference.json``, the demo's three SA-2 steps run as the demo runs them
(``common.apps.demo.demo_steps``, one ``python -m monai.bundle run`` each): the held-out phantom (scored against
its truth), the training scans (the training phantom, Lung-PET-CT-Dx A0002, two DeepLesion slabs) and the real scan
no stage trained on (Lung-PET-CT-Dx A0001). Then, label-free on each real scan (``benchmarks/real_ct_labelfree.py``
with ``--surface-mm 10``): SA-2's lung volume, its Dice against the classical HU threshold, the HU-threshold lung
it leaves out within 10 mm of that lung's surface, what it adds more than 10 mm away, and the raw map's share
outside the body. Finished runs are reused. Prints one Markdown table (docs/reproducibility.md quotes it).

Why: SA-1 labels a training patch by its central quarter, and ``"mean"`` spreads a window's score over all of
it; a sharper classifier then pulls the lung's edge inwards (the three-seed study, docs/reproducibility.md).
``"gaussian"`` weights each window towards its centre (MONAI's importance map).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = ("probmap_heldout_phantoms", "probmap_training_scans", "probmap_heldout_real_demo")
REAL = {"A0002": "lung_pet_ct_dx_a0002", "A0001": "lung_pet_ct_dx_a0001"}


def run_sa2(out: Path, clip: Path, aggregation: str) -> None:
    """The demo's SA-2 steps into ``out`` with ``clip`` as SA-1 (linked where the demo keeps its own)."""
    from common.apps.demo import SIZES, demo_steps, prepare_scans
    from common.apps.pipeline import run_steps

    size = SIZES["demo"]
    size = dataclasses.replace(size, probmap={**size.probmap, "aggregation": aggregation})
    ckpt = out / "foundation_clip" / "models" / "model.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if ckpt.is_symlink() and ckpt.resolve() != clip.resolve():
        raise ValueError(f"{out} was mapped with {ckpt.resolve()}, not {clip}: give another --out")
    if not ckpt.exists():
        ckpt.symlink_to(clip.resolve())
    prepare_scans(out, size)
    run_steps([s for s in demo_steps(out, size) if s.name in STEPS], out)


def labelfree(out: Path) -> dict:
    """Per real scan: SA-2's mask row and its raw-map row of ``real_ct_labelfree``."""
    import real_ct_labelfree

    rows = []
    for scans, maps in (("training_scans", "training_scans"), ("heldout_scans", "heldout_real_demo")):
        dest = out / "labelfree" / scans
        if not (dest / "labelfree.json").is_file():
            real_ct_labelfree.main(
                [
                    "--method",
                    f"SA-2={out / 'probmap' / maps}",
                    "--scans",
                    str(out / scans),
                    "--probmap-dir",
                    str(out / "probmap" / maps),
                    "--surface-mm",
                    "10",
                    "--out",
                    str(dest),
                ]
            )
        rows += json.loads((dest / "labelfree.json").read_text())
    return {(r["case"], r.get("method")): r for r in rows if "error" not in r}


def figures(out: Path) -> dict:
    scores = json.loads((out / "probmap" / "heldout_phantoms" / "scores.json").read_text())
    rows = labelfree(out)
    fig = {"held-out phantom lung-mask Dice": scores["summary"]["lung_mask_dice"]["mean"]}
    for short, cid in REAL.items():
        case = next((c for c, _ in rows if c.startswith(cid)), None)
        if case is None:
            continue
        mask, raw, hu = rows[(case, "SA-2")], rows[(case, "SA-2 raw map (lung p > 0.5)")], rows[(case, "HU threshold")]
        fig[f"{short} lung mL (HU threshold {hu['lung_ml']:.0f})"] = mask["lung_ml"]
        fig[f"{short} Dice vs HU threshold"] = mask["dice_hu_threshold"]
        fig[f"{short} HU lung left out, <= 10 mm deep (mL)"] = mask["missed_surface_ml"]
        fig[f"{short} added > 10 mm from the HU lung (mL)"] = mask["extra_far_ml"]
        fig[f"{short} raw map share outside the body"] = raw["outside_body"]
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", action="append", required=True, metavar="NAME=PATH", help="an SA-1 checkpoint")
    ap.add_argument("--aggregation", nargs="+", default=["mean", "gaussian"])
    ap.add_argument("--out", default=str(REPO / "outputs" / "aggregation"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    clips = {}
    for item in args.clip:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            raise SystemExit(f"--clip {item!r}: give NAME=PATH of an SA-1 checkpoint that exists")
        clips[name] = Path(path)
    table = {}
    for name, clip in clips.items():
        for aggregation in args.aggregation:
            out = Path(args.out) / f"{name}_{aggregation}"
            print(f"==> {name} ({clip}), aggregation {aggregation}: {out}", flush=True)
            run_sa2(out, clip, aggregation)
            table[f"{name} {aggregation}"] = figures(out)
    keys = list(dict.fromkeys(k for f in table.values() for k in f))
    lines = ["| figure | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    digits = {k: 0 if "mL" in k else 3 for k in keys}  # volumes in whole mL, Dice and shares to 3 decimals
    lines += [
        f"| {k} | " + " | ".join("" if f.get(k) is None else f"{f[k]:.{digits[k]}f}" for f in table.values()) + " |"
        for k in keys
    ]
    text = "\n".join(lines)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "aggregation.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
