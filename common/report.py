"""Figures and the HTML page a person reads: slice overlays and a self-contained report."""

from __future__ import annotations

import html
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from common.io.atomic import atomic_path, write_text_atomic

LUNG_WINDOW = (-1350.0, 150.0)  # W1500 / L-600
MEDIASTINAL_WINDOW = (-160.0, 240.0)  # W400 / L40


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG through a temporary name, then close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _plt().close(fig)
    return path


def save_dice_bars(
    path: str | Path, labels: Sequence[str], dice: Sequence[float], grey: Sequence[bool], target: float, xlabel: str
) -> Path:
    """Horizontal bars of one Dice per setting (benchmark sweeps and ablations), the value written at
    each bar, a dashed line at ``target``; ``grey`` marks reference rows. A setting that fails
    outright (Dice <= 0.5) is drawn at the axis start with its value, so it does not stretch the scale."""
    plt = _plt()
    values = np.asarray(dice, dtype=float)
    lo = max(0.0, float(values[values > 0.5].min(initial=1.0)) - 0.05)
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(values) + 1.2), dpi=110)
    ax.barh(range(len(values)), np.maximum(values, lo), color=["#888" if g else "#1f77b4" for g in grey])
    for i, v in enumerate(values):
        ax.text(max(v, lo) + 0.002, i, f"{v:.3f}", va="center", fontsize=7)
    ax.set_yticks(range(len(values)), list(labels), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(lo, 1.0)
    ax.axvline(target, color="r", lw=0.8, ls="--")
    ax.set_xlabel(xlabel, fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


def axial_display(plane_ij: np.ndarray) -> np.ndarray:
    """An [i, j] axial slice of an LPS-ordered volume (``CTVolume.reorient("LPS")``: i to patient left,
    j to posterior) as radiologists view it: anterior at the top, patient right on the image left."""
    return np.asarray(plane_ij).T


def save_overlay_png(
    path: str | Path,
    hu_plane: np.ndarray,
    masks: Sequence[tuple[np.ndarray, str]] = (),
    title: str = "",
    window: tuple[float, float] = LUNG_WINDOW,
    spacing: tuple[float, float] = (1.0, 1.0),
) -> Path:
    """An axial HU slice in a window with mask contours (mask, colour) drawn on it; written atomically."""
    plt = _plt()
    img = axial_display(hu_plane)
    fig, ax = plt.subplots(figsize=(4.2, 4.2 * img.shape[0] * spacing[1] / (img.shape[1] * spacing[0])), dpi=110)
    ax.imshow(
        img, cmap="gray", vmin=window[0], vmax=window[1], aspect=spacing[1] / spacing[0], interpolation="bilinear"
    )
    for mask, colour in masks:
        m = axial_display(mask).astype(float)
        if m.any():
            ax.contour(m, levels=[0.5], colors=[colour], linewidths=1.0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout(pad=0.2)
    return _save_figure(fig, path)


def html_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p>(none)</p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html_page(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """A self-contained page: ``sections`` are (heading, HTML body) pairs."""
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:12px;margin:0.5em 0;display:block;overflow-x:auto;max-width:100%}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}"
        "th{background:#f3f3f3}.fail{color:#b00}.figs{display:flex;flex-wrap:wrap;gap:10px}.figs figure{margin:0}"
        ".figs img{max-width:260px;border:1px solid #ddd}figcaption{font-size:12px;color:#555;max-width:260px}"
        ".figs.wide img,.figs.wide figcaption{max-width:540px}"
    )
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{b}\n" for h, b in sections)
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    return write_text_atomic(path, page)


def figure_grid(items: Sequence[tuple[str, str]], wide: bool = False) -> str:
    """(relative image path, caption) pairs as a wrapped grid of figures (``wide``: two to a row, not four)."""
    figs = "".join(
        f"<figure><img src='{html.escape(src)}' alt='{html.escape(cap)}'><figcaption>{html.escape(cap)}</figcaption></figure>"
        for src, cap in items
    )
    return f"<div class='figs{' wide' if wide else ''}'>{figs}</div>"


def save_training_curves_png(
    history: Sequence[dict], path: str | Path, losses: Sequence[str], metrics: Sequence[str], title: str = ""
) -> Path:
    """Per-epoch training losses (left) and validation metrics (right), the best epoch marked; written atomically."""
    plt = _plt()
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    for key in losses:
        values = [row.get(key, float("nan")) for row in history]
        if any(v == v for v in values):
            left.plot(epochs, values, marker="o", ms=3, label=key)
    left.set_xlabel("epoch")
    left.set_yscale("log")  # the distillation MSE is orders of magnitude below the contrastive loss
    left.set_title("training losses (epoch means)", fontsize=9)
    for key in metrics:
        values = [row.get(key, float("nan")) for row in history]
        if any(v == v for v in values):
            right.plot(epochs, values, marker="o", ms=3, label=key)
    best = [row.get("best_epoch") for row in history if row.get("best_epoch")]
    if best:
        right.axvline(best[-1], color="grey", ls="--", lw=0.8, label=f"best epoch {best[-1]}")
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    right.set_title("validation", fontsize=9)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.25 ticks on a short run
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path)


