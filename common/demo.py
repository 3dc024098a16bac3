"""``make demo``: the whole pipeline on the embedded default data, with a report.

    python -m common.demo [--out outputs/demo] [--retrain]

In order, each learning stage through ``python -m monai.bundle run ... --tracking mlflow`` (every run goes
into one MLflow store, ``<out>/mlruns.db``, experiment ``demo``):

1. ingest every default case, automated QC (excluded cases listed with reasons), the standard
   preprocessing of the cases that pass, phantom ground truth;
2. SA-1 ``foundation_clip``: the CLIP-like model distilled from LiteMedSAM, demo size;
3. SA-2 ``probmap``: zero-shot probability maps and lung masks of two held-out phantoms (scored against
   their truth), two training phantoms and a real TotalSegmentator chest crop;
4. SA-3a ``pseudolabel``: SAM prompts from those maps, pseudo labels of the held-out phantoms (scored)
   and of the training phantoms, whose QC picks H-SAM's training and validation cases;
5. SA-3b ``hsam_finetune``: H-SAM trained on the training phantoms' pseudo labels, then scored on the
   held-out phantoms against the HU threshold and the pseudo labels, and run on the real crop (which it
   never saw: H-SAM learns from phantoms alone here).

Demo size (2 CPU cores, under 45 minutes from a fresh clone): phantoms of 40 slices of 6 mm (the
standard phantom has 96 of 2.5 mm), two of each kind, and H-SAM at 256 px on every slice of its training
phantom for 3 epochs. A finished step is not run again (``--retrain`` runs them all again). The report is
``<out>/report/index.html`` with ``metrics.json`` (sections ``clip``, ``probmap``, ``pseudolabel``, ``hsam``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.default_data import DEFAULT_OUT, PHANTOM_SHAPE, PHANTOM_SPACING, load_manifest, shared_data_dir
from common.io.volume import reorient_array
from common.lungmask import hu_threshold_lung_mask, split_left_right
from common.metrics import dice_score
from common.qc import CaseRef, qc_case, write_qc_report
from common.demo_report import REAL_SCANS, _clock
from common.report import LUNG_WINDOW, save_overlay_png

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = REPO_ROOT / "bundles"
# Demo-size preprocessing: 1.5 mm in-plane keeps the lungs' shape and is fast on 2 CPU cores.
DEMO_SPACING = (1.5, 1.5, 2.5)
# Demo phantoms: the standard field of view and extent in 40 slices of 6 mm (the standard phantom: 96 of 2.5 mm).
DEMO_PHANTOM_SHAPE = (PHANTOM_SHAPE[0], PHANTOM_SHAPE[1], 40)
DEMO_PHANTOM_SPACING = (PHANTOM_SPACING[0], PHANTOM_SPACING[1], PHANTOM_SHAPE[2] * PHANTOM_SPACING[2] / 40)
DEMO_PHANTOMS = 2  # held-out and training phantoms each
HELDOUT_SEED, TRAIN_SEED = 100, 200  # seeds SA-1 never saw (its phantoms are 0-9)
REAL_CASE = "chest_crop_b"  # the smaller real TotalSegmentator chest crop in ../shared/data
# H-SAM at demo size: the hsam CPU recipe (demo.json: 256 px, LoRA on the last encoder stage, boundary-ignore
# band) on every slice of the training phantom for 3 epochs (every 4th slice: 9 steps, and it learned
# nothing), validated on every 4th slice of the validation phantom.
HSAM_DEMO = {"max_epochs": 3, "slice_step": 1, "val_slice_step": 4}
STAGES = ("clip", "probmap", "pseudolabel", "hsam")


@dataclass
class Step:
    """One ``monai.bundle run`` of the demo: which bundle, which configs, which overrides, and the file whose
    presence means the step finished (so a re-run skips it)."""

    stage: str
    name: str
    bundle: str
    configs: list[str]
    overrides: dict
    done_file: Path
    what: str
    seconds: float | None = None
    status: str = "not run"
    extra_done: list[Path] = field(default_factory=list)
    cmd: str = ""  # the command as run, for the report
    experiment: str = "demo"  # the MLflow experiment

    def command(self, tracking_uri: str, overwrite: bool = False) -> list[str]:
        """The ``monai.bundle run`` command line; ``overwrite`` redoes cases an inference run already wrote
        (which it would otherwise skip)."""
        bundle_root = BUNDLES / self.bundle
        configs = [str(bundle_root / "configs" / c) for c in self.configs]
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs) if len(configs) > 1 else configs[0],
               "--bundle_root", str(bundle_root)]
        overrides = {**self.overrides, "overwrite": True} if overwrite and "inference.json" in self.configs else self.overrides
        for key, value in overrides.items():
            cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        return cmd + ["--tracking", "mlflow", "--tracking_uri", tracking_uri, "--experiment_name", self.experiment, "--run_name", self.name]

    def finished(self, since: float | None = None) -> bool:
        """All the step's done files exist (and, with ``since``, were written at or after that ``time.time()``)."""
        files = [Path(p) for p in [self.done_file, *self.extra_done]]
        return all(f.is_file() and (since is None or f.stat().st_mtime >= since) for f in files)


