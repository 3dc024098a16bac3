"""``make demo``: run what the project has built so far on the embedded default data.

Now: ingest every default case, automated QC (excluded cases listed with reasons), the standard
preprocessing on the cases that pass, phantom ground truth, the SA-1 foundation_clip bundle trained
at demo size (training curves, zero-shot confusion matrix on held-out phantom patches), and a report
in ``outputs/demo/report/`` (``index.html`` + ``metrics.json``). The later learning stages (probmap,
pseudolabel, hsam_finetune) are not built yet and the demo says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from common.default_data import DEFAULT_OUT, PHANTOM_SHAPE, PHANTOM_SPACING, load_manifest
from common.io import write_json_atomic
from common.io.volume import reorient_array
from common.metrics import dice_score
from common.lungmask import hu_threshold_lung_mask, split_left_right
from common.qc import CaseRef, qc_case, write_qc_report
from common.report import LUNG_WINDOW, figure_grid, html_table, save_overlay_png, write_html_page

log = logging.getLogger(__name__)
NOT_BUILT = ["probmap (issue 4)", "pseudolabel (issue 5)", "hsam_finetune (issue 6)"]
REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP_BUNDLE = REPO_ROOT / "bundles" / "foundation_clip"
# Demo-size preprocessing: 1.5 mm in-plane keeps the lungs' shape and is fast on 2 CPU cores.
DEMO_SPACING = (1.5, 1.5, 2.5)


def _case_ref(case: dict) -> CaseRef:
    path = Path(case["path"])
    fmt = "dicom" if case["format"] == "dicom" and path.is_dir() else ("deeplesion_png" if case["format"] == "deeplesion_png" else "file")
    return CaseRef(case["id"], path, fmt)


def _best_slice(mask: np.ndarray) -> int:
    area = mask.sum(axis=(0, 1))
    return int(np.argmax(area)) if area.any() else mask.shape[2] // 2


def run_foundation_clip(out: Path, fig_dir: Path, retrain: bool = False) -> tuple[dict, str]:
    """Train the SA-1 bundle at demo size (``monai.bundle run``, its progress shown), or reuse a finished
    run; then plot its curves and the held-out zero-shot confusion matrix. Returns metrics and HTML."""
    import subprocess
    import sys

    import torch

    from common.data import class_prompts, load_clip_datalist
    from common.classes import CLASS_NAMES
    from common.networks import LungCLIP
    from common.report import save_confusion_png, save_training_curves_png

    run_dir = out / "foundation_clip"
    ckpt, history_path = run_dir / "models" / "model.pt", run_dir / "metrics_history.json"
    reused = ckpt.is_file() and history_path.is_file() and not retrain
    t = time.perf_counter()
    if not reused:
        configs = [str(CLIP_BUNDLE / "configs" / "train.json"), str(CLIP_BUNDLE / "configs" / "demo.json")]
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs), "--bundle_root", str(CLIP_BUNDLE),
               "--output_dir", str(run_dir), "--ckpt_dir", str(run_dir / "models")]
        print("foundation_clip (SA-1): training the demo config (about 10 minutes on 2 CPU cores)", flush=True)
        result = subprocess.run(cmd, cwd=REPO_ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"foundation_clip training failed (exit {result.returncode}): {' '.join(cmd)}")
    minutes = (time.perf_counter() - t) / 60
    history = json.loads(history_path.read_text())["history"]
    best = max(history, key=lambda row: row["val_zero_shot_acc"])
    save_training_curves_png(history, fig_dir / "foundation_clip_curves.png", ["epoch_loss", "epoch_loss_contrastive", "epoch_loss_distill"],
                             ["val_zero_shot_acc", "val_recall_at_5", "val_distill_cosine"], "foundation_clip (SA-1), demo config")
    # zero-shot predictions of the saved model on the held-out phantom patches (Eq. 4 + argmax)
    model = LungCLIP.load_checkpoint(ckpt).eval()
    size = int(model.preprocessing.get("image_size", 96))
    samples_dir = CLIP_BUNDLE.parents[1] / "data" / "default" / "clip_pairs_demo"
    patches = [e for e in load_clip_datalist(samples_dir / "datalist.json", "validation") if e["label"] >= 0]
    with torch.no_grad():
        x = torch.stack([torch.from_numpy(np.load(e["image"]).astype(np.float32))[None] for e in patches])
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        img = torch.nn.functional.normalize(torch.cat([model.encode_image(b) for b in x.split(64)]), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(class_prompts()), dim=-1)
        pred = (img @ txt.t()).argmax(1).numpy()
    truth = np.array([e["label"] for e in patches])
    confusion = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=int)
    np.add.at(confusion, (truth, pred), 1)
    save_confusion_png(confusion, CLASS_NAMES, fig_dir / "foundation_clip_confusion.png", f"held-out phantom patches: accuracy {float((pred == truth).mean()):.3f}")
    metrics = {
        "best_epoch": best["epoch"], "epochs": len(history), "val_zero_shot_acc": best["val_zero_shot_acc"],
        "val_recall_at_5": best.get("val_recall_at_5"), "val_distill_cosine": best.get("val_distill_cosine"),
        "zero_shot_confusion": confusion.tolist(), "checkpoint": str(ckpt), "reused_previous_run": reused, "minutes": round(minutes, 1),
    }
    html = (f"<p>{'Reused the finished run in' if reused else 'Trained in'} <code>{run_dir}</code>{'' if reused else f' ({minutes:.1f} min)'}: "
            f"best held-out zero-shot patch accuracy <b>{best['val_zero_shot_acc']:.3f}</b> at epoch {best['epoch']} of {len(history)}, "
            f"image-to-text recall@5 {best.get('val_recall_at_5', float('nan')):.3f}, distillation cosine to LiteMedSAM {best.get('val_distill_cosine', float('nan')):.3f}. "
            f"Checkpoint: <code>{ckpt}</code>.</p>"
            "<img src='figures/foundation_clip_curves.png' style='max-width:100%'><img src='figures/foundation_clip_confusion.png' style='max-width:45%'>")
    return metrics, html


def run_demo(out: Path, data_dir: Path = DEFAULT_OUT, retrain: bool = False) -> dict:
    from monai.transforms import SaveImage
    from tqdm.auto import tqdm

    from common.io import to_metatensor
    from common.transforms import ct_preprocessing

    manifest = load_manifest(data_dir)
    report_dir = out / "report"
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # 1-2. Ingest + QC -------------------------------------------------------------------------
    records, figures, volumes_ok = [], [], []
    preprocess = ct_preprocessing(load=False, target_spacing=DEMO_SPACING)
    saver = SaveImage(output_dir=str(out / "preprocessed"), output_postfix="preproc", separate_folder=False, print_log=False)
    per_case = []
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
        png = save_overlay_png(
            fig_dir / f"{case['id']}.png",
            hu_lps[:, :, k],
            [(right_lps[:, :, k], "#00c0ff"), (left_lps[:, :, k], "#ffb000")],
            f"{case['id']} slice {k}: HU-threshold lungs (R blue, L orange)",
            LUNG_WINDOW,
            vol.reorient("LPS").spacing[:2],
        )
        figures.append((f"figures/{png.name}", f"{case['id']} ({case['kind']}), {vol.shape[0]}x{vol.shape[1]}x{vol.shape[2]} at {'x'.join(f'{s:.2f}' for s in vol.spacing)} mm"))
        t = time.perf_counter()
        pre = preprocess({"image": to_metatensor(vol)})["image"]
        saver(pre, meta_data={"filename_or_obj": case["id"]})
        row.update(
            {
                "shape": "x".join(map(str, vol.shape)),
                "lung mL (R/L)": f"{right.sum() * vol.voxel_volume_ml:.0f}/{left.sum() * vol.voxel_volume_ml:.0f}",
                "preprocessed": "x".join(map(str, pre.shape[1:])),
                "preproc s": round(time.perf_counter() - t, 2),
            }
        )
        if case["kind"] == "phantom":
            import nibabel as nib

            truth = np.asarray(nib.load(str(case["lungs"])).dataobj) > 0
            row["HU-threshold lung Dice vs phantom truth"] = round(dice_score(mask, truth), 4)
        per_case.append(row)
        volumes_ok.append(case["id"])
    write_qc_report(records, out / "qc")
    timings["ingest_qc_preprocessing_s"] = round(time.perf_counter() - t0, 1)

    # 3. Phantom ground truth, as a radiologist would look at it ------------------------------
    from common.phantom import generate_phantom, render_slice_png

    t = time.perf_counter()
    first = next(c for c in manifest["cases"] if c["kind"] == "phantom")
    phantom = generate_phantom(shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING, seed=first["seed"])  # as make data wrote it
    render_slice_png(phantom, fig_dir / "phantom_ground_truth.png", coronal=True)
    timings["phantom_render_s"] = round(time.perf_counter() - t, 1)

    # 4. SA-1: the foundation CLIP model -------------------------------------------------------
    t = time.perf_counter()
    clip_metrics, clip_html = run_foundation_clip(out, fig_dir, retrain=retrain)
    timings["foundation_clip_s"] = round(time.perf_counter() - t, 1)

    excluded = [r for r in records if not r.passed]
    metrics = {
        "ingest": {
            "n_cases": len(records),
            "n_passed": len(records) - len(excluded),
            "n_excluded": len(excluded),
            "excluded": {r.case_id: r.reasons for r in excluded},
            "cases": per_case,
        },
        "phantom": {
            "n": sum(c["kind"] == "phantom" for c in manifest["cases"]),
            "hu_threshold_lung_dice": [c["HU-threshold lung Dice vs phantom truth"] for c in per_case if "HU-threshold lung Dice vs phantom truth" in c],
            "report_example": phantom.report,
        },
        "foundation_clip": clip_metrics,
        "timings": timings,
        "not_built_yet": NOT_BUILT,
    }
    write_json_atomic(report_dir / "metrics.json", metrics)
    qc_rows = [{"case": r.case_id, "verdict": "pass" if r.passed else "EXCLUDED", **{c.name: ("ok" if c.passed else "FAIL") for c in r.checks}} for r in records]
    qc_columns = ["case", "verdict"] + [n for n in ("readable", "modality", "slice_count", "duplicate_slices", "missing_slices", "slice_spacing", "gantry_tilt", "hu_range", "lung_coverage", "noise") if any(n in row for row in qc_rows)]
    excluded_html = "".join(f"<li><b>{r.case_id}</b>: {'; '.join(r.reasons)}</li>" for r in excluded) or "<li>none</li>"
    sections = [
        ("What ran", f"<p>Ingest, automated QC, preprocessing (orientation RAS, resampling to {DEMO_SPACING} mm, HU window [-1000, 400] to [0, 1]) and phantom ground truth on the embedded default data, in {timings['ingest_qc_preprocessing_s']} s; "
         f"the SA-1 foundation_clip bundle at demo size ({timings['foundation_clip_s']} s). "
         f"Not built yet: {', '.join(NOT_BUILT)}.</p>"),
        ("Quality control", html_table(qc_rows, qc_columns) + f"<p>Excluded, with reasons:</p><ul>{excluded_html}</ul>"
         f"<p>Every check's reason: <code>{out / 'qc' / 'qc_report.csv'}</code> and <code>qc_report.json</code>.</p>"),
        ("Cases", html_table(per_case, ["case", "kind", "qc", "shape", "lung mL (R/L)", "HU-threshold lung Dice vs phantom truth", "read+qc s", "preprocessed", "preproc s"])),
        ("Slices (lung window) with HU-threshold lung contours", figure_grid(figures)),
        ("SA-1 foundation_clip: training and held-out zero-shot classification", clip_html),
        ("Phantom ground truth", f"<p>{first['id']} (seed {first['seed']}): lung and mediastinal windows and the five-class label map. Its report: <i>{' '.join(phantom.report)}</i></p>"
         "<img src='figures/phantom_ground_truth.png' style='max-width:100%'>"),
    ]
    write_html_page(report_dir / "index.html", "Lung CT foundation-model pipeline: demo report", sections)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--data", default=str(DEFAULT_OUT))
    parser.add_argument("--retrain", action="store_true", help="train foundation_clip again even if a finished run exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    metrics = run_demo(Path(args.out), Path(args.data), retrain=args.retrain)
    ing = metrics["ingest"]
    print(f"ran: ingest + QC on {ing['n_cases']} cases ({ing['n_passed']} passed, {ing['n_excluded']} excluded), preprocessing of the passed cases, phantom ground-truth comparison")
    for case_id, reasons in ing["excluded"].items():
        print(f"  excluded {case_id}: {'; '.join(reasons)}")
    fc = metrics["foundation_clip"]
    print(f"ran: foundation_clip (SA-1) {'reused' if fc['reused_previous_run'] else 'trained'}: held-out zero-shot patch accuracy {fc['val_zero_shot_acc']:.3f} "
          f"(epoch {fc['best_epoch']}/{fc['epochs']}), recall@5 {fc['val_recall_at_5']:.3f}, distillation cosine {fc['val_distill_cosine']:.3f}; checkpoint {fc['checkpoint']}")
    print(f"not built yet: {', '.join(metrics['not_built_yet'])}")
    print(f"report: {Path(args.out) / 'report' / 'index.html'} and metrics.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
