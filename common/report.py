"""Figures and the HTML page a person reads: slice overlays and a self-contained report."""

from __future__ import annotations

import html
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
    ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], aspect=spacing[1] / spacing[0], interpolation="bilinear")
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
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html_page(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """A self-contained page: ``sections`` are (heading, HTML body) pairs."""
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:12px;margin:0.5em 0;display:block;overflow-x:auto;max-width:100%}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}"
        "th{background:#f3f3f3}.fail{color:#b00}.figs{display:flex;flex-wrap:wrap;gap:10px}.figs figure{margin:0}"
        ".figs img{max-width:260px;border:1px solid #ddd}figcaption{font-size:12px;color:#555;max-width:260px}"
    )
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{b}\n" for h, b in sections)
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    return write_text_atomic(path, page)


def figure_grid(items: Sequence[tuple[str, str]]) -> str:
    """(relative image path, caption) pairs as a wrapped grid of figures."""
    figs = "".join(f"<figure><img src='{html.escape(src)}' alt='{html.escape(cap)}'><figcaption>{html.escape(cap)}</figcaption></figure>" for src, cap in items)
    return f"<div class='figs'>{figs}</div>"


def save_training_curves_png(history: Sequence[dict], path: str | Path, losses: Sequence[str], metrics: Sequence[str], title: str = "") -> Path:
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
    for ax in (left, right):
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
        ax.text(c, r, str(int(n)), ha="center", va="center", fontsize=8, color="white" if rates[r, c] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("zero-shot prediction")
    ax.set_ylabel("phantom ground truth")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)