def demo_steps(out: Path) -> list[Step]:
    """The demo's bundle runs, in order. All paths absolute so the commands run from anywhere.

    Two folders of scans: ``training_scans`` (the training phantoms), whose pseudo labels train H-SAM, and
    ``real_scans`` (a link to the real CT), which SA-2 maps and H-SAM segments for the report. The real CT
    is not pseudo-labelled: H-SAM would not train on it anyway (at demo size its pseudo label fails QC)."""
    out = out.resolve()
    clip_ckpt = out / "foundation_clip" / "models" / "model.pt"
    hsam_ckpt = out / "hsam_finetune" / "models" / "model.pt"
    training, real = out / "training_scans", out / "real_scans"
    training_ids = [f"train_phantom_{i:03d}_ct" for i in range(DEMO_PHANTOMS)]
    heldout = {"phantom_dir": str(out / "phantoms_heldout"), "phantom_seed": HELDOUT_SEED, "phantom_prefix": "heldout_phantom",
               "n_phantoms": DEMO_PHANTOMS, "phantom_shape": list(DEMO_PHANTOM_SHAPE), "phantom_spacing": list(DEMO_PHANTOM_SPACING)}
    return [
        Step("clip", "foundation_clip_train", "foundation_clip", ["train.json", "demo.json"],
             {"output_dir": str(out / "foundation_clip"), "ckpt_dir": str(out / "foundation_clip" / "models")},
             clip_ckpt, "SA-1: train the CLIP-like model (LiteMedSAM teacher), demo size", extra_done=[out / "foundation_clip" / "metrics_history.json"]),
        Step("probmap", "probmap_heldout_phantoms", "probmap", ["inference.json", "evaluate.json"],
             {"ckpt_path": str(clip_ckpt), **heldout, "output_dir": str(out / "probmap" / "heldout_phantoms")},
             out / "probmap" / "heldout_phantoms" / "scores.json", "SA-2: probability maps and lung masks of the held-out phantoms, scored"),
        Step("probmap", "probmap_training_scans", "probmap", ["inference.json"],
             {"ckpt_path": str(clip_ckpt), "dataset_dir": str(training), "output_dir": str(out / "probmap" / "training_scans")},
             *_case_reports(out / "probmap" / "training_scans", training_ids[:1], "probmap.json"), "SA-2: probability maps of the training phantoms",
             extra_done=_case_reports(out / "probmap" / "training_scans", training_ids[1:], "probmap.json")),
        Step("probmap", "probmap_real", "probmap", ["inference.json"],
             {"ckpt_path": str(clip_ckpt), "dataset_dir": str(real), "output_dir": str(out / "probmap" / "real_scans")},
             *_case_reports(out / "probmap" / "real_scans", [REAL_CASE], "probmap.json"), "SA-2: probability map and lung mask of the real CT"),
        Step("pseudolabel", "pseudolabel_heldout_phantoms", "pseudolabel", ["inference.json", "evaluate.json"],
             {**heldout, "probmap_dir": str(out / "probmap" / "heldout_phantoms"), "output_dir": str(out / "pseudolabel" / "heldout_phantoms")},
             out / "pseudolabel" / "heldout_phantoms" / "datalist.json", "SA-3a: pseudo labels of the held-out phantoms, scored",
             extra_done=[out / "pseudolabel" / "heldout_phantoms" / "scores.json"]),
        Step("pseudolabel", "pseudolabel_training_scans", "pseudolabel", ["inference.json"],
             {"dataset_dir": str(training), "probmap_dir": str(out / "probmap" / "training_scans"), "output_dir": str(out / "pseudolabel" / "training_scans")},
             out / "pseudolabel" / "training_scans" / "datalist.json", "SA-3a: pseudo labels of the training phantoms; QC picks H-SAM's training and validation cases"),
        Step("hsam", "hsam_finetune_train", "hsam_finetune", ["train.json", "demo.json"],
             {"datalist_path": str(out / "pseudolabel" / "training_scans" / "datalist.json"), "ckpt_path": str(hsam_ckpt),
              "output_dir": str(out / "hsam_finetune" / "train"), **HSAM_DEMO},
             hsam_ckpt, "SA-3b: train H-SAM (LoRA encoder, two decoders) on the pseudo labels", extra_done=[out / "hsam_finetune" / "train" / "metrics_history.json"]),
        Step("hsam", "hsam_finetune_heldout_phantoms", "hsam_finetune", ["inference.json", "evaluate.json"],
             {"ckpt_path": str(hsam_ckpt), **heldout, "output_dir": str(out / "hsam_finetune" / "heldout_phantoms")},
             out / "hsam_finetune" / "heldout_phantoms" / "scores.json", "SA-3b: H-SAM lung masks of the held-out phantoms, scored"),
        Step("hsam", "hsam_finetune_real", "hsam_finetune", ["inference.json"],
             {"ckpt_path": str(hsam_ckpt), "dataset_dir": str(real), "output_dir": str(out / "hsam_finetune" / "real")},
             out / "hsam_finetune" / "real" / REAL_CASE / f"{REAL_CASE}_report.json", "SA-3b: H-SAM lung mask of the real CT"),
    ]


