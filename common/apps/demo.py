"""``make demo``: the whole pipeline on the embedded default data, with a report.

    python -m common.apps.demo [--out outputs/demo] [--size demo|smoke] [--seed 0] [--retrain]

In order, each learning stage through ``python -m monai.bundle run ... --tracking mlflow`` (every run goes
into one MLflow store, ``<out>/mlruns.db``, experiment ``demo``):

1. ingest every default case, automated QC (excluded cases listed with reasons), the standard
   preprocessing of the cases that pass, phantom ground truth;
2. SA-1 ``foundation_clip``: the CLIP-like model distilled from LiteMedSAM on the real scans and phantoms
   (the recipe of the shipped model: ``train.json`` + ``demo.json``);
3. SA-2 ``probmap``: zero-shot probability maps and lung masks of the held-out phantoms (scored against their
   truth), of the training scans (phantoms and real CT) and of the held-out real scan;
4. SA-3a ``pseudolabel``: SAM prompts from those maps, pseudo labels of the held-out phantoms (scored) and of
   the training scans, whose QC picks H-SAM's training and validation cases;
5. SA-3b ``hsam_finetune``: H-SAM trained on the training scans' pseudo labels (real and phantom), scored on
   the held-out phantoms, and run on the held-out real scan;
6. the shipped models (``bundles/*/models/model.pt``) on the same held-out real scan, so the report puts the
   demo's models next to them (label-free measures: no stage of either chain trained on that scan).

A size (:data:`SIZES`) says how much of each: ``demo`` is what ``make demo`` runs on 2 CPU cores; ``smoke`` is
the smallest chain that still runs every step (tiny phantoms and tiny random networks; the chain test of
``make test``). ``--seed`` seeds SA-1 (the spread study of docs/reproducibility.md runs 0, 1 and 2). A
finished step is not run again (``--retrain`` runs them all again). The report is
``<out>/report/index.html`` with ``metrics.json``.
"""

from __future__ import annotations

import argparse
import sys
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path


from common.apps.pipeline import (
    BUNDLES,
    Step,
    case_reports,
    clock,
    link_scan,
    linked_scan,
    run_steps,
    start_python_server,
)
from common.default_data import DEFAULT_OUT, PHANTOM_SHAPE, PHANTOM_SPACING, load_manifest
from common.apps.demo_ingest import DEMO_SPACING, run_ingest

log = logging.getLogger(__name__)
HELDOUT_SEED, TRAIN_SEED = 100, 200  # phantom seeds SA-1 never saw (its phantoms are 0-9)
SHIPPED = {
    "clip": BUNDLES / "foundation_clip" / "models" / "model.pt",
    "hsam": BUNDLES / "hsam_finetune" / "models" / "model.pt",
}


@dataclass(frozen=True)
class DemoSize:
    """How much the demo runs: phantoms (their grid, how many held out and how many for training), which real
    scans of the manifest train (their pseudo labels, with the phantoms', train H-SAM) and which are held out of
    every stage (the demo's and the shipped models are compared there), and each bundle's overrides."""

    name: str
    phantom_shape: tuple[int, int, int]
    phantom_spacing: tuple[float, float, float]
    heldout_phantoms: int
    training_phantoms: int
    real_training: tuple[str, ...]
    real_heldout: tuple[str, ...]
    clip: dict = field(default_factory=dict)  # on SA-1's train.json + demo.json
    probmap: dict = field(default_factory=dict)
    pseudolabel: dict = field(default_factory=dict)
    hsam_configs: tuple[str, ...] = ("train.json", "demo.json")
    hsam: dict = field(default_factory=dict)
    hsam_inference: dict = field(default_factory=dict)
    smoke_manifest: bool = (
        False  # SA-1 and ingest read <out>/data (tiny phantoms + the real training scans), not make data's manifest
    )
    heldout_seed: int = HELDOUT_SEED
    preprocessing_spacing: tuple[float, float, float] = DEMO_SPACING  # the ingest step's resampling

    @property
    def compare_shipped(self) -> bool:
        return bool(self.real_heldout)


