"""``make chain NAME=...``: the named experiment chains, each a list of :class:`~common.apps.pipeline.Step`.

    python -m common.apps.chains NAME [--out outputs] [--clip-ckpt ...] [--hsam-config demo|train] [--retrain]
    python -m common.apps.chains --list

Every step is its own ``python -m monai.bundle run ... --tracking mlflow`` process (MLflow store
``<out>/mlruns.db``, the chain's name as experiment) or a benchmark script; a finished bundle step is skipped on a
re-run (``--retrain`` runs it again), a benchmark prints its figures every time. The SA-3b study on CPU runs, in
order, ``probmap``, ``pseudolabel``, ``hsam-data``, ``hsam``, ``hsam-baselines`` and ``hsam-comparison`` (chain
``sa3b``: all six); training pseudo labels come from phantoms that neither SA-1 nor any score uses (seeds
200-202) and from the real scans that passed QC; scores are on the held-out phantoms 100-102.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from common.apps.pipeline import BUNDLES, REPO_ROOT, Step, case_reports, run_steps, script_step

SHIPPED_CLIP = BUNDLES / "foundation_clip" / "models" / "model.pt"
TRAIN_PHANTOMS_SEED = 200  # phantoms neither SA-1 (0-9) nor any score (100-102) uses


@dataclass
class ChainOptions:
    """What a chain's steps read and where they write. ``hsam_config``: ``demo`` (the CPU size) or ``train`` (the
    real, GPU sizes of ``train.json``)."""

    out: Path = REPO_ROOT / "outputs"
    clip_ckpt: Path = SHIPPED_CLIP
    hsam_config: str = "demo"
    train_phantoms: Path = REPO_ROOT / "data" / "default" / "phantoms_hsam_train"
    hsam_ckpt: Path | None = None  # default: <out>/hsam_finetune/models/model.pt (the shipped one stays as it is)
    datalists: list[str] = field(default_factory=list)  # default: the training phantoms' and the real scans'

    def __post_init__(self):
        self.out = Path(self.out).resolve()
        self.hsam_ckpt = Path(self.hsam_ckpt or self.out / "hsam_finetune" / "models" / "model.pt").resolve()
        self.datalists = self.datalists or [
            str(self.out / "pseudolabel" / "train_phantoms" / "datalist.json"),
            str(self.out / "pseudolabel" / "real" / "datalist.json"),
        ]

    @property
    def hsam_overlays(self) -> list[str]:
        return ["train.json"] + (["demo.json"] if self.hsam_config == "demo" else [])


def _phantoms(directory: Path, seed: int, prefix: str) -> dict:
    return {"phantom_dir": str(directory), "phantom_seed": seed, "phantom_prefix": prefix}


def probmap_steps(o: ChainOptions) -> list[Step]:
    """SA-2 maps of the real shared scans, then scores on three held-out phantoms."""
    from common.data import scan_datalist
    from common.default_data import shared_data_dir

    shared, real = shared_data_dir().resolve(), o.out / "probmap" / "real"
    reports = case_reports(real, [c["case_id"] for c in scan_datalist(shared)], "probmap.json")
    clip = {"ckpt_path": str(o.clip_ckpt)}
    return [
        Step("probmap", "probmap_real", "probmap", ["inference.json"],
             {**clip, "dataset_dir": str(shared), "output_dir": str(real)}, reports[0],
             "SA-2: maps and lung masks of the real shared scans", extra_done=reports[1:]),
        Step("probmap", "probmap_heldout_phantoms", "probmap", ["inference.json", "evaluate.json"],
             {**clip, "output_dir": str(o.out / "probmap" / "heldout_phantoms")},
             o.out / "probmap" / "heldout_phantoms" / "scores.json", "SA-2: the held-out phantoms, scored"),
    ]  # fmt: skip


def pseudolabel_steps(o: ChainOptions) -> list[Step]:
    """SA-3a pseudo labels of the real shared scans and of the held-out phantoms (scored), from ``probmap``'s maps."""
    from common.default_data import shared_data_dir

    return [
        Step("pseudolabel", "pseudolabel_real", "pseudolabel", ["inference.json"],
             {"dataset_dir": str(shared_data_dir().resolve()), "probmap_dir": str(o.out / "probmap" / "real"),
              "output_dir": str(o.out / "pseudolabel" / "real")},
             o.out / "pseudolabel" / "real" / "datalist.json", "SA-3a: pseudo labels of the real shared scans"),
        Step("pseudolabel", "pseudolabel_heldout_phantoms", "pseudolabel", ["inference.json", "evaluate.json"],
             {"probmap_dir": str(o.out / "probmap" / "heldout_phantoms"),
              "output_dir": str(o.out / "pseudolabel" / "heldout_phantoms")},
             o.out / "pseudolabel" / "heldout_phantoms" / "scores.json", "SA-3a: the held-out phantoms, scored"),
    ]  # fmt: skip