def _case_reports(output_dir: Path, case_ids: list[str], postfix: str) -> list[Path]:
    """Each case's report, written last: a step over several cases is done when all of them exist."""
    return [output_dir / c / f"{c}_{postfix}" for c in case_ids]


def prepare_scans(out: Path) -> None:
    """The demo's scan folders: training phantoms generated into ``training_scans`` (their truth stays unused),
    and the real CT linked into ``real_scans``."""
    from common.default_data import make_phantoms

    out = out.resolve()
    source = shared_data_dir().resolve() / REAL_SCANS / f"{REAL_CASE}.nii.gz"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: the demo's real CT is missing (../shared/data, see its README)")
    make_phantoms(out / "training_scans", DEMO_PHANTOMS, seed=TRAIN_SEED, prefix="train_phantom", shape=DEMO_PHANTOM_SHAPE, spacing=DEMO_PHANTOM_SPACING)
    stale = out / "training_scans" / source.name  # an earlier demo trained on it too
    if stale.is_symlink():
        stale.unlink()
    link = out / "real_scans" / source.name
    if not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)


def run_steps(steps: list[Step], out: Path, retrain: bool = False, started: float | None = None, prepare=prepare_scans) -> None:
    """Run each step as its own ``monai.bundle run`` process (its progress bars and logs on this terminal);
    stop at the first failure with the command to re-run it. ``prepare(out)`` makes the scan folders first."""
    started = time.perf_counter() if started is None else started
    tracking_uri = f"sqlite:///{(out / 'mlruns.db').resolve()}"
    if prepare is not None:
        prepare(out)
    for i, step in enumerate(steps, 1):
        cmd = step.command(tracking_uri, overwrite=retrain)
        step.cmd = shlex.join(cmd)
        if step.finished() and not retrain:
            step.status, step.seconds = "reused", 0.0
            print(f"==> [{i}/{len(steps)}] {step.name}: already finished ({step.done_file}), reused", flush=True)
            continue
        print(f"==> [{i}/{len(steps)}] {step.name}: {step.what} (demo elapsed {_clock(time.perf_counter() - started)})", flush=True)
        t, wall = time.perf_counter(), time.time() - 1.0  # 1 s of slack for coarse file-system clocks
        result = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        step.seconds = time.perf_counter() - t
        # on --retrain the previous run's done files are still there: only files written by this run count
        if result.returncode != 0 or not step.finished(since=wall if retrain else None):
            step.status = "failed"
            why = f"exit {result.returncode}" if result.returncode else f"no {'new ' if retrain else ''}{step.done_file}"
            raise RuntimeError(f"demo step {step.name} failed ({why}) after {_clock(step.seconds)}; re-run it with:\n  {step.cmd}")
        step.status = "ran"
        print(f"    {step.name} done in {_clock(step.seconds)}", flush=True)


# --------------------------------------------------------------------------- ingest + QC


def _case_ref(case: dict) -> CaseRef:
    path = Path(case["path"])
    fmt = "dicom" if case["format"] == "dicom" and path.is_dir() else ("deeplesion_png" if case["format"] == "deeplesion_png" else "file")
    return CaseRef(case["id"], path, fmt)


def _best_slice(mask: np.ndarray) -> int:
    area = mask.sum(axis=(0, 1))
    return int(np.argmax(area)) if area.any() else mask.shape[2] // 2


