"""``make release``: re-train the shipped models from the shared data and write them where the bundles keep them.

    python -m common.apps.release [--out outputs/release] [--retrain] [--no-export]

The chain, each step a ``python -m monai.bundle run ... --tracking mlflow`` (MLflow store ``<out>/mlruns.db``,
experiment ``release``), a finished step skipped on re-run:

1. SA-1 ``foundation_clip`` at the CPU size (``train.json`` + ``demo.json``): image-text pairs and the
   LiteMedSAM distillation loss on the real scans of ``make data``'s manifest (unlabelled; ``demo.json``'s
   ``exclude_cases`` holds the two Lung-PET-CT-Dx series out, as the shipped SA-1 was trained: docs/real_ct.md says
   what adding A0002 measured), plus the phantoms' patches;
2. SA-2 ``probmap`` on every real scan (``../shared/data``, pyradiomics) and on two training phantoms;
3. SA-3a ``pseudolabel`` on the same scans; its QC picks H-SAM's training and validation cases;
4. SA-3b ``hsam_finetune`` on those pseudo labels, real and phantom (``train.json`` + ``demo.json`` +
   ``release.json``: the frozen encoder stages cached per slice and augmentation view);
5. export: the trained tensors only, float16, to ``bundles/foundation_clip/models/model.pt`` and
   ``bundles/hsam_finetune/models/model.pt`` (:func:`common.networks.release_checkpoint`).

6. the released H-SAM on every real scan, and ``benchmarks/real_ct_labelfree.py``'s label-free table of the bundle
   docs (H-SAM, SA-2, SA-3a; overlays at base, middle and apex) under ``<out>/labelfree``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common.apps.demo import SIZES
from common.apps.pipeline import BUNDLES, REPO_ROOT, Step, run_steps, script_step

PHANTOM_SHAPE, PHANTOM_SPACING = (
    SIZES["demo"].phantom_shape,
    SIZES["demo"].phantom_spacing,
)  # the demo's training phantoms

TRAIN_SEED = 200  # training phantoms: seeds no score uses (SA-1's are 0-9, the held-out ones 100+)


def scan_sets(out: Path) -> dict[str, Path]:
    """The folders SA-2 and SA-3a run on: every real scan of ``../shared/data``, pyradiomics' two, the training phantoms."""
    from common.default_data import shared_data_dir

    return {
        "shared": shared_data_dir().resolve(),
        "pyradiomics": REPO_ROOT / "data" / "default" / "pyradiomics",
        "phantoms": out / "training_phantoms",
    }


def prepare(out: Path) -> None:
    from common.default_data import make_phantoms

    make_phantoms(
        out / "training_phantoms",
        2,
        seed=TRAIN_SEED,
        prefix="train_phantom",
        shape=PHANTOM_SHAPE,
        spacing=PHANTOM_SPACING,
    )


def release_steps(out: Path, clip_ckpt: Path | None = None) -> list[Step]:
    """The chain's bundle runs; ``clip_ckpt`` (e.g. the shipped SA-1 file) skips SA-1 training and maps with that model."""
    out = out.resolve()
    hsam_ckpt = out / "hsam_finetune" / "models" / "model.pt"
    sets = scan_sets(out)
    steps = []
    if clip_ckpt is None:
        clip_ckpt = out / "foundation_clip" / "models" / "model.pt"
        steps.append(
            Step(
                "clip",
                "foundation_clip_train",
                "foundation_clip",
                ["train.json", "demo.json"],
                {"output_dir": str(out / "foundation_clip"), "ckpt_dir": str(out / "foundation_clip" / "models")},
                clip_ckpt,
                "SA-1: the CLIP-like model, real scans and phantoms, LiteMedSAM teacher",
            )
        )
    elif not Path(clip_ckpt).is_file():
        raise FileNotFoundError(f"--clip-ckpt {clip_ckpt}: no such SA-1 checkpoint")
    from common.data import scan_datalist
    from common.transforms import probmap_outputs

    for name, folder in sets.items():
        ids = [c["case_id"] for c in scan_datalist(folder)] if folder.exists() else [f"{name}_scan"]
        reports = [
            probmap_outputs(out / "probmap" / name, i)["report"] for i in ids
        ]  # each case's report is written last
        steps.append(
            Step(
                "probmap",
                f"probmap_{name}",
                "probmap",
                ["inference.json"],
                {"ckpt_path": str(clip_ckpt), "dataset_dir": str(folder), "output_dir": str(out / "probmap" / name)},
                reports[0],
                f"SA-2: probability maps of {name}",
                extra_done=reports[1:],
            )
        )
    for name, folder in sets.items():
        steps.append(
            Step(
                "pseudolabel",
                f"pseudolabel_{name}",
                "pseudolabel",
                ["inference.json"],
                {
                    "dataset_dir": str(folder),
                    "probmap_dir": str(out / "probmap" / name),
                    "output_dir": str(out / "pseudolabel" / name),
                },
                out / "pseudolabel" / name / "datalist.json",
                f"SA-3a: pseudo labels of {name}",
            )
        )
    datalists = [str(out / "pseudolabel" / name / "datalist.json") for name in sets]
    steps.append(
        Step(
            "hsam",
            "hsam_finetune_train",
            "hsam_finetune",
            ["train.json", "demo.json", "release.json"],
            {
                "datalist_path": datalists,
                "ckpt_path": str(hsam_ckpt),
                "output_dir": str(out / "hsam_finetune" / "train"),
            },
            hsam_ckpt,
            "SA-3b: H-SAM on the real and phantom pseudo labels (cached frozen encoder stages)",
            extra_done=[out / "hsam_finetune" / "train" / "metrics_history.json"],
        )
    )
    return steps