def save_confusion_png(matrix: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """A confusion matrix (rows: true class, columns: predicted) with counts; written atomically."""
    plt = _plt()
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=110)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (r, c), n in np.ndenumerate(matrix):
        ax.text(
            c, r, str(int(n)), ha="center", va="center", fontsize=8, color="white" if rates[r, c] > 0.5 else "black"
        )
    ax.set_xticks(range(len(class_names)), class_names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("zero-shot prediction")
    ax.set_ylabel("phantom ground truth")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


CLASS_COLOURS = ("#2ca02c", "#d62728", "#ff7f0e", "#17becf", "#f0f0f0")  # lung, heart, vessel, airway, bone


def save_probmap_overlay_png(
    path: str | Path,
    hu: np.ndarray,
    prob: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    class_names: Sequence[str],
    title: str = "",
    k: int | None = None,
) -> Path:
    """Two panels of one axial slice (the one with most lung, unless ``k``): the lung probability as a heat map
    with the lung mask's contour, and the most probable class per pixel. Arrays on the input grid:
    ``hu`` and ``mask`` (X, Y, Z), ``prob`` (C, X, Y, Z); shown in the radiological view."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from common.io.volume import reorient_array

    plt = _plt()
    hu_l, _ = reorient_array(np.asarray(hu), affine)
    mask_l, _ = reorient_array(np.asarray(mask), affine)
    prob_l = np.stack([reorient_array(np.asarray(p), affine)[0] for p in prob])
    if k is None:
        area = mask_l.reshape(-1, mask_l.shape[2]).sum(0)
        k = int(area.argmax()) if area.any() else mask_l.shape[2] // 2
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    aspect = float(spacing[1] / spacing[0]) if spacing[0] > 0 else 1.0
    ct = axial_display(hu_l[:, :, k])
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.4), dpi=100)
    for ax in axes:
        ax.imshow(ct, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=aspect)
        ax.axis("off")
    heat = axes[0].imshow(axial_display(prob_l[0, :, :, k]), cmap="inferno", vmin=0, vmax=1, alpha=0.5, aspect=aspect)
    if mask_l[:, :, k].any():
        axes[0].contour(axial_display(mask_l[:, :, k]).astype(float), levels=[0.5], colors=["#00ffff"], linewidths=1.0)
    fig.colorbar(heat, ax=axes[0], fraction=0.04, pad=0.01)
    axes[0].set_title(f"{class_names[0]} probability, mask contour (slice {k})", fontsize=8)
    arg = np.argmax(prob_l[:, :, :, k], axis=0)
    colours = [CLASS_COLOURS[i % len(CLASS_COLOURS)] for i in range(len(class_names))]
    axes[1].imshow(
        axial_display(arg),
        cmap=ListedColormap(colours),
        vmin=-0.5,
        vmax=len(class_names) - 0.5,
        alpha=0.45,
        aspect=aspect,
        interpolation="nearest",
    )
    axes[1].set_title("most probable class", fontsize=8)
    axes[1].legend(
        handles=[Patch(color=c, label=n) for c, n in zip(colours, class_names)],
        fontsize=6,
        loc="lower right",
        framealpha=0.6,
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    return _save_figure(fig, path)


def save_pseudolabel_overlay_png(
    path: str | Path, hu: np.ndarray, reference: np.ndarray, sides: np.ndarray, affine: np.ndarray, title: str = ""
) -> Path:
    """Three axial slices (at 30, 50 and 70 % of the lung's extent) with the SA-2 lung mask (dashed) and the
    pseudo label's right (green) and left (blue) lungs; arrays (X, Y, Z) on the input grid, radiological view."""
    from common.io.volume import reorient_array

    plt = _plt()
    hu_l, _ = reorient_array(np.asarray(hu), affine)
    ref_l, _ = reorient_array(np.asarray(reference).astype(np.uint8), affine)
    sides_l, _ = reorient_array(np.asarray(sides).astype(np.uint8), affine)
    ks = np.flatnonzero(sides_l.any(axis=(0, 1)))
    if not ks.size:
        ks = np.flatnonzero(ref_l.any(axis=(0, 1)))
    if not ks.size:
        ks = np.array([hu_l.shape[2] // 2])
    picks = sorted({int(ks[int(round(f * (len(ks) - 1)))]) for f in (0.3, 0.5, 0.7)})
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    aspect = float(spacing[1] / spacing[0]) if spacing[0] > 0 else 1.0
    fig, axes = plt.subplots(1, len(picks), figsize=(3.6 * len(picks), 3.9), dpi=100, squeeze=False)
    for ax, k in zip(axes[0], picks):
        ax.imshow(axial_display(hu_l[:, :, k]), cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=aspect)
        for m, colour, style in (
            (ref_l[:, :, k] > 0, "#ffd700", "dashed"),
            (sides_l[:, :, k] == 1, "#2ca02c", "solid"),
            (sides_l[:, :, k] == 2, "#1f77b4", "solid"),
        ):
            if m.any():
                ax.contour(
                    axial_display(m).astype(float), levels=[0.5], colors=[colour], linewidths=1.0, linestyles=style
                )
        ax.set_title(f"slice {k}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title}: pseudo label right (green) / left (blue), SA-2 mask (dashed yellow)", fontsize=8)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.93))
    return _save_figure(fig, path)


def save_method_overlays_png(
    path: str | Path,
    hu: np.ndarray,
    masks: Sequence[tuple[str, np.ndarray]],
    affine: np.ndarray,
    reference: np.ndarray | None = None,
    fractions: Sequence[float] = (0.1, 0.5, 0.9),
    title: str = "",
) -> Path:
    """One column per method, one row per axial slice (at ``fractions`` of the reference's, else the first
    mask's, lung extent; in RAS order: base, middle, apex): the method's mask in red, ``reference`` (ground truth) dashed
    yellow. Arrays (X, Y, Z) on the input grid, shown in the radiological view."""
    from common.io.volume import reorient_array

    plt = _plt()
    hu_l, _ = reorient_array(np.asarray(hu), affine)
    masks_l = [(name, reorient_array(np.asarray(m).astype(np.uint8), affine)[0] > 0) for name, m in masks]
    ref_l = None if reference is None else reorient_array(np.asarray(reference).astype(np.uint8), affine)[0] > 0
    extent = np.flatnonzero((ref_l if ref_l is not None else masks_l[0][1]).any(axis=(0, 1)))
    if not extent.size:
        extent = np.array([hu_l.shape[2] // 2])
    picks = sorted({int(extent[int(round(f * (len(extent) - 1)))]) for f in fractions})
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    aspect = float(spacing[1] / spacing[0]) if spacing[0] > 0 else 1.0
    fig, axes = plt.subplots(
        len(picks), len(masks_l), figsize=(2.6 * len(masks_l), 3.0 * len(picks)), dpi=100, squeeze=False
    )
    for row, k in zip(axes, picks):
        for ax, (name, m) in zip(row, masks_l):
            ax.imshow(
                axial_display(hu_l[:, :, k]), cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=aspect
            )
            for mask, colour, style in (
                (None if ref_l is None else ref_l[:, :, k], "#ffd700", "dashed"),
                (m[:, :, k], "#e41a1c", "solid"),
            ):
                if mask is not None and mask.any():
                    ax.contour(
                        axial_display(mask).astype(float),
                        levels=[0.5],
                        colors=[colour],
                        linewidths=0.9,
                        linestyles=style,
                    )
            ax.set_title(f"{name}\nslice {k}", fontsize=7)
            ax.axis("off")
    height = fig.get_figheight()
    # wrapped to the figure's width (about 15 characters an inch at 8 pt): one column of slices cut a long title off
    lines = textwrap.wrap(
        title + ("; truth dashed yellow" if ref_l is not None else ""), width=max(24, int(15 * fig.get_figwidth()))
    )
    fig.suptitle("\n".join(lines), fontsize=8, y=1 - 0.08 / height)
    # explicit spacing: tight_layout let each row's two-line titles run into the row above
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.01, top=1 - (0.5 + 0.15 * len(lines)) / height, wspace=0.04, hspace=0.25
    )
    return _save_figure(fig, path)


def save_pipeline_overlay_png(
    path: str | Path, cases: Sequence[dict], window: tuple[float, float] = LUNG_WINDOW
) -> Path:
    """One row per case, one column per stage, all on the axial slice through the middle of the H-SAM mask:
    the CT; the lung probability (heat map); the pseudo label; the H-SAM mask (red), with the true lung field
    dashed yellow where known. Each case: ``name``, ``hu``, ``affine``, ``lung_probability``, ``pseudo_label``
    (or None: a case that was not pseudo-labelled), ``hsam`` and ``truth`` (or None), arrays (X, Y, Z) on the
    input grid; shown in the radiological view."""
    from common.io.volume import reorient_array

    plt = _plt()
    fig, axes = plt.subplots(len(cases), 4, figsize=(13, 3.4 * len(cases)), dpi=100, squeeze=False)
    for row, case in zip(axes, cases):
        affine = np.asarray(case["affine"])
        lps = lambda a: reorient_array(np.asarray(a), affine)[0]  # noqa: E731
        hu, prob, hsam = lps(case["hu"]), lps(case["lung_probability"]), lps(case["hsam"])
        pseudo = None if case.get("pseudo_label") is None else lps(case["pseudo_label"])
        truth = None if case.get("truth") is None else lps(case["truth"])
        extent = np.flatnonzero(hsam.any(axis=(0, 1)))
        k = int(extent[len(extent) // 2]) if extent.size else hu.shape[2] // 2
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        aspect = float(spacing[1] / spacing[0]) if spacing[0] > 0 else 1.0
        for ax in row:
            ax.imshow(axial_display(hu[:, :, k]), cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect)
            ax.axis("off")
        heat = row[1].imshow(axial_display(prob[:, :, k]), cmap="inferno", vmin=0, vmax=1, alpha=0.55, aspect=aspect)
        fig.colorbar(heat, ax=row[1], fraction=0.04, pad=0.01)
        for ax, mask, colour in ((row[2], pseudo, "#2ca02c"), (row[3], hsam, "#e41a1c")):
            if mask is not None and mask[:, :, k].any():
                ax.contour(axial_display(mask[:, :, k]).astype(float), levels=[0.5], colors=[colour], linewidths=1.1)
        if truth is not None and truth[:, :, k].any():
            row[3].contour(
                axial_display(truth[:, :, k]).astype(float),
                levels=[0.5],
                colors=["#ffd700"],
                linewidths=0.9,
                linestyles="dashed",
            )
        pseudo_title = "SA-3a pseudo label" if pseudo is not None else "no pseudo label (not made for this case)"
        for ax, label in zip(
            row,
            (
                "CT (lung window)",
                "SA-2 lung probability",
                pseudo_title,
                "SA-3b H-SAM mask" + (" (truth dashed)" if truth is not None else ""),
            ),
        ):
            name = case["name"].replace(
                " (", "\n(", 1
            )  # "case_id (what it is)" on two lines: wider than the axes on one
            ax.set_title(f"{name}, slice {k}\n{label}" if ax is row[0] else label, fontsize=9)
    fig.tight_layout(pad=0.4)
    return _save_figure(fig, path)
