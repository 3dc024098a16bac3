"""SA-1 loss ablation: Eq. 1 cosine vs CLIP InfoNCE, each with and without MedSAM distillation (Eq. 2).

    .venv/bin/python benchmarks/clip_ablation.py [--config demo] [--runs infonce+distill cosine ...] [--parallel 2]

Trains the foundation_clip bundle once per choice (``monai.bundle run``, same data, seed and
schedule; only ``contrastive`` and ``beta`` change; the teacher cache is shared, so only the first
run pays for the teacher; ``--runs ... infonce+distill+caption-positives`` adds the InfoNCE whose
positives are only samples with the same caption, ``class_positives: false``) and prints a table
of the best held-out zero-shot patch accuracy, the recall@5 and the distillation cosine at that epoch, and the wall time of each run. ``--parallel N``
runs N trainings at once, each on one thread (no oversubscription of the cores), which on a small
machine takes less wall time than running them one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "infonce+distill": {"contrastive": "infonce", "beta": 1.0},
    "infonce": {"contrastive": "infonce", "beta": 0.0},
    "cosine+distill": {"contrastive": "cosine", "beta": 1.0},
    "cosine": {"contrastive": "cosine", "beta": 0.0},
    # InfoNCE whose positives are only samples with the same caption (the other patches of the class are negatives)
    "infonce+distill+caption-positives": {"contrastive": "infonce", "beta": 1.0, "class_positives": False},
}
DEFAULT_RUNS = ["infonce+distill", "infonce", "cosine+distill", "cosine"]


def train(
    name: str, overrides: dict, config: str, out: Path, threads: int | None = None, extra: dict | None = None
) -> dict:
    from common.bundle_run import BundleRun

    configs = ["train.json"] + (["demo.json"] if config == "demo" else [])
    run_dir = out / name
    settings = {"output_dir": str(run_dir), "ckpt_dir": str(run_dir / "models"), **overrides, **(extra or {})}
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        settings["num_workers"] = 0
    cmd = [sys.executable, *BundleRun("foundation_clip", configs, settings).argv()]
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: training failed (exit {proc.returncode}); see {run_dir.with_suffix('.log')}")
    history = json.loads((run_dir / "metrics_history.json").read_text())["history"]
    best = next(row for row in history if row["epoch"] == history[-1]["best_epoch"])  # the checkpoint's epoch
    return {
        "run": name,
        **overrides,
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "zero_shot_acc": best["val_zero_shot_acc"],
        "recall_at_5": best.get("val_recall_at_5"),
        "distill_cosine": best.get("val_distill_cosine"),
        "minutes": seconds / 60,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("demo", "default"), default="demo")
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=DEFAULT_RUNS)
    ap.add_argument("--out", default=str(REPO / "outputs" / "clip_ablation"))
    ap.add_argument("--parallel", type=int, default=1, help="trainings at once (each then on one thread)")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra bundle overrides for every run, e.g. teacher_cache_dir=/tmp/cache",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(kv.split("=", 1) for kv in args.set)
    threads = 1 if args.parallel > 1 else None
    from concurrent.futures import ThreadPoolExecutor

    def one(name):
        print(f"training {name} ...", flush=True)
        r = train(name, RUNS[name], args.config, out, threads, extra)
        print(
            f"  {name}: zero-shot acc {r['zero_shot_acc']:.3f} (epoch {r['best_epoch']}/{r['epochs']}), {r['minutes']:.1f} min",
            flush=True,
        )
        return r

    with ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
        rows = list(pool.map(one, args.runs))
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    fmt = lambda v: "n/a" if v is None or v != v else f"{v:.3f}"  # noqa: E731 (nan: no teacher)
    print(
        "\n| loss | InfoNCE positives | distillation | zero-shot patch acc | recall@5 | distill cosine | best epoch | minutes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        loss = "Eq. 1 cosine" if r["contrastive"] == "cosine" else "InfoNCE"
        positives = (
            "n/a (no negatives)"
            if r["contrastive"] == "cosine"
            else ("same caption" if r.get("class_positives") is False else "same class")
        )
        print(
            f"| {loss} | {positives} | {'yes (beta 1)' if r['beta'] else 'no (beta 0)'} | {fmt(r['zero_shot_acc'])} | {fmt(r['recall_at_5'])} | {fmt(r['distill_cosine'])} | {r['best_epoch']}/{r['epochs']} | {r['minutes']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