def labelfree_steps(out: Path, hsam_ckpt: Path) -> list[Step]:
    """After the export: H-SAM (``hsam_ckpt``) on every real scan, then the label-free real-CT table of the bundle
    docs (``benchmarks/real_ct_labelfree.py``, with overlays) of H-SAM, SA-2 and SA-3a."""
    steps = []
    for name, folder in scan_sets(out).items():
        if name == "phantoms":
            continue
        seg = out / "hsam" / name
        steps.append(
            Step("hsam", f"hsam_{name}", "hsam_finetune", ["inference.json"],
                 {"ckpt_path": str(hsam_ckpt), "dataset_dir": str(folder), "output_dir": str(seg)}, None,
                 f"SA-3b: the released H-SAM on {name}")
        )  # fmt: skip
        methods = {"H-SAM": seg, "SA-2": out / "probmap" / name, "SA-3a": out / "pseudolabel" / name}
        argv = ["real_ct_labelfree.py", "--scans", str(folder), "--probmap-dir", str(out / "probmap" / name)]
        argv += [a for m, d in methods.items() for a in ("--method", f"{m}={d}")]
        argv += ["--out", str(out / "labelfree" / name), "--overlays"]
        steps.append(script_step(f"labelfree_{name}", argv, f"label-free real-CT table of {name}"))
    return steps


def export(out: Path, clip_trained: bool = True) -> list[Path]:
    """The trained models into the bundles (:func:`common.networks.release_checkpoint`); ``clip_trained=False``
    (the chain re-used an SA-1 file) leaves SA-1's as it is."""
    from common.networks import release_checkpoint

    stages = (["foundation_clip"] if clip_trained else []) + ["hsam_finetune"]
    return [
        release_checkpoint(out / stage / "models" / "model.pt", BUNDLES / stage / "models" / "model.pt")
        for stage in stages
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/release")
    ap.add_argument("--retrain", action="store_true", help="run every step again")
    ap.add_argument("--no-export", action="store_true", help="train only; leave bundles/*/models/model.pt as they are")
    ap.add_argument(
        "--clip-ckpt",
        default=None,
        help="an SA-1 checkpoint to map with instead of training one (e.g. the shipped "
        "bundles/foundation_clip/models/model.pt); SA-1's shipped file is then left as it is",
    )
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepare(out)  # the phantom folder exists before the steps list its scans
    clip_ckpt = Path(args.clip_ckpt).resolve() if args.clip_ckpt else None
    try:
        steps = release_steps(out, clip_ckpt)
    except FileNotFoundError as err:
        print(f"release: {err}", file=sys.stderr)
        return 2
    try:
        for s in steps:
            s.experiment = "release"
        run_steps(steps, out, retrain=args.retrain, started=started, prepare=prepare)
    except RuntimeError as err:
        print(f"release stopped: {err}", file=sys.stderr)
        return 1
    for s in steps:
        print(f"{s.name}: {s.status} ({(s.seconds or 0) / 60:.1f} min)")
    hsam_ckpt = out / "hsam_finetune" / "models" / "model.pt"
    if not args.no_export:
        for p in export(out, clip_trained=clip_ckpt is None):
            print(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
        hsam_ckpt = BUNDLES / "hsam_finetune" / "models" / "model.pt"
    tables = labelfree_steps(out, hsam_ckpt)
    try:
        for s in tables:
            s.experiment = "release"
        run_steps(tables, out, retrain=True, started=started)  # the released model's answers, made afresh
    except RuntimeError as err:
        print(f"release stopped: {err}", file=sys.stderr)
        return 1
    print(f"release chain: {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
