"""Which SA-1 epoch each checkpoint criterion picks, and what SA-2 then maps: held-out patch accuracy (SA-1's key
metric) against the Dice of SA-2's lung map of the held-out phantoms (``common.engines.LungMapDice``, attached here).

Trains SA-1 with the demo's recipe (``train.json`` + ``demo.json``, as ``make demo`` and the shipped model, early
stopping on accuracy) and one seed, keeping every epoch's checkpoint (``<out>/epochs/epoch_<n>.pt``), then prints
each epoch's figures and the epoch each criterion picks (the first best, as MONAI's evaluator keeps it). Run SA-2 on
the two picks to compare their maps (``probmap`` ``inference.json`` with ``--ckpt_path``), as docs/reproducibility.md
does: on 2026-12-06 the map's pick was the better map of the held-out phantom and the far worse one of a real scan.

    .venv/bin/python benchmarks/clip_checkpoint_choice.py --seed 1 --out outputs/checkpoint_choice/seed1 \\
        [--set teacher_cache_dir=/path/to/a/warm/cache]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train(seed: int, out: Path, extra: dict) -> list[dict]:
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from common.data import validation_phantoms
    from common.engines import LungMapDice
    from common.networks import save_network, unwrap

    configs = REPO / "bundles" / "foundation_clip" / "configs"
    wf = ConfigWorkflow(
        config_file=[str(configs / "train.json"), str(configs / "demo.json")],
        workflow_type="train",
        logging_file=False,
        bundle_root=str(REPO / "bundles" / "foundation_clip"),
        output_dir=str(out),
        ckpt_dir=str(out / "models"),
        seed=seed,
        **extra,
    )
    wf.initialize()
    evaluator, network = wf.parser.get_parsed_content("validate#evaluator"), wf.parser.get_parsed_content("network")
    preprocessing = wf.parser.get_parsed_content("model_preprocessing")
    cases = validation_phantoms(
        wf.parser.get_parsed_content("manifest"),
        wf.parser.get_parsed_content("val_phantoms"),
        wf.parser.get_parsed_content("exclude_cases"),
    )
    LungMapDice(network, cases, preprocessing).attach(
        evaluator, "val_lung_map_dice"
    )  # before the handlers that read it

    def keep_epoch(engine) -> None:
        model = unwrap(network)
        model.preprocessing = {**model.preprocessing, **preprocessing}
        save_network(model, out / "epochs" / f"epoch_{engine.state.epoch}.pt")

    evaluator.add_event_handler(Events.EPOCH_COMPLETED, keep_epoch)
    wf.run()
    wf.finalize()
    return json.loads((out / "metrics_history.json").read_text())["history"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra bundle overrides (Python literals or strings)"
    )
    args = ap.parse_args(argv)
    extra = {}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            extra[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[key] = value
    out = Path(args.out).resolve()
    history = train(args.seed, out, extra)
    print("| epoch | held-out patch accuracy | lung-map Dice | distillation cosine |")
    print("|---|---|---|---|")
    for row in history:
        print(
            f"| {row['epoch']} | {row['val_zero_shot_acc']:.4f} | {row['val_lung_map_dice']:.4f} | {row['val_distill_cosine']:.4f} |"
        )
    by_acc = max(history, key=lambda r: r["val_zero_shot_acc"])["epoch"]
    by_map = max(history, key=lambda r: r["val_lung_map_dice"])["epoch"]
    print(
        f"seed {args.seed}: patch accuracy picks epoch {by_acc} ({out / 'epochs' / f'epoch_{by_acc}.pt'}), "
        f"the lung map picks epoch {by_map} ({out / 'epochs' / f'epoch_{by_map}.pt'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
