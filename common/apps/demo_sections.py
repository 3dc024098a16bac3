"""The demo report's sections: per stage (SA-1, SA-2, SA-3a, SA-3b) and across stages (the comparison on held-out\nphantoms, the held-out real scan, the pipeline figure, the MLflow runs), each its metrics and its HTML."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np

from common.apps.pipeline import REPO_ROOT, linked_scan, run_python
from common.report import LUNG_WINDOW, figure_grid, html_table


def _load(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _run_script(argv: list[str], dest: Path) -> tuple[int, str]:
    """A benchmark script of the report, as ``python <argv>`` (:func:`run_python`); its exit status and output
    (kept in ``dest/<script>.log``)."""
    dest.mkdir(parents=True, exist_ok=True)
    log = dest / f"{Path(argv[0]).stem}.log"
    returncode = run_python(argv, log=log)
    return returncode, log.read_text(errors="replace") if log.is_file() else ""


def _img(src: str, width: str = "100%") -> str:
    return f"<img src='{html.escape(src)}' style='max-width:{width}'>"


def _scores_table(scores: dict | None, columns: list[str]) -> str:
    if not scores:
        return "<p class='fail'>no scores.json</p>"
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in scores["cases"]]
    return html_table(rows, [c for c in columns if any(c in r for r in rows)])


def _copy_figure(src: Path, fig_dir: Path, name: str) -> str | None:
    if not Path(src).is_file():
        return None
    shutil.copyfile(src, fig_dir / name)
    return f"figures/{name}"


def _volume(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


# --------------------------------------------------------------------------- per stage


CLIP_PATCHES = REPO_ROOT / "data" / "default" / "clip_pairs_demo" / "datalist.json"  # the demo's SA-1 samples


def clip_section(out: Path, fig_dir: Path, patches_list: Path = CLIP_PATCHES) -> tuple[dict, str]:
    """SA-1: curves from the training history; zero-shot confusion matrix of the saved model on the held-out
    phantom patches (Eq. 4 + argmax)."""
    import torch

    from common.classes import PATCH_CLASSES
    from common.data import class_prompts, load_clip_datalist
    from common.networks import load_network
    from common.report import save_confusion_png, save_training_curves_png

    run_dir = out / "foundation_clip"
    ckpt, history = run_dir / "models" / "model.pt", _load(run_dir / "metrics_history.json")
    if history is None or not ckpt.is_file():
        return {"ran": False}, "<p class='fail'>SA-1 did not finish: no checkpoint or metrics_history.json.</p>"
    history = history["history"]
    best = next(
        row for row in history if row["epoch"] == history[-1]["best_epoch"]
    )  # the checkpoint's epoch (key metric)
    save_training_curves_png(
        history,
        fig_dir / "clip_curves.png",
        ["epoch_loss", "epoch_loss_contrastive", "epoch_loss_distill"],
        ["val_zero_shot_acc", "val_recall_at_5", "val_distill_cosine"],
        "foundation_clip (SA-1), demo config",
    )
    metrics = {
        "ran": True,
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "val_zero_shot_acc": best["val_zero_shot_acc"],
        "val_recall_at_5": best.get("val_recall_at_5"),
        "val_distill_cosine": best.get("val_distill_cosine"),
        "checkpoint": str(ckpt),
    }
    body = (
        f"<p>Best held-out zero-shot patch accuracy <b>{best['val_zero_shot_acc']:.3f}</b> at epoch {best['epoch']} of {len(history)} (the checkpoint); "
        f"image-to-text recall@5 {best.get('val_recall_at_5', float('nan')):.3f}; distillation cosine to LiteMedSAM "
        f"{best.get('val_distill_cosine', float('nan')):.3f}. Checkpoint <code>{html.escape(str(ckpt))}</code>.</p>"
        + _img("figures/clip_curves.png")
    )
    if not patches_list.is_file():
        return (
            metrics,
            body
            + f"<p>No zero-shot confusion matrix: the held-out patches (<code>{html.escape(str(patches_list))}</code>) are not there.</p>",
        )
    model = load_network(ckpt).eval()
    size = int(model.preprocessing.get("image_size", 96))
    patches = [e for e in load_clip_datalist(patches_list, "validation") if e["label"] >= 0]
    with torch.no_grad():
        x = torch.stack([torch.from_numpy(np.load(e["image"]).astype(np.float32))[None] for e in patches])
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        img = torch.nn.functional.normalize(torch.cat([model.encode_image(b) for b in x.split(64)]), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(class_prompts()), dim=-1)
        pred = (img @ txt.t()).argmax(1).numpy()
    truth = np.array([e["label"] for e in patches])
    confusion = np.zeros((len(PATCH_CLASSES), len(PATCH_CLASSES)), dtype=int)
    np.add.at(confusion, (truth, pred), 1)
    accuracy = float((pred == truth).mean())
    save_confusion_png(
        confusion, PATCH_CLASSES, fig_dir / "clip_confusion.png", f"held-out phantom patches: accuracy {accuracy:.3f}"
    )
    metrics.update({"saved_model_zero_shot_acc": accuracy, "zero_shot_confusion": confusion.tolist()})
    body += _img("figures/clip_confusion.png", "45%")
    return metrics, body


def probmap_section(out: Path, fig_dir: Path) -> tuple[dict, str]:
    """SA-2: scores of the held-out phantoms' maps and masks, and each case's overlay."""
    held = _load(out / "probmap" / "heldout_phantoms" / "scores.json")
    figures = []
    for which in ("heldout_phantoms", "training_scans", "heldout_real_demo"):
        for report in sorted((out / "probmap" / which).glob("*/*_probmap.json")):
            case = report.parent.name
            src = _copy_figure(report.parent / f"{case}_overlay.png", fig_dir, f"probmap_{case}.png")
            if src:
                figures.append((src, f"{case}: lung probability and mask; most probable class"))
    volumes = {
        which: {
            p.parent.name: (_load(p) or {}).get("lung_ml")
            for p in sorted((out / "probmap" / which).glob("*/*_probmap.json"))
        }
        for which in ("training_scans", "heldout_real_demo")
    }
    if held is None:
        return {"ran": False}, "<p class='fail'>SA-2 did not finish on the held-out phantoms (no scores.json).</p>"
    metrics = {
        "ran": True,
        "heldout_phantoms": held["summary"],
        **{f"{which}_lung_volume_ml": v for which, v in volumes.items()},
    }
    dice = held["summary"].get("lung_mask_dice", {}).get("mean")
    body = (
        f"<p>Zero-shot maps from the SA-1 model (sliding patches, Eq. 4-6) and the lung mask thresholded from them. "
        f"Held-out phantoms: lung-mask Dice <b>{dice:.3f}</b> (mean of {held['summary'].get('lung_mask_dice', {}).get('n', 0)}).</p>"
        + _scores_table(
            held,
            [
                "case_id",
                "lung_mask_dice",
                "lung_mask_iou",
                "lung_auc",
                "heart_auc",
                "blood vessel_auc",
                "airway_auc",
                "bone_auc",
            ],
        )
        + figure_grid(figures, wide=True)
    )
    return metrics, body


def pseudolabel_section(out: Path, fig_dir: Path) -> tuple[dict, str]:
    """SA-3a: held-out pseudo-label scores, the QC verdict of every case, overlays."""
    held = _load(out / "pseudolabel" / "heldout_phantoms" / "scores.json")
    datalist = _load(out / "pseudolabel" / "training_scans" / "datalist.json") or {}
    role = {e["case_id"]: split for split in ("training", "validation", "excluded") for e in datalist.get(split, [])}
    if held is None:
        return {"ran": False}, "<p class='fail'>SA-3a did not finish on the held-out phantoms (no scores.json).</p>"
    figures, qc_rows = [], []
    for which in ("heldout_phantoms", "training_scans"):
        for report in sorted((out / "pseudolabel" / which).glob("*/*_pseudolabel.json")):
            case, info = report.parent.name, _load(report) or {}
            confidence = info.get("confidence", {})
            qc_rows.append(
                {
                    "set": which.replace("_", " "),
                    "case": case,
                    "QC": "pass" if confidence.get("passed") else "excluded",
                    "H-SAM": role.get(case, "held out") if which == "training_scans" else "held out (scored)",
                    "agreement Dice with SA-2": confidence.get("agreement_dice"),
                    "mean predicted IoU": confidence.get("mean_predicted_iou"),
                    "lung mL": (info.get("lung_ml") or {}).get("total"),
                    "reasons": "; ".join(confidence.get("reasons", [])),
                }
            )
            if not case.startswith("train_phantom"):  # the held-out phantoms and the real training scans
                src = _copy_figure(report.parent / f"{case}_pseudo_overlay.png", fig_dir, f"pseudolabel_{case}.png")
                if src:
                    figures.append((src, f"{case}: pseudo label (right green, left blue), SA-2 mask dashed"))
    metrics = {
        "ran": True,
        "heldout_phantoms": held["summary"],
        "cases": qc_rows,
        "hsam_datalist": {
            split: [e["case_id"] for e in datalist.get(split, [])] for split in ("training", "validation", "excluded")
        },
    }
    dice = held["summary"].get("pseudo_dice", {}).get("mean")
    body = (
        f"<p>SAM prompts (boxes) from the SA-2 maps, LiteMedSAM masks kept by Algorithm 2, per-case QC. Held-out phantoms: pseudo-label Dice "
        f"<b>{dice:.3f}</b> against the true lung field.</p>"
        + _scores_table(
            held, ["case_id", "pseudo_dice", "pseudo_iou", "sa2_mask_dice", "kept_share", "mean_predicted_iou"]
        )
        + "<p>Every case's QC; of the training scans, those that pass train (or validate) H-SAM:</p>"
        + html_table(
            qc_rows,
            ["set", "case", "QC", "H-SAM", "agreement Dice with SA-2", "mean predicted IoU", "lung mL", "reasons"],
        )
        + figure_grid(figures, wide=True)
    )
    return metrics, body


def hsam_section(out: Path, fig_dir: Path, between: bool = False) -> tuple[dict, str]:
    """SA-3b: training curves, held-out scores; ``between``: the checkpoint was chosen on the slices between the training
    slices too (``validate_between_slices``)."""
    from common.report import save_training_curves_png

    history = _load(out / "hsam_finetune" / "train" / "metrics_history.json")
    held = _load(out / "hsam_finetune" / "heldout_phantoms" / "scores.json")
    if history is None or held is None:
        return {"ran": False}, "<p class='fail'>SA-3b did not finish (no training history or held-out scores).</p>"
    history = history["history"]
    losses = sorted({k for row in history for k in row if "loss" in k})
    vals = sorted({k for row in history for k in row if k.startswith("val_")})
    save_training_curves_png(history, fig_dir / "hsam_curves.png", losses, vals, "hsam_finetune (SA-3b), demo size")
    best = max(history, key=lambda r: r.get("val_mean_dice", float("-inf")))
    metrics = {
        "ran": True,
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "best_val_mean_dice": best.get("val_mean_dice"),
        "history": history,
        "heldout_phantoms": held["summary"],
    }
    s = held["summary"]
    body = (
        f"<p>H-SAM (LoRA on the LiteMedSAM encoder, two mask decoders) trained on the pseudo labels for {len(history)} epochs; "
        f"best validation Dice {best.get('val_mean_dice', float('nan')):.3f} (epoch {best['epoch']}, on held-back pseudo labels: "
        f"{'the validation scans and the slices between the training slices of every training scan' if between else 'the validation scans'}). "
        f"Held-out phantoms against their true lung field: Dice <b>{s['dice']['mean']:.3f}</b>, HD95 {s['hd95_mm']['mean']:.1f} mm.</p>"
        + _img("figures/hsam_curves.png")
        + _scores_table(
            held,
            ["case_id", "dice", "dice_central", "dice_peripheral", "hd95_mm", "assd_mm", "sensitivity", "specificity"],
        )
    )
    return metrics, body


# --------------------------------------------------------------------------- across stages


def comparison_section(out: Path, fig_dir: Path, n_phantoms: int, seed: int) -> tuple[dict | None, str]:
    """Every method on the held-out phantoms, by the same script as the bundle docs' table."""
    methods = {
        "SA-2 lung mask (zero-shot)": out / "probmap" / "heldout_phantoms" / "{case}" / "{case}_lung_mask.nii.gz",
        "pseudo labels (SA-3a)": out / "pseudolabel" / "heldout_phantoms" / "{case}" / "{case}_pseudo_label.nii.gz",
        "H-SAM on pseudo labels (SA-3b)": out
        / "hsam_finetune"
        / "heldout_phantoms"
        / "{case}"
        / "{case}_lung_mask.nii.gz",
    }
    dest = out / "report" / "comparison"
    cmd = [
        str(REPO_ROOT / "benchmarks" / "hsam_comparison.py"),
        "--phantom-dir",
        str(out / "phantoms_heldout"),
        "--phantoms",
        str(n_phantoms),
        "--seed",
        str(seed),
        "--out",
        str(dest),
    ]
    for name, pattern in methods.items():
        cmd += ["--method", f"{name}={pattern}"]
    returncode, output = _run_script(cmd, dest)
    table = _load(dest / "comparison.json")
    if returncode != 0 or table is None:
        return None, f"<p class='fail'>The comparison did not run: <code>{html.escape(output[-800:])}</code></p>"
    rows = []
    for name, s in table["summary"].items():
        rows.append(
            {
                "method": name,
                **{
                    label: f"{s[key]['mean']:.3f} ± {s[key]['sd']:.3f}"
                    for label, key in (
                        ("Dice", "dice"),
                        ("Dice central", "dice_central"),
                        ("Dice peripheral", "dice_peripheral"),
                    )
                },
                "HD95 mm": f"{s['hd95_mm']['mean']:.1f}",
                "sensitivity": f"{s['sensitivity']['mean']:.3f}",
            }
        )
    for name in table.get("not_run", {}):
        rows.append({"method": name, "Dice": "not run"})
    for name in ("comparison.png", "overlays.png"):
        _copy_figure(dest / name, fig_dir, f"comparison_{name}")
    body = (
        f"<p>Lung masks of {len(table['cases'])} held-out phantoms (seeds {seed}-{seed + n_phantoms - 1}, never seen in training) against "
        "their true lung field; central / peripheral: the middle and outer halves of the lung's slices.</p>"
        + html_table(rows, ["method", "Dice", "Dice central", "Dice peripheral", "HD95 mm", "sensitivity"])
        + _img("figures/comparison_comparison.png", "60%")
        + _img("figures/comparison_overlays.png")
    )
    return {"cases": table["cases"], "summary": table["summary"]}, body


