"""The ``make demo`` report: ``<out>/report/index.html`` and ``metrics.json`` from the stages' own outputs.

Each stage's section is built from what its bundle wrote (``metrics_history.json``, ``scores.json``, the
per-case maps, labels and masks); a stage whose outputs are missing is shown as not run, with the reason,
so a stopped demo still gets a report of what finished.
"""

from __future__ import annotations

import html
from pathlib import Path


from common.apps.pipeline import REPO_ROOT, clock
from common.io import write_json_atomic
from common.report import figure_grid, html_table, write_html_page
from common.apps.demo_sections import (
    _img,
    clip_section,
    comparison_section,
    heldout_real_section,
    hsam_section,
    mlflow_runs,
    pipeline_figure,
    probmap_section,
    pseudolabel_section,
)

STAGE_TITLES = {
    "clip": "SA-1 foundation_clip",
    "probmap": "SA-2 probmap",
    "pseudolabel": "SA-3a pseudolabel",
    "hsam": "SA-3b hsam_finetune",
    "shipped": "shipped models",
}


def _every_nth_slice(step: int) -> str:
    return "every slice" if step == 1 else f"every {step}th slice"


def build_report(
    out: Path,
    ingest: dict,
    steps: list,
    size,
    seed: int = 0,
    data_dir: Path | None = None,
    failure: str | None = None,
    total_seconds: float | None = None,
) -> dict:
    """Write ``<out>/report/index.html`` and ``metrics.json``; returns the metrics (with ``summary_text``).
    ``size`` is the :class:`common.apps.demo.DemoSize` that ran; ``data_dir`` holds SA-1's held-out patches."""
    out = Path(out)
    report_dir = out / "report"
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    clip_patches = Path(data_dir or REPO_ROOT / "data" / "default") / "clip_pairs_demo" / "datalist.json"
    stage_metrics, stage_html = {}, {}
    builders = (
        ("clip", lambda o, f: clip_section(o, f, clip_patches)),
        ("probmap", probmap_section),
        ("pseudolabel", pseudolabel_section),
        ("hsam", lambda o, f: hsam_section(o, f, bool(size.hsam.get("validate_between_slices")))),
        ("shipped", lambda o, f: heldout_real_section(o, f, size.real_heldout)),
    )
    for stage, builder in builders:
        try:
            stage_metrics[stage], stage_html[stage] = builder(out, fig_dir)
        except Exception as err:  # one stage's broken output must not lose the rest of the report
            stage_metrics[stage], stage_html[stage] = (
                {"ran": False, "error": repr(err)},
                f"<p class='fail'>Report of this stage failed: {html.escape(repr(err))}</p>",
            )
    if stage_metrics["shipped"] is None:
        stage_metrics["shipped"] = {"ran": False}
    else:
        stage_metrics["shipped"].setdefault("ran", "rows" in stage_metrics["shipped"])
    comparison, comparison_html = comparison_section(out, fig_dir, size.heldout_phantoms, size.heldout_seed)
    if comparison is not None:
        stage_metrics["hsam"]["comparison"] = comparison
    figure_html = pipeline_figure(out, fig_dir, size.real_heldout[0] if size.real_heldout else None)
    runs = mlflow_runs(out)

    step_rows, stage_seconds = [], {s: 0.0 for s in STAGE_TITLES}
    for step in steps:
        stage_seconds[step.stage] += step.seconds or 0.0
        step_rows.append(
            {
                "stage": STAGE_TITLES[step.stage],
                "step": step.name,
                "what": step.what,
                "status": step.status,
                "time (m:s)": clock(step.seconds),
            }
        )
    timings = {
        "ingest_qc_preprocessing_s": round(ingest.get("seconds", 0.0), 1),
        **{f"{s}_s": round(v, 1) for s, v in stage_seconds.items()},
    }
    if total_seconds is not None:
        timings["total_s"] = round(total_seconds, 1)
    commands = "".join(f"<li><code>{html.escape(s.cmd)}</code></li>" for s in steps)
    summary_rows = [
        {"stage": STAGE_TITLES[s], "time (m:s)": clock(stage_seconds[s]), "headline": _headline(s, stage_metrics[s])}
        for s in STAGE_TITLES
    ]
    hsam = size.hsam
    what_ran = (
        f"<p>{'<b class=fail>The demo stopped: ' + html.escape(failure) + '</b><br>' if failure else ''}"
        f"Total {clock(total_seconds)} (m:s); ingest, QC and preprocessing {clock(ingest.get('seconds'))}. Size <b>{html.escape(size.name)}</b>, "
        f"SA-1 seed {seed}: phantoms {'x'.join(map(str, size.phantom_shape))} at {'x'.join(f'{v:g}' for v in size.phantom_spacing)} mm "
        f"({size.heldout_phantoms} held out and scored, {size.training_phantoms} for training); real training scans "
        f"{', '.join(size.real_training) or 'none'} (their pseudo labels train H-SAM with the phantoms'); real scans held out of every stage "
        f"{', '.join(size.real_heldout) or 'none'}; H-SAM {hsam.get('max_epochs', '')} epochs on "
        f"{_every_nth_slice(int(hsam.get('slice_step', 1)))} of its training cases. The full-size recipes (GPU) are in each bundle's docs.</p>"
        + html_table(summary_rows, ["stage", "time (m:s)", "headline"])
        + html_table(step_rows, ["stage", "step", "what", "status", "time (m:s)"])
        + f"<details><summary>the exact commands</summary><ol>{commands}</ol></details>"
    )
    mlflow_html = (
        html_table(runs, ["run", "status", "metrics", "params", "run id"])
        if runs
        else "<p class='fail'>no MLflow runs found</p>"
    ) + (
        f"<p>Browse them: <code>.venv/bin/mlflow ui --backend-store-uri sqlite:///{html.escape(str((out / 'mlruns.db').resolve()))} --port 5000</code></p>"
    )
    excluded_html = (
        "".join(f"<li><b>{html.escape(c)}</b>: {html.escape('; '.join(r))}</li>" for c, r in ingest["excluded"].items())
        or "<li>none</li>"
    )
    qc_columns = ["case", "verdict"] + [
        n
        for n in (
            "readable",
            "modality",
            "slice_count",
            "duplicate_slices",
            "missing_slices",
            "slice_spacing",
            "gantry_tilt",
            "hu_range",
            "lung_coverage",
            "noise",
        )
        if any(n in row for row in ingest["qc_rows"])
    ]
    sections = [
        ("What ran", what_ran),
        ("The demo's models and the shipped ones on a real scan no stage trained on", stage_html["shipped"]),
        ("Evaluation on held-out phantoms", comparison_html),
        ("CT, probability map, pseudo label and H-SAM mask", figure_html),
        ("SA-1 foundation_clip: training and zero-shot classification", stage_html["clip"]),
        ("SA-2 probmap: zero-shot probability maps", stage_html["probmap"]),
        ("SA-3a pseudolabel: SAM pseudo labels", stage_html["pseudolabel"]),
        ("SA-3b hsam_finetune: H-SAM on the pseudo labels", stage_html["hsam"]),
        ("MLflow runs", mlflow_html),
        (
            "Data and quality control",
            html_table(ingest["qc_rows"], qc_columns)
            + f"<p>Excluded, with reasons:</p><ul>{excluded_html}</ul>"
            + html_table(
                ingest["cases"],
                [
                    "case",
                    "kind",
                    "qc",
                    "shape",
                    "lung mL (R/L)",
                    "HU-threshold lung Dice vs phantom truth",
                    "read+qc s",
                    "preprocessed",
                    "preproc s",
                ],
            )
            + f"<p>Preprocessing: orientation RAS, resampling to {size.preprocessing_spacing} mm, HU window [-1000, 400] to [0, 1].</p>"
            + figure_grid(ingest["figures"]),
        ),
    ]
    example = ingest.get("phantom_example")
    if example:
        sections.append(
            (
                "Phantom ground truth",
                f"<p>{example['id']} (seed {example['seed']}): lung and mediastinal windows and the five-class label map. "
                f"Its report: <i>{html.escape(' '.join(example['report']))}</i></p>"
                + _img("figures/phantom_ground_truth.png"),
            )
        )
    write_html_page(report_dir / "index.html", "Lung CT without hand-drawn labels: demo report", sections)
    metrics = {
        **stage_metrics,
        "size": size.name,
        "seed": seed,
        "ingest": {k: v for k, v in ingest.items() if k not in ("figures", "qc_rows")},
        "timings": timings,
        "steps": [
            {"stage": s.stage, "name": s.name, "status": s.status, "seconds": s.seconds, "command": s.cmd}
            for s in steps
        ],
        "mlflow_runs": runs,
        "failure": failure,
    }
    write_json_atomic(report_dir / "metrics.json", metrics)
    metrics["summary_text"] = "\n".join(
        f"{STAGE_TITLES[s]} ({clock(stage_seconds[s])}): {_headline(s, stage_metrics[s])}" for s in STAGE_TITLES
    )
    return metrics


def _headline(stage: str, m: dict) -> str:
    if not m.get("ran"):
        return "not run" + (f" ({m['error']})" if m.get("error") else "")
    if stage == "clip":
        return f"held-out zero-shot patch accuracy {m['val_zero_shot_acc']:.3f} (epoch {m['best_epoch']}/{m['epochs']})"
    if stage == "probmap":
        return f"held-out phantom lung-mask Dice {m['heldout_phantoms']['lung_mask_dice']['mean']:.3f}"
    if stage == "pseudolabel":
        return f"held-out phantom pseudo-label Dice {m['heldout_phantoms']['pseudo_dice']['mean']:.3f}"
    if (
        stage == "shipped"
    ):  # H-SAM's answer on the held-out real scan, each chain's: Dice against the HU threshold and volume
        return "; ".join(
            f"{r['case']} {r['method']} Dice vs HU threshold {r['dice_hu_threshold']:.3f}, {r['lung_ml']:.0f} mL"
            for r in m["rows"]
            if r["method"].startswith("H-SAM")
        )
    s = m["heldout_phantoms"]
    return f"held-out phantom lung Dice {s['dice']['mean']:.3f}, HD95 {s['hd95_mm']['mean']:.1f} mm"
