"""The spread of ``make demo`` over SA-1 seeds: one column per run, then min / median / max per figure.

    make demo DEMO_ARGS="--seed 1 --out outputs/demo_seed1"     # and seed 2; seed 0 is plain make demo
    .venv/bin/python benchmarks/demo_spread.py outputs/demo outputs/demo_seed1 outputs/demo_seed2

Each run's figures come from its ``report/metrics.json``: SA-1's validation zero-shot accuracy, the held-out
phantom's Dice at SA-2, SA-3a and H-SAM (truth-scored), which training scans QC admitted, and the label-free
figures of the held-out real scan (Lung-PET-CT-Dx A0001) with the run's own models: lung volume and Dice
against the classical HU threshold. Prints a Markdown table (docs/reproducibility.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _get(metrics: dict, path: str):
    node = metrics
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _real_row(metrics: dict, method: str) -> dict:
    return next((r for r in _get(metrics, "shipped.rows") or [] if r.get("method") == method), {})


# (label, how to read it from metrics.json, digits)
FIGURES = [
    ("SA-1 validation zero-shot accuracy", lambda m: _get(m, "clip.val_zero_shot_acc"), 3),
    ("SA-1 best epoch", lambda m: _get(m, "clip.best_epoch"), 0),
    ("SA-2 held-out phantom lung-mask Dice", lambda m: _get(m, "probmap.heldout_phantoms.lung_mask_dice.mean"), 3),
    ("SA-3a held-out phantom pseudo-label Dice", lambda m: _get(m, "pseudolabel.heldout_phantoms.pseudo_dice.mean"), 3),
    (
        "SA-3a training scans QC passed (of those pseudo-labelled)",
        lambda m: sum(
            1 for c in _get(m, "pseudolabel.cases") or [] if c.get("set") == "training scans" and c.get("QC") == "pass"
        ),
        0,
    ),
    ("H-SAM best validation Dice", lambda m: _get(m, "hsam.best_val_mean_dice"), 3),
    ("H-SAM held-out phantom Dice", lambda m: _get(m, "hsam.heldout_phantoms.dice.mean"), 3),
    ("H-SAM held-out phantom HD95 mm", lambda m: _get(m, "hsam.heldout_phantoms.hd95_mm.mean"), 1),
    (
        "A0002 (training scan) SA-2 lung mL",
        lambda m: _get(m, "probmap.training_scans_lung_volume_ml.lung_pet_ct_dx_a0002.total"),
        0,
    ),
    ("A0001 SA-2 lung mL", lambda m: _real_row(m, "SA-2 demo").get("lung_ml"), 0),
    ("A0001 SA-2 Dice vs HU threshold", lambda m: _real_row(m, "SA-2 demo").get("dice_hu_threshold"), 3),
    ("A0001 H-SAM lung mL", lambda m: _real_row(m, "H-SAM demo").get("lung_ml"), 0),
    ("A0001 H-SAM Dice vs HU threshold", lambda m: _real_row(m, "H-SAM demo").get("dice_hu_threshold"), 3),
    ("A0001 H-SAM share of thorax air covered", lambda m: _real_row(m, "H-SAM demo").get("thorax_air_covered"), 3),
]


def _fmt(value, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if digits else f"{value:.0f}"


def spread_table(runs: list[Path]) -> str:
    metrics = []
    for run in runs:
        path = run / "report" / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no demo report there (run make demo with --out {run} first)")
        metrics.append(json.loads(path.read_text()))
    seeds = [f"seed {m.get('seed', '?')}" for m in metrics]
    lines = ["| figure | " + " | ".join(seeds) + " | min | median | max |", "|---" * (len(runs) + 4) + "|"]
    for label, read, digits in FIGURES:
        values = [read(m) for m in metrics]
        known = [v for v in values if v is not None]
        stats = [min(known), statistics.median(known), max(known)] if known else [None] * 3
        lines.append(f"| {label} | " + " | ".join(_fmt(v, digits) for v in values + stats) + " |")
    hsam_sets = [
        f"{s}: "
        + ", ".join(_get(m, "pseudolabel.hsam_datalist.training") or [])
        + " (validation: "
        + ", ".join(_get(m, "pseudolabel.hsam_datalist.validation") or [])
        + ")"
        for s, m in zip(seeds, metrics)
    ]
    return "\n".join(lines) + "\n\nH-SAM trained on " + "; ".join(hsam_sets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="make demo output folders (each with report/metrics.json)")
    args = parser.parse_args(argv)
    try:
        print(spread_table(args.runs))
    except FileNotFoundError as err:
        print(f"demo_spread: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