def heldout_real_section(out: Path, fig_dir: Path, case_ids: tuple[str, ...]) -> tuple[dict | None, str]:
    """The demo's models next to the shipped ones on the real scans no stage of either chain trained on: what can be
    measured without labels (volume per side, share of the mask below -400 HU, Dice against the HU threshold),
    by the script the bundle docs' real-CT table comes from, and the masks drawn at base, middle and apex."""
    if not case_ids:
        return None, "<p>This size holds no real scan out.</p>"
    methods = {
        f"{stage} {who}": out / folder / f"heldout_real_{who}"
        for who in ("demo", "shipped")
        for stage, folder in (("SA-2", "probmap"), ("H-SAM", "hsam_finetune"))
    }
    methods = {name: d for name, d in methods.items() if d.is_dir()}
    if not methods:
        return None, "<p class='fail'>No model ran on the held-out real scan.</p>"
    dest = out / "report" / "heldout_real"
    cmd = [
        str(REPO_ROOT / "benchmarks" / "real_ct_labelfree.py"),
        "--scans",
        str(out / "heldout_scans"),
        "--out",
        str(dest),
        "--overlays",
        "--sa2",
        "SA-2 demo",
    ] + [a for name, d in methods.items() for a in ("--method", f"{name}={d}")]
    returncode, output = _run_script(cmd, dest)
    rows = _load(dest / "labelfree.json")
    if returncode != 0 or rows is None:
        return (
            None,
            f"<p class='fail'>The label-free comparison did not run: <code>{html.escape(output[-800:])}</code></p>",
        )
    rows = [r for r in rows if "error" not in r]
    figures = [f for f in (_copy_figure(dest / f"{c}.png", fig_dir, f"heldout_real_{c}.png") for c in case_ids) if f]
    table = html_table(
        rows,
        [
            "case",
            "method",
            "lung_ml",
            "right_ml",
            "left_ml",
            "share_below_-400",
            "thorax_air_covered",
            "dice_hu_threshold",
        ],
    )
    body = (
        "<p>Real CT that no stage of the demo trained on, nor the shipped models' SA-1 (its H-SAM validated on it): the demo's "
        "models (trained minutes ago on this machine) next to the shipped ones (<code>bundles/*/models/model.pt</code>), each as "
        "<code>make segment</code> runs them (SA-2, then H-SAM on the slices SA-2's mask touches). No truth here: lung volume per "
        "side, the share of the mask below -400 HU, the share of the thorax's air it covers, and Dice against the classical HU "
        "threshold (which scores 0.946 against clinicians' contours on a scan like this one). <em>Without clean-up</em>: H-SAM's "
        "own probability above 0.5, before its named label-free clean-up: the surface moved onto the -400 HU edge within "
        "3 mm (<code>RefineLungBoundaryd</code>), what lies outside the body dropped (<code>RestrictToBodyd</code>), the two "
        "largest components kept and holes filled (<code>LungMaskCleanupd</code>), so what the clean-up does is measured, "
        "not hidden.</p>" + table + "".join(_img(f) for f in figures)
    )
    return {"rows": rows}, body


