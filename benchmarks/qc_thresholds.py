"""Where SA-3a's QC thresholds come from: each QC statistic of every pseudo label against how good that pseudo label is.

    .venv/bin/python benchmarks/qc_thresholds.py --run outputs/release --run outputs/release5 --run outputs/release6 \\
        [--good 0.88] [--out outputs/qc_thresholds]

A run is a chain's output folder (``make release``'s or ``make demo``'s): ``<run>/pseudolabel/<set>/qc.csv`` gives
each case's QC statistics (SAM's mean predicted IoU, agreement Dice with the SA-2 mask, share of slices whose
candidate was kept, lung volume). How good each pseudo label is comes without labels for a real scan, as the Dice of
the pseudo label against the classical HU threshold (``<run>/labelfree/<set>/labelfree.json``, the SA-3a rows
``benchmarks/real_ct_labelfree.py`` writes; the HU threshold itself scores 0.946 against clinicians' contours on
real CT), and against the true lung field for a phantom (``<run>/training_phantoms`` or ``<run>/training_scans``,
``<case>_lungs.nii.gz``). A case is good when that Dice is at least ``--good``.

For each statistic it prints the good and the poor cases' ranges and the threshold that keeps the most good and
the fewest poor cases (the midpoint of the gap when one exists), with how many of each it keeps.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STATISTICS = ("mean_predicted_iou", "agreement_dice", "kept_share")


def _quality(run: Path, set_name: str, case_id: str, label_path: str, labelfree: dict) -> tuple[float | None, str]:
    """(Dice, against what) of one pseudo label: the HU threshold for a real scan, the truth for a phantom."""
    if case_id in labelfree:
        return labelfree[case_id], "HU threshold"
    import nibabel as nib
    import numpy as np

    from common.metrics import dice_score

    stem = case_id[:-3] if case_id.endswith("_ct") else case_id
    for folder in (run / "training_phantoms", run / "training_scans", run / "phantoms_heldout"):
        truth = folder / f"{stem}_lungs.nii.gz"
        if truth.is_file() and Path(label_path).is_file():
            return round(
                dice_score(
                    np.asarray(nib.load(str(label_path)).dataobj) > 0, np.asarray(nib.load(str(truth)).dataobj) > 0
                ),
                3,
            ), "phantom truth"
    return None, ""


def collect(runs: list[Path]) -> list[dict]:
    rows = []
    for run in runs:
        for qc in sorted((run / "pseudolabel").glob("*/qc.csv")):
            set_name = qc.parent.name
            labelfree = {}
            lf = run / "labelfree" / set_name / "labelfree.json"
            if lf.is_file():
                labelfree = {
                    r["case"]: r["dice_hu_threshold"]
                    for r in json.loads(lf.read_text())
                    if r.get("method") == "SA-3a" and "error" not in r
                }
            for r in csv.DictReader(qc.open()):
                if r.get("status") != "done":
                    continue
                quality, against = _quality(run, set_name, r["case_id"], r.get("label", ""), labelfree)
                rows.append(
                    {
                        "run": run.name,
                        "set": set_name,
                        "case": r["case_id"],
                        "included": r["included"] == "True",
                        **{s: float(r[s]) if r.get(s) not in (None, "") else None for s in STATISTICS},
                        "lung_ml": float(r["lung_ml_total"]) if r.get("lung_ml_total") else None,
                        "quality": quality,
                        "against": against,
                    }
                )
    return rows


def best_threshold(good: list[float], poor: list[float]) -> tuple[float, int, int]:
    """The lower bound that keeps the most good and the fewest poor values (ties: the midpoint of the widest gap)."""
    if not good:
        return float("nan"), 0, 0
    candidates = sorted(set(good + poor))
    best = None
    for i, v in enumerate(candidates):
        lo = candidates[i - 1] if i else v
        t = (lo + v) / 2 if i else v  # between this value and the one below it
        kept_good, kept_poor = sum(g >= t for g in good), sum(p >= t for p in poor)
        score = (kept_good / len(good)) - (kept_poor / len(poor) if poor else 0.0)
        if best is None or score > best[0] + 1e-12:
            best = (score, t, kept_good, kept_poor)
    return round(best[1], 4), best[2], best[3]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run", action="append", required=True, help="a chain's output folder (e.g. outputs/release6, outputs/demo)"
    )
    ap.add_argument(
        "--good",
        type=float,
        default=0.88,
        help="a pseudo label is good when its Dice (HU threshold or truth) is at least this",
    )
    ap.add_argument("--out", default=None, help="also write rows and thresholds as JSON here")
    args = ap.parse_args(argv)
    rows = collect([Path(r) for r in args.run])
    scored = [r for r in rows if r["quality"] is not None]
    print(
        "| run | set | case | QC verdict | mean predicted IoU | agreement Dice | kept share | lung mL | Dice | against |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['set']} | {r['case']} | {'pass' if r['included'] else 'excluded'} | {r['mean_predicted_iou']} | {r['agreement_dice']} | "
            f"{r['kept_share']} | {r['lung_ml']} | {r['quality']} | {r['against']} |"
        )
    good = [r for r in scored if r["quality"] >= args.good]
    poor = [r for r in scored if r["quality"] < args.good]
    print(f"\n{len(scored)} scored pseudo labels: {len(good)} good (Dice >= {args.good}), {len(poor)} poor")
    thresholds = {}
    for s in STATISTICS:
        g = [r[s] for r in good if r[s] is not None]
        p = [r[s] for r in poor if r[s] is not None]
        t, kg, kp = best_threshold(g, p)
        thresholds[s] = {
            "threshold": t,
            "good_kept": kg,
            "good": len(g),
            "poor_kept": kp,
            "poor": len(p),
            "good_range": [min(g), max(g)] if g else None,
            "poor_range": [min(p), max(p)] if p else None,
        }
        print(
            f"{s}: good {min(g):.4f}-{max(g):.4f}, poor {(min(p) if p else float('nan')):.4f}-{(max(p) if p else float('nan')):.4f}; "
            f"threshold {t} keeps {kg}/{len(g)} good and {kp}/{len(p)} poor"
        )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "qc_thresholds.json").write_text(
            json.dumps({"good": args.good, "rows": rows, "thresholds": thresholds}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
