"""Writing phantoms (NIfTI + report JSON), a slice as PNG, and the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common.classes import AIRWAY, BONE, HEART, LUNG, VESSEL
from common.io.atomic import atomic_path, write_json_atomic
from common.io.nifti import save_nifti_array
from common.phantom.core import Phantom, _CLASS_OF_LABEL
from common.phantom.builder import generate_phantom


def phantom_paths(out_dir, case_id) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "ct": out_dir / f"{case_id}_ct.nii.gz",
        "label": out_dir / f"{case_id}_label.nii.gz",
        "lungs": out_dir / f"{case_id}_lungs.nii.gz",
        "report": out_dir / f"{case_id}_report.json",
    }


def write_phantom(phantom: Phantom, out_dir, case_id: str, overwrite: bool = False) -> dict[str, str]:
    """Write ``{case_id}_ct.nii.gz`` (int16 HU), ``_label.nii.gz``, ``_lungs.nii.gz`` (uint8, same
    affine) and ``_report.json``, each through a temporary name.  Existing complete outputs are
    kept unless ``overwrite``.  Returns the paths."""
    paths = phantom_paths(out_dir, case_id)
    if not overwrite and all(p.exists() for p in paths.values()):
        return {k: str(p) for k, p in paths.items()}
    phantom.ct.to_nifti(paths["ct"])
    for key, arr in (("label", phantom.labels), ("lungs", phantom.lungs)):
        save_nifti_array(arr, phantom.ct.affine, paths[key], np.uint8, xyz_units="mm", sform=False)
    write_json_atomic(
        paths["report"],
        {"case_id": case_id, "report": phantom.report, "captions": phantom.captions, "meta": phantom.meta},
    )
    return {k: str(p) for k, p in paths.items()}


_LABEL_COLOURS = {
    LUNG: (0.25, 0.55, 1.0, 0.35),
    HEART: (1.0, 0.2, 0.2, 0.55),
    VESSEL: (1.0, 0.35, 0.9, 0.75),
    AIRWAY: (0.1, 1.0, 0.4, 0.8),
    BONE: (1.0, 0.9, 0.2, 0.65),
}


def _window(img, width, level):
    lo = level - width / 2
    return np.clip((img - lo) / width, 0, 1)


def render_slice_png(
    phantom: Phantom, path, k: int | None = None, coronal: bool = False, j: int | None = None, dpi: int = 100
) -> Path:
    """Save a PNG: the axial slice ``k`` in lung window (W1500/L-600), mediastinal window
    (W400/L40) and with the label overlay; ``coronal`` adds the same for coronal row ``j``.
    Radiological display: patient right on the image left, anterior (or superior) up."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from PIL import Image

    hu, lab = phantom.ct.hu, phantom.labels
    sx, sy, sz = phantom.ct.spacing
    k = int(phantom.meta.get("default_slice_k", hu.shape[2] // 2) if k is None else k)
    j = int(phantom.meta.get("default_coronal_j", hu.shape[1] // 2) if j is None else j)
    views = [("axial", hu[:, :, k].T, lab[:, :, k].T, sy / sx, "upper", f"axial k={k}")]
    if coronal:
        views.append(("coronal", hu[:, j, :].T, lab[:, j, :].T, sz / sx, "lower", f"coronal j={j}"))
    cm = ListedColormap([(0, 0, 0, 0)] + [_LABEL_COLOURS[v] for v in (LUNG, HEART, VESSEL, AIRWAY, BONE)])
    fig_w = 3 * 4.2
    heights = [4.2 * img.shape[0] * asp / img.shape[1] for _, img, _, asp, _, _ in views]
    fig, axes = plt.subplots(
        len(views),
        3,
        figsize=(fig_w, sum(heights) + 0.5 * len(views)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    fig.patch.set_facecolor("black")
    for row, (name, img, lb, asp, origin, title) in enumerate(views):
        ax = axes[row]
        ax[0].imshow(
            _window(img, 1500, -600), cmap="gray", vmin=0, vmax=1, aspect=asp, origin=origin, interpolation="bilinear"
        )
        ax[1].imshow(
            _window(img, 400, 40), cmap="gray", vmin=0, vmax=1, aspect=asp, origin=origin, interpolation="bilinear"
        )
        ax[2].imshow(
            _window(img, 1500, -600), cmap="gray", vmin=0, vmax=1, aspect=asp, origin=origin, interpolation="bilinear"
        )
        ax[2].imshow(lb, cmap=cm, vmin=-0.5, vmax=5.5, aspect=asp, origin=origin, interpolation="nearest")
        for a, t in zip(ax, ("lung window W1500/L-600", "mediastinal window W400/L40", "labels")):
            a.set_title(f"{t} - {title}", color="white", fontsize=9)
            a.axis("off")
            a.text(0.01, 0.5, "R", color="yellow", transform=a.transAxes, fontsize=9, va="center")
            a.text(0.97, 0.5, "L", color="yellow", transform=a.transAxes, fontsize=9, va="center")
    handles = [
        Patch(color=_LABEL_COLOURS[v][:3], label=_CLASS_OF_LABEL[v]) for v in (LUNG, HEART, VESSEL, AIRWAY, BONE)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False, labelcolor="white")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, facecolor="black", format="png")
    plt.close(fig)
    buf.seek(0)
    im = Image.open(buf).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    path = Path(path)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", optimize=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m common.phantom", description="Write synthetic chest CT phantoms (NIfTI + report JSON)."
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=4, help="number of phantoms (seeds seed .. seed+n-1)")
    p.add_argument("--shape", type=int, nargs=3, default=[160, 160, 96])
    p.add_argument("--spacing", type=float, nargs=3, default=[2.0, 2.0, 2.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-hu", type=float, default=20.0)
    p.add_argument("--blur-mm", type=float, default=1.0)
    p.add_argument("--prefix", default="phantom")
    p.add_argument("--png", action="store_true", help="also write a PNG of one axial and one coronal slice per phantom")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    from tqdm import tqdm

    for seed in tqdm(range(args.seed, args.seed + args.n), desc="phantoms", unit="case"):
        case_id = f"{args.prefix}_{seed:03d}"
        paths = phantom_paths(args.out, case_id)
        if not args.overwrite and all(q.exists() for q in paths.values()):
            continue
        ph = generate_phantom(
            tuple(args.shape), tuple(args.spacing), seed=seed, noise_hu=args.noise_hu, blur_mm=args.blur_mm
        )
        write_phantom(ph, args.out, case_id, overwrite=args.overwrite)
        if args.png:
            render_slice_png(ph, Path(args.out) / f"{case_id}_slice.png", coronal=True)
    return 0