SIZES = {
    # 2 CPU cores: phantoms of 40 slices of 6 mm (the standard one has 96 of 2.5 mm); SA-1 as the shipped model was
    # trained (demo.json: both Lung-PET-CT-Dx series held out, 8 epochs, 2 teacher views; 5 epochs of one view gave
    # maps of the real scans that QC rejected, docs/reproducibility.md); H-SAM on A0002's and DeepLesion's pseudo
    # labels with the phantom's, its checkpoint chosen on the validation scan and on the slices between the training
    # slices of every training scan (one 13-slice crop alone chose over-segmenting checkpoints on 2 of 3 SA-1 seeds,
    # docs/reproducibility.md); Lung-PET-CT-Dx A0001 (Philips, 5 mm) is the real scan no stage of either chain trained on.
    "demo": DemoSize(
        "demo",
        (PHANTOM_SHAPE[0], PHANTOM_SHAPE[1], 40),
        (PHANTOM_SPACING[0], PHANTOM_SPACING[1], PHANTOM_SHAPE[2] * PHANTOM_SPACING[2] / 40),
        heldout_phantoms=1,
        training_phantoms=1,
        real_training=("lung_pet_ct_dx_a0002", "deeplesion_000001_01_01", "deeplesion_000001_02_01"),
        real_heldout=("lung_pet_ct_dx_a0001",),
        hsam={
            "max_epochs": 6,
            "slice_step": 2,
            "val_slice_step": 2,
            "validate_between_slices": True,
            "feature_cache_views": 1,
        },
    ),
    # the smallest chain that runs every step: tiny phantoms, tiny random networks in every stage, SA-2's threshold
    # and SA-3a's QC that admit everything: a test of the plumbing, not of the method
    "smoke": DemoSize(
        "smoke",
        (64, 64, 12),
        (5.0, 5.0, 20.0),
        heldout_phantoms=1,
        training_phantoms=1,
        real_training=("deeplesion_000001_01_01",),
        real_heldout=(),
        clip={
            "pretrained_image_encoder": False,
            "image_encoder": "tiny_cnn",
            "image_encoder_kwargs": {"out_channels": 16, "width": 8},
            "embed_dim": 16,
            "teacher_variant": "tiny_sam",
            "teacher_random_init": True,
            "teacher_pool_to": 4,
            "teacher_views": 1,
            "slice_size": 64,
            "num_slices": 2,
            "phantom_slices": 2,
            "patch_mm": 60.0,
            "patch_size": 32,
            "patches_per_class": 1,
            "image_size": 32,
            "train_text_encoder": False,
            "batch_size": 8,
            "num_workers": 0,
            "max_epochs": 1,
            "warmup_epochs": 0,
            "val_phantoms": 1,
            "exclude_cases": [],
        },
        probmap={
            "tau": 0.0
        },  # a random SA-1 gives no lung above the real threshold; 0 keeps the body, so SA-3a has a box to prompt
        pseudolabel={
            "sam_variant": "tiny_sam",
            "network_def#random_init": True,
            "overlap_threshold": 0.0,
            "qc": {
                "min_predicted_iou": 0.0,
                "min_agreement": 0.0,
                "min_kept_share": 0.0,
                "lung_ml_range": [0.0, 1.0e9],
            },
        },
        hsam_configs=("train.json",),
        hsam={
            "sam_variant": "tiny_sam",
            "sam_random_init": True,
            "slice_size": 64,
            "max_epochs": 1,
            "batch_size": 4,
            "num_workers": 0,
            "boundary_ignore_px": 2,
        },
        hsam_inference={"network_def#random_init": True, "progress": False},
        smoke_manifest=True,
    ),
}