def run_ingest(out: Path, data_dir: Path, fig_dir: Path) -> dict:
    """Ingest + QC + preprocessing of every default case, HU-threshold lungs drawn on each, phantom truth."""
    from monai.transforms import SaveImage
    from tqdm.auto import tqdm

    from common.io import to_metatensor
    from common.phantom import generate_phantom, render_slice_png
    from common.transforms import ct_preprocessing

    manifest = load_manifest(data_dir)
    records, figures, per_case = [], [], []
    preprocess = ct_preprocessing(load=False, target_spacing=DEMO_SPACING)
    saver = SaveImage(output_dir=str(out / "preprocessed"), output_postfix="preproc", separate_folder=False, print_log=False)
    for case in tqdm(manifest["cases"], desc="ingest + QC + preprocessing", unit="scan"):
        record, vol = qc_case(_case_ref(case))
        records.append(record)
        row = {"case": case["id"], "kind": case["kind"], "qc": "pass" if record.passed else "EXCLUDED", "read+qc s": round(record.seconds, 2)}
        if vol is None or not record.passed:
            row["reasons"] = "; ".join(record.reasons)
            per_case.append(row)
            continue
        mask = hu_threshold_lung_mask(vol.hu, vol.spacing)
        right, left = split_left_right(mask, vol.affine)
        hu_lps, _ = reorient_array(vol.hu, vol.affine, "LPS")
        right_lps, _ = reorient_array(right, vol.affine, "LPS")
        left_lps, _ = reorient_array(left, vol.affine, "LPS")
        k = _best_slice(right_lps | left_lps)
        png = save_overlay_png(fig_dir / f"{case['id']}.png", hu_lps[:, :, k], [(right_lps[:, :, k], "#00c0ff"), (left_lps[:, :, k], "#ffb000")],
                               f"{case['id']} slice {k}: HU-threshold lungs (R blue, L orange)", LUNG_WINDOW, vol.reorient("LPS").spacing[:2])
        figures.append((f"figures/{png.name}", f"{case['id']} ({case['kind']}), {vol.shape[0]}x{vol.shape[1]}x{vol.shape[2]} at {'x'.join(f'{s:.2f}' for s in vol.spacing)} mm"))
        t = time.perf_counter()
        pre = preprocess({"image": to_metatensor(vol)})["image"]
        saver(pre, meta_data={"filename_or_obj": case["id"]})
        row.update({"shape": "x".join(map(str, vol.shape)), "lung mL (R/L)": f"{right.sum() * vol.voxel_volume_ml:.0f}/{left.sum() * vol.voxel_volume_ml:.0f}",
                    "preprocessed": "x".join(map(str, pre.shape[1:])), "preproc s": round(time.perf_counter() - t, 2)})
        if case["kind"] == "phantom":
            import nibabel as nib

            truth = np.asarray(nib.load(str(case["lungs"])).dataobj) > 0
            row["HU-threshold lung Dice vs phantom truth"] = round(dice_score(mask, truth), 4)
        per_case.append(row)
    write_qc_report(records, out / "qc")
    first = next((c for c in manifest["cases"] if c["kind"] == "phantom" and "seed" in c), None)
    if first is not None:
        phantom = generate_phantom(shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING, seed=first["seed"])  # as make data wrote it
        render_slice_png(phantom, fig_dir / "phantom_ground_truth.png", coronal=True)
    excluded = [r for r in records if not r.passed]
    return {
        "n_cases": len(records), "n_passed": len(records) - len(excluded), "n_excluded": len(excluded),
        "excluded": {r.case_id: r.reasons for r in excluded}, "cases": per_case, "figures": figures,
        "qc_rows": [{"case": r.case_id, "verdict": "pass" if r.passed else "EXCLUDED", **{c.name: ("ok" if c.passed else "FAIL") for c in r.checks}} for r in records],
        "phantom_example": None if first is None else {"id": first["id"], "seed": first["seed"], "report": phantom.report},
        "qc_dir": str(out / "qc"),
    }


# --------------------------------------------------------------------------- the demo


def run_demo(out: Path, data_dir: Path = DEFAULT_OUT, retrain: bool = False) -> dict:
    from common.demo_report import build_report

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "report" / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    print("==> ingest, automated QC and preprocessing of the default data", flush=True)
    t = time.perf_counter()
    ingest = run_ingest(out, data_dir, fig_dir)
    ingest["seconds"] = time.perf_counter() - t
    steps = demo_steps(out)
    failure = None
    try:
        run_steps(steps, out, retrain=retrain, started=started)
    except RuntimeError as err:  # the report still shows what finished, and the failure
        failure = str(err)
    print(f"==> report (demo elapsed {_clock(time.perf_counter() - started)})", flush=True)
    metrics = build_report(out, ingest, steps, failure=failure, total_seconds=time.perf_counter() - started)
    if failure:
        raise SystemExit(f"demo stopped: {failure}\nreport so far: {out / 'report' / 'index.html'}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--data", default=str(DEFAULT_OUT))
    parser.add_argument("--retrain", action="store_true", help="run every step again, even those already finished")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = Path(args.out)
    metrics = run_demo(out, Path(args.data), retrain=args.retrain)
    print(metrics["summary_text"])
    print(f"report: {out / 'report' / 'index.html'} and {out / 'report' / 'metrics.json'}")
    print(f"MLflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///{(out / 'mlruns.db').resolve()} --port 5000")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