def hsam_data_steps(o: ChainOptions) -> list[Step]:
    """SA-2 and SA-3a on the training phantoms (seeds 200-202): H-SAM's phantom pseudo labels."""
    train = _phantoms(o.train_phantoms, TRAIN_PHANTOMS_SEED, "train_phantom")
    return [
        Step("probmap", "probmap_train_phantoms", "probmap", ["inference.json", "evaluate.json"],
             {"ckpt_path": str(o.clip_ckpt), **train, "output_dir": str(o.out / "probmap" / "train_phantoms")},
             o.out / "probmap" / "train_phantoms" / "scores.json", "SA-2: the training phantoms"),
        Step("pseudolabel", "pseudolabel_train_phantoms", "pseudolabel", ["inference.json", "evaluate.json"],
             {**train, "probmap_dir": str(o.out / "probmap" / "train_phantoms"),
              "output_dir": str(o.out / "pseudolabel" / "train_phantoms")},
             o.out / "pseudolabel" / "train_phantoms" / "datalist.json", "SA-3a: the training phantoms' pseudo labels"),
    ]  # fmt: skip


def hsam_steps(o: ChainOptions) -> list[Step]:
    """SA-3b: H-SAM trained on the pseudo labels (its own checkpoint, not the shipped one), then scored on the
    held-out phantoms."""
    return [
        Step("hsam", "hsam_finetune_train", "hsam_finetune", o.hsam_overlays,
             {"datalist_path": o.datalists, "ckpt_path": str(o.hsam_ckpt),
              "output_dir": str(o.out / "hsam_finetune" / "train")},
             o.hsam_ckpt, "SA-3b: train H-SAM on the pseudo labels",
             extra_done=[o.out / "hsam_finetune" / "train" / "metrics_history.json"]),
        Step("hsam", "hsam_finetune_heldout_phantoms", "hsam_finetune", ["inference.json", "evaluate.json"],
             {"ckpt_path": str(o.hsam_ckpt), "output_dir": str(o.out / "hsam_finetune" / "heldout_phantoms")},
             o.out / "hsam_finetune" / "heldout_phantoms" / "scores.json", "SA-3b: the held-out phantoms, scored"),
    ]  # fmt: skip


def hsam_baseline_steps(o: ChainOptions) -> list[Step]:
    """Baselines on the same held-out phantoms: LiteMedSAM with SA-2 boxes and no fine-tuning (Algorithm 2 without
    the map fallback), and MONAI UNet / UNETR trained on the same datalist with the same recipe."""
    comparison = o.out / "hsam_comparison"
    steps = [
        Step("pseudolabel", "untuned_sam", "pseudolabel", ["inference.json", "evaluate.json"],
             {"probmap_dir": str(o.out / "probmap" / "heldout_phantoms"), "fallback": "none",
              "output_dir": str(comparison / "untuned_sam")},
             comparison / "untuned_sam" / "scores.json", "LiteMedSAM, SA-2 boxes, no fine-tuning"),
    ]  # fmt: skip
    for b in ("unet", "unetr"):
        ckpt = comparison / f"train_{b}" / "model.pt"
        overlay = f"baseline_{b}.json"
        steps += [
            Step("hsam", f"train_{b}", "hsam_finetune", [*o.hsam_overlays, overlay],
                 {"datalist_path": o.datalists, "ckpt_path": str(ckpt), "output_dir": str(comparison / f"train_{b}")},
                 ckpt, f"MONAI {b.upper()} trained on the same pseudo labels"),
            Step("hsam", b, "hsam_finetune", ["inference.json", "evaluate.json", overlay],
                 {"ckpt_path": str(ckpt), "output_dir": str(comparison / b)},
                 comparison / b / "scores.json", f"MONAI {b.upper()} on the held-out phantoms, scored"),
        ]  # fmt: skip
    return steps


def _comparison(o: ChainOptions) -> list[Step]:
    return [
        script_step("hsam_comparison", ["hsam_comparison.py"], "the table of every method on the held-out phantoms")
    ]


@dataclass(frozen=True)
class Chain:
    what: str
    steps: Callable[[ChainOptions], list[Step]]