def demo_steps(out: Path, size: DemoSize = SIZES["demo"], seed: int = 0) -> list[Step]:
    """The demo's bundle runs, in order. All paths absolute so the commands run from anywhere.

    Folders of scans: ``training_scans`` (training phantoms and links to the real training scans), whose pseudo
    labels train H-SAM, and ``heldout_scans`` (links to the real scans no stage trains on)."""
    out = out.resolve()
    clip_ckpt = out / "foundation_clip" / "models" / "model.pt"
    hsam_ckpt = out / "hsam_finetune" / "models" / "model.pt"
    training, heldout_real = out / "training_scans", out / "heldout_scans"
    training_ids = [f"train_phantom_{i:03d}_ct" for i in range(size.training_phantoms)] + list(size.real_training)
    heldout = {
        "phantom_dir": str(out / "phantoms_heldout"),
        "phantom_seed": size.heldout_seed,
        "phantom_prefix": "heldout_phantom",
        "n_phantoms": size.heldout_phantoms,
        "phantom_shape": list(size.phantom_shape),
        "phantom_spacing": list(size.phantom_spacing),
    }
    clip = {
        "output_dir": str(out / "foundation_clip"),
        "ckpt_dir": str(out / "foundation_clip" / "models"),
        "seed": seed,
        **size.clip,
    }
    if size.smoke_manifest:
        clip.update({"dataset_dir": str(out / "data"), "teacher_cache_dir": str(out / "teacher_cache")})
    probmap = lambda ckpt, **o: {"ckpt_path": str(ckpt), **size.probmap, **o}  # noqa: E731
    training_reports = case_reports(out / "probmap" / "training_scans", training_ids, "probmap.json")
    steps = [
        Step(
            "clip",
            "foundation_clip_train",
            "foundation_clip",
            ["train.json", "demo.json"],
            clip,
            clip_ckpt,
            "SA-1: train the CLIP-like model (LiteMedSAM teacher) on the real scans and phantoms",
            extra_done=[out / "foundation_clip" / "metrics_history.json"],
        ),
        Step(
            "probmap",
            "probmap_heldout_phantoms",
            "probmap",
            ["inference.json", "evaluate.json"],
            probmap(clip_ckpt, **heldout, output_dir=str(out / "probmap" / "heldout_phantoms")),
            out / "probmap" / "heldout_phantoms" / "scores.json",
            "SA-2: probability maps and lung masks of the held-out phantoms, scored",
        ),
        Step(
            "probmap",
            "probmap_training_scans",
            "probmap",
            ["inference.json"],
            probmap(clip_ckpt, dataset_dir=str(training), output_dir=str(out / "probmap" / "training_scans")),
            training_reports[0],
            "SA-2: probability maps of the training scans (phantoms and real CT)",
            extra_done=training_reports[1:],
        ),
        Step(
            "pseudolabel",
            "pseudolabel_heldout_phantoms",
            "pseudolabel",
            ["inference.json", "evaluate.json"],
            {
                **heldout,
                **size.pseudolabel,
                "probmap_dir": str(out / "probmap" / "heldout_phantoms"),
                "output_dir": str(out / "pseudolabel" / "heldout_phantoms"),
            },
            out / "pseudolabel" / "heldout_phantoms" / "datalist.json",
            "SA-3a: pseudo labels of the held-out phantoms, scored",
            extra_done=[out / "pseudolabel" / "heldout_phantoms" / "scores.json"],
        ),
        Step(
            "pseudolabel",
            "pseudolabel_training_scans",
            "pseudolabel",
            ["inference.json"],
            {
                **size.pseudolabel,
                "dataset_dir": str(training),
                "probmap_dir": str(out / "probmap" / "training_scans"),
                "output_dir": str(out / "pseudolabel" / "training_scans"),
            },
            out / "pseudolabel" / "training_scans" / "datalist.json",
            "SA-3a: pseudo labels of the training scans; QC picks H-SAM's training and validation cases",
        ),
        Step(
            "hsam",
            "hsam_finetune_train",
            "hsam_finetune",
            list(size.hsam_configs),
            {
                "datalist_path": str(out / "pseudolabel" / "training_scans" / "datalist.json"),
                "ckpt_path": str(hsam_ckpt),
                "output_dir": str(out / "hsam_finetune" / "train"),
                **size.hsam,
            },
            hsam_ckpt,
            "SA-3b: train H-SAM (LoRA encoder, two decoders) on the pseudo labels",
            extra_done=[out / "hsam_finetune" / "train" / "metrics_history.json"],
        ),
        Step(
            "hsam",
            "hsam_finetune_heldout_phantoms",
            "hsam_finetune",
            ["inference.json", "evaluate.json"],
            {
                "ckpt_path": str(hsam_ckpt),
                **heldout,
                **size.hsam_inference,
                "output_dir": str(out / "hsam_finetune" / "heldout_phantoms"),
            },
            out / "hsam_finetune" / "heldout_phantoms" / "scores.json",
            "SA-3b: H-SAM lung masks of the held-out phantoms, scored",
        ),
    ]
    # the held-out real scans: SA-2 then H-SAM on the slices SA-2's mask touches (as make segment does), with the
    # demo's models and with the shipped ones
    models = [("demo", clip_ckpt, hsam_ckpt, "hsam")] if size.real_heldout else []
    if size.compare_shipped:
        missing = [str(p) for p in SHIPPED.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"the shipped models are missing: {', '.join(missing)} (they are committed: check out the repository again)"
            )
        models.append(("shipped", SHIPPED["clip"], SHIPPED["hsam"], "shipped"))
    for who, clip_file, hsam_file, stage in models:
        maps = out / "probmap" / f"heldout_real_{who}"
        cases = [
            {
                "image": str(linked_scan(heldout_real, c)),
                "case_id": c,
                "region": str(maps / c / f"{c}_lung_mask.nii.gz"),
            }
            for c in size.real_heldout
        ]
        reports = case_reports(maps, list(size.real_heldout), "probmap.json")
        steps.append(
            Step(
                stage if who == "shipped" else "probmap",
                f"probmap_heldout_real_{who}",
                "probmap",
                ["inference.json"],
                probmap(clip_file, dataset_dir=str(heldout_real), output_dir=str(maps)),
                reports[0],
                f"SA-2 ({who} SA-1 model): maps of the real scan no stage trained on",
                extra_done=reports[1:],
            )
        )
        seg = out / "hsam_finetune" / f"heldout_real_{who}"
        reports = case_reports(seg, list(size.real_heldout), "report.json")
        steps.append(
            Step(
                stage,
                f"hsam_finetune_heldout_real_{who}",
                "hsam_finetune",
                ["inference.json"],
                {
                    "ckpt_path": str(hsam_file),
                    "cases": cases,
                    **(size.hsam_inference if who == "demo" else {}),
                    "output_dir": str(seg),
                },
                reports[0],
                f"SA-3b ({who} H-SAM model): lung mask of the real scan no stage trained on",
                extra_done=reports[1:],
            )
        )
    return steps