def pipeline_figure(out: Path, fig_dir: Path, real_case: str | None) -> str:
    """One held-out phantom and one held-out real scan: CT, lung probability, pseudo label (the phantom's), H-SAM mask, same slice."""
    from common.report import save_pipeline_overlay_png

    from common.io import read_ct

    cases = []
    for case_id, real in (("heldout_phantom_000", False), (real_case, True)):
        if case_id is None:
            continue
        maps, seg = ("heldout_real_demo", "heldout_real_demo") if real else ("heldout_phantoms", "heldout_phantoms")
        paths = {
            "prob": out / "probmap" / maps / case_id / f"{case_id}_probmap.nii.gz",
            "hsam": out / "hsam_finetune" / seg / case_id / f"{case_id}_lung_mask.nii.gz",
        }
        if not real:  # the held-out real scan is not pseudo-labelled: no stage trains on it
            paths["pseudo"] = out / "pseudolabel" / maps / case_id / f"{case_id}_pseudo_label.nii.gz"
        image = (
            linked_scan(out / "heldout_scans", case_id) if real else (out / "phantoms_heldout" / f"{case_id}_ct.nii.gz")
        )
        if not image.exists() or not all(p.is_file() for p in paths.values()):
            continue
        if real:
            vol = read_ct(image)
            hu, affine = vol.hu, vol.affine
        else:
            hu, affine = _volume(image)
        truth = None
        lungs = out / "phantoms_heldout" / f"{case_id}_lungs.nii.gz"
        if not real and lungs.is_file():
            truth = _volume(lungs)[0] > 0
        prob = _volume(paths["prob"])[0]  # (X, Y, Z, class), lung first
        cases.append(
            {
                "name": f"{case_id} ({'real CT, held out of every stage' if real else 'held-out phantom'})",
                "hu": np.asarray(hu, dtype=np.float32),
                "affine": affine,
                "lung_probability": prob[..., 0] if prob.ndim == 4 else prob,
                "pseudo_label": _volume(paths["pseudo"])[0] > 0 if "pseudo" in paths else None,
                "hsam": _volume(paths["hsam"])[0] > 0,
                "truth": truth,
            }
        )
    if not cases:
        return "<p class='fail'>No case has all of probability map, pseudo label and H-SAM mask.</p>"
    save_pipeline_overlay_png(fig_dir / "pipeline.png", cases, window=LUNG_WINDOW)
    return (
        "<p>The same axial slice through each stage: the CT; SA-2's zero-shot lung probability; the SA-3a pseudo label; "
        "the H-SAM mask (red; the phantom's true lung field dashed yellow). The real scan is held out of every stage: it has no "
        "pseudo label.</p>" + _img("figures/pipeline.png")
    )


def mlflow_runs(out: Path) -> list[dict]:
    """The demo's MLflow runs, read back from its store."""
    store = out / "mlruns.db"
    if not store.is_file():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}")
    experiment = client.get_experiment_by_name("demo")
    if experiment is None:
        return []
    rows = []
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
        rows.append(
            {
                "run": run.info.run_name,
                "status": run.info.status,
                "metrics": len(run.data.metrics),
                "params": len(run.data.params),
                "run id": run.info.run_id[:8],
            }
        )
    return rows