CHAINS: dict[str, Chain] = {
    "probmap": Chain(probmap_steps.__doc__.splitlines()[0], probmap_steps),
    "pseudolabel": Chain(pseudolabel_steps.__doc__.splitlines()[0], pseudolabel_steps),
    "hsam-data": Chain(hsam_data_steps.__doc__.splitlines()[0], hsam_data_steps),
    "hsam": Chain("SA-3b: H-SAM trained on the pseudo labels, scored on the held-out phantoms", hsam_steps),
    "hsam-baselines": Chain("untuned LiteMedSAM, MONAI UNet and UNETR on the held-out phantoms", hsam_baseline_steps),
    "hsam-comparison": Chain("the comparison table (markdown, CSV, plot) of every method", _comparison),
    "sa3b": Chain(
        "the SA-3b study on CPU in order: probmap, pseudolabel, hsam-data, hsam, hsam-baselines, hsam-comparison",
        lambda o: [
            *probmap_steps(o),
            *pseudolabel_steps(o),
            *hsam_data_steps(o),
            *hsam_steps(o),
            *hsam_baseline_steps(o),
            *_comparison(o),
        ],
    ),
    "pseudolabel-ablation": Chain(
        "dots vs boxes vs both, with and without auxiliary channels, on the held-out phantoms",
        lambda o: [
            script_step(
                "pseudolabel_ablation",
                ["pseudolabel_ablation.py", "--probmap-dir", str(o.out / "probmap" / "heldout_phantoms")],
                "SA-3a prompt ablation",
            )
        ],
    ),
    "probmap-sweep": Chain(
        "SA-2's settings swept on the held-out phantoms",
        lambda o: [script_step("probmap_sweep", ["probmap_sweep.py", "--ckpt", str(o.clip_ckpt)], "SA-2 sweep")],
    ),
    "clip-ablation": Chain(
        "SA-1 loss ablation (4 demo-size trainings, about 30 minutes on 2 CPU cores)",
        lambda o: [script_step("clip_ablation", ["clip_ablation.py"], "SA-1 loss ablation")],
    ),
    "benchmarks": Chain(
        "the speed benchmarks: ingest, SA-1 training step, SA-2 and SA-3a against their literal algorithms",
        lambda o: [
            script_step("ingest", ["ingest.py"], "ingest speed"),
            script_step("clip_train", ["clip_train.py"], "SA-1 training step"),
            script_step("probmap_speed", ["probmap_speed.py", "--ckpt", str(o.clip_ckpt)], "SA-2 speed"),
            script_step(
                "pseudolabel_speed",
                ["pseudolabel_speed.py", "--probmap-dir", str(o.out / "probmap" / "real")],
                "SA-3a speed (needs the probmap chain's maps)",
            ),
        ],
    ),
}


def chain_steps(name: str, options: ChainOptions | None = None) -> list[Step]:
    """The steps of chain ``name`` (each tracked in the MLflow experiment of that name)."""
    if name not in CHAINS:
        raise KeyError(f"no chain {name!r}; the chains are: {', '.join(CHAINS)}")
    steps = CHAINS[name].steps(options or ChainOptions())
    for s in steps:
        s.experiment = name
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", help="the chain to run (--list shows them)")
    ap.add_argument("--list", action="store_true", help="list the chains and their steps")
    ap.add_argument("--out", default="outputs", help="where every step writes (and the MLflow store mlruns.db)")
    ap.add_argument("--clip-ckpt", default=str(SHIPPED_CLIP), help="the SA-1 model SA-2 maps with")
    ap.add_argument("--hsam-config", choices=("demo", "train"), default="demo", help="demo: the CPU size")
    ap.add_argument("--retrain", action="store_true", help="run every step again, even those already finished")
    args = ap.parse_args(argv)
    options = ChainOptions(Path(args.out), Path(args.clip_ckpt).resolve(), args.hsam_config)
    if args.list or not args.name:
        for name, chain in CHAINS.items():
            print(f"{name:22s} {chain.what}")
            if args.list:
                for s in chain_steps(name, options):
                    print(f"{'':24s}{s.name}: {s.what}")
        return 0 if args.list else 2
    try:
        steps = chain_steps(args.name, options)
    except (KeyError, FileNotFoundError, ValueError) as err:
        print(f"chain: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    options.out.mkdir(parents=True, exist_ok=True)
    try:
        run_steps(steps, options.out, retrain=args.retrain, started=started)
    except RuntimeError as err:
        print(f"chain {args.name} stopped: {err}", file=sys.stderr)
        return 1
    for s in steps:
        print(f"{s.name}: {s.status} ({(s.seconds or 0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