def prepare_scans(out: Path, size: DemoSize = SIZES["demo"], data_dir: Path = DEFAULT_OUT) -> None:
    """The demo's scan folders: training phantoms generated into ``training_scans`` with links to the real
    training scans beside them, and links to the held-out real scans in ``heldout_scans``."""
    from common.default_data import make_phantoms

    out = out.resolve()
    cases = {c["id"]: c for c in load_manifest(data_dir)["cases"]}
    make_phantoms(
        out / "training_scans",
        size.training_phantoms,
        seed=TRAIN_SEED,
        prefix="train_phantom",
        shape=size.phantom_shape,
        spacing=size.phantom_spacing,
    )
    for folder, ids in (("training_scans", size.real_training), ("heldout_scans", size.real_heldout)):
        for case_id in ids:
            if case_id not in cases:
                raise ValueError(
                    f"{data_dir / 'manifest.json'}: the demo's real scan {case_id} is not listed (run `make data` again)"
                )
            source = Path(cases[case_id]["path"]).resolve()
            if not source.exists():
                raise FileNotFoundError(
                    f"{source}: the demo's real scan {case_id} is missing (../shared/data, see its README)"
                )
            link_scan(out / folder, case_id, source)


def prepare_smoke_data(out: Path, size: DemoSize) -> Path:
    """``<out>/data/manifest.json`` for the smoke size: two tiny phantoms (SA-1's training and validation
    patches) and the real training scans, as ``make data`` lists them."""
    from common.default_data import make_phantoms, shared_cases
    from common.io import write_json_atomic

    data = out.resolve() / "data"
    real = [c for c in shared_cases() if c["id"] in size.real_training]
    cases = real + make_phantoms(data / "phantoms", 2, seed=0, shape=size.phantom_shape, spacing=size.phantom_spacing)
    write_json_atomic(data / "manifest.json", {"cases": cases, "notes": [f"the demo's {size.name} size"]})
    return data


# --------------------------------------------------------------------------- the demo


def run_demo(
    out: Path, data_dir: Path = DEFAULT_OUT, retrain: bool = False, size: DemoSize = SIZES["demo"], seed: int = 0
) -> dict:
    from common.apps.demo_report import build_report

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if size.smoke_manifest:
        data_dir = prepare_smoke_data(out, size)
    fig_dir = out / "report" / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    start_python_server()  # the steps' process server imports torch, MONAI and the rest while ingest runs
    print(f"==> ingest, automated QC and preprocessing of the default data ({data_dir / 'manifest.json'})", flush=True)
    t = time.perf_counter()
    ingest = run_ingest(out, data_dir, fig_dir)
    ingest["seconds"] = time.perf_counter() - t
    prepare_scans(out, size, data_dir)  # before the steps are listed: they name the linked scans
    steps = demo_steps(out, size, seed)
    failure = None
    try:
        run_steps(steps, out, retrain=retrain, started=started)
    except RuntimeError as err:  # the report still shows what finished, and the failure
        failure = str(err)
    print(f"==> report (elapsed {clock(time.perf_counter() - started)})", flush=True)
    metrics = build_report(
        out,
        ingest,
        steps,
        size=size,
        seed=seed,
        data_dir=data_dir,
        failure=failure,
        total_seconds=time.perf_counter() - started,
    )
    if failure:
        raise SystemExit(f"demo stopped: {failure}\nreport so far: {out / 'report' / 'index.html'}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument(
        "--data", default=str(DEFAULT_OUT), help="make data's folder (its manifest.json); the smoke size writes its own"
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="demo",
        help="demo: make demo's size; smoke: the smallest chain (make test)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="SA-1's seed (MONAI set_determinism); the other stages keep theirs"
    )
    parser.add_argument("--retrain", action="store_true", help="run every step again, even those already finished")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = Path(args.out)
    try:
        metrics = run_demo(out, Path(args.data), retrain=args.retrain, size=SIZES[args.size], seed=args.seed)
    except (FileNotFoundError, ValueError) as err:  # missing data or shipped models: one line, no traceback
        print(f"demo: {err}", file=sys.stderr)
        return 2
    print(metrics["summary_text"])
    print(f"report: {out / 'report' / 'index.html'} and {out / 'report' / 'metrics.json'}")
    print(f"MLflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///{(out / 'mlruns.db').resolve()} --port 5000")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
