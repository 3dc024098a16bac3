"""Axial slices of labelled volumes, for 2D training (H-SAM, and the UNet / UNETR baselines).

A datalist (MONAI decathlon style, as the pseudolabel bundle writes it) names whole volumes; this
module loads each once, checks it, windows it and keeps the slices worth training on in memory.
Bad cases (a missing label, a label on another grid than its image, an empty label, an unreadable
file) are reported with the file and the reason, counted and skipped; they never stop a run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def load_datalist(path: str | Path, allow_empty: bool = False, admit_excluded: bool = False) -> dict:
    """Read a decathlon-style datalist; relative paths are taken from the working directory, else from the datalist's folder.
    A datalist without training or validation cases is an error unless ``allow_empty`` (one of several joined).
    ``admit_excluded``: the cases QC excluded that have a pseudo label on disk train too (``excluded`` joins ``training``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist not found (run the pseudolabel bundle first, or pass datalist_path)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON datalist ({e})") from None
    out = {}
    admitted = [e for e in data.get("excluded", []) if e.get("image") and e.get("label")] if admit_excluded else []
    for split in ("training", "validation", "test"):
        items = []
        for item in data.get(split, []) + (admitted if split == "training" else []):
            item = dict(item)
            for key in ("image", "label"):
                if key in item and not Path(item[key]).is_absolute() and not Path(item[key]).exists() and (path.parent / item[key]).exists():
                    item[key] = str(path.parent / item[key])
            items.append(item)
        out[split] = items
    out["excluded"] = [] if admit_excluded else list(data.get("excluded", []))
    if not out["training"] and not out["validation"]:
        excluded = data.get("excluded", [])
        why = f" ({len(excluded)} excluded: {'; '.join(r for e in excluded[:3] for r in e.get('reasons', []))})" if excluded else ""
        if not allow_empty:
            raise ValueError(f"{path}: datalist has no 'training' or 'validation' cases{why}. QC excluded every case: look at the "
                             "pseudo labels (qc.csv and the overlays beside the datalist); to train on them anyway set "
                             "admit_qc_excluded=true (hsam_finetune: --admit_qc_excluded true), or re-run the pseudolabel bundle "
                             "with other qc thresholds (e.g. --qc#min_agreement 0.8 --overwrite true)")
        log.warning("%s: no training or validation case%s; training on the other datalists", path, why)
    return out


def _load_case(item: dict, hu_window: Sequence[float]):
    """(windowed image (X, Y, Z) float32, binary label (X, Y, Z)) of one case; ValueError names what is wrong."""
    from monai.transforms import LoadImage

    from common.io import CTReader
    from common.transforms import HUWindow

    image_path, label_path = item.get("image"), item.get("label")
    if label_path is None or not Path(str(label_path)).exists():
        raise ValueError(f"pseudo label not found: {label_path}")
    image = LoadImage(reader=CTReader(), image_only=True)(image_path)
    label = LoadImage(reader="NibabelReader", image_only=True)(label_path)
    if tuple(image.shape) != tuple(label.shape):
        raise ValueError(f"label {label_path} is on another grid than its image: shape {tuple(label.shape)} vs {tuple(image.shape)}")
    if not np.allclose(np.asarray(image.affine), np.asarray(label.affine), atol=1e-3):
        raise ValueError(f"label {label_path} is on another grid than its image: affines differ")
    label = np.asarray(label) > 0
    if not label.any():
        raise ValueError(f"label {label_path} is empty")
    return np.asarray(HUWindow(hu_window)(image), dtype=np.float32), label


def _resize_slices(x: np.ndarray, size: int | None, mode: str) -> torch.Tensor:
    """(Z, X, Y) -> (Z, 1, size, size) tensor (unchanged size when ``size`` is None)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    if size is None or tuple(t.shape[-2:]) == (size, size):
        return t
    if mode == "nearest":
        return (F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False) >= 0.5).float()
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _slice_items(image: np.ndarray, label: np.ndarray, zs: np.ndarray, size: int | None, case: str) -> list[dict]:
    """The axial slices ``zs`` of one case as training items (image and label resized to ``size``)."""
    imgs = _resize_slices(np.moveaxis(image[..., zs], -1, 0), size, "bilinear")
    labs = _resize_slices(np.moveaxis(label[..., zs], -1, 0), size, "nearest")
    return [{"image": imgs[i], "label": labs[i], "case_id": case, "slice": int(z)} for i, z in enumerate(zs)]


ENCLOSED_AIR_HU = -400.0  # darker than this and enclosed by the body: lung-like air


def enclosed_air_share(image01: np.ndarray, hu_window: Sequence[float] = (-1000.0, 400.0)) -> np.ndarray:
    """Per axial slice of a windowed (X, Y, Z) volume, the share of its pixels that is air the body encloses.

    Air is below ``ENCLOSED_AIR_HU``; what touches the slice's border is the air around the patient."""
    from scipy import ndimage

    from common.lungmask import touches_border

    lo, hi = float(hu_window[0]), float(hu_window[1])
    air = np.asarray(image01) < (ENCLOSED_AIR_HU - lo) / (hi - lo)
    share = np.zeros(air.shape[-1])
    for z in range(air.shape[-1]):
        labels, n = ndimage.label(air[..., z])
        if n == 0:
            continue
        share[z] = float(((labels > 0) & ~touches_border(labels, n)[labels]).mean())
    return share


def volume_slices(datalist: Sequence[dict], slice_size: int | None = None, background_share: float = 0.1, min_label_pixels: int = 20,
                  hu_window: Sequence[float] = (-1000.0, 400.0), seed: int = 0, split: str = "training", slice_step: int = 1,
                  background_max_air: float | None = 0.002, between_step: int = 0) -> dict:
    """``{"slices": [{"image": (1, S, S), "label": (1, S, S), "case_id", "slice"}, ...], "between": [...], "skipped": [{"case", "reason"}]}``.

    Every axial slice with at least ``min_label_pixels`` of label is kept, plus ``background_share`` as
    many slices without label (so the model learns to say "no lung"). ``slice_size`` resizes every
    slice to one square size so slices of different scans batch together (None: native size, which
    then must agree across cases). ``slice_step`` keeps every n-th label slice: neighbours a few mm
    apart add little but time when an epoch costs seconds per slice (CPU). ``between_step`` n > 0 also
    returns, under ``"between"``, every n-th of the label slices that ``slice_step`` leaves out (none when
    it is 1): slices of these scans that are never trained on, to validate on.

    A slice without label is a background candidate only where at most ``background_max_air`` of it is
    air the body encloses (:func:`enclosed_air_share`; None: every one): pseudo labels often stop a few
    centimetres short of the apex and the bases, and a slice past their end that still shows lung would
    teach "no lung" there. Such a slice is left out, neither positive nor negative.
    """
    rng = np.random.default_rng(seed)
    slices, between, skipped = [], [], []
    for item in datalist:
        case = str(item.get("case_id") or Path(str(item.get("image"))).name)
        try:
            image, label = _load_case(item, hu_window)
        except Exception as e:  # noqa: BLE001 - every bad case is reported and skipped, never fatal
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            skipped.append({"case": case, "image": str(item.get("image")), "reason": f"{type(cause).__name__}: {cause}"})
            log.warning("%s slices: case %s skipped: %s", split, case, skipped[-1]["reason"])
            continue
        counts = label.reshape(-1, label.shape[-1]).sum(axis=0)
        labelled = np.flatnonzero(counts >= min_label_pixels)
        fg = labelled[:: max(1, int(slice_step))]
        if between_step > 0:
            between += _slice_items(image, label, np.setdiff1d(labelled, fg)[:: int(between_step)], slice_size, case)
        bg = np.flatnonzero(counts == 0)
        if background_max_air is not None and bg.size:
            bg = bg[enclosed_air_share(image[..., bg], hu_window) <= float(background_max_air)]
        n_bg = min(len(bg), int(round(background_share * len(fg))))
        chosen = np.sort(np.concatenate([fg, rng.choice(bg, size=n_bg, replace=False) if n_bg else np.array([], dtype=int)]))
        slices += _slice_items(image, label, chosen, slice_size, case)
    if skipped:
        log.warning("%s slices: %d case(s) skipped, %d used", split, len(skipped), len(datalist) - len(skipped))
    log.info("%s slices: %d from %d case(s)%s", split, len(slices), len(datalist) - len(skipped),
             f", {len(between)} between them held out" if between_step > 0 else "")
    return {"slices": slices, "between": between, "skipped": skipped}


def training_slices(datalist_path: str | Path | Sequence[str | Path], slice_size: int | None = None, background_share: float = 0.1,
                    hu_window: Sequence[float] = (-1000.0, 400.0), seed: int = 0, max_cases: int | None = None, slice_step: int = 1,
                    val_slice_step: int | None = None, background_max_air: float | None = 0.002, admit_excluded: bool = False,
                    validate_between: bool = False) -> dict:
    """The training and validation slices of a pseudolabel datalist, or of several (their splits joined, e.g.
    phantoms and real scans): ``{"training": [...], "validation": [...], "skipped": [...]}``. ``val_slice_step``
    (default: ``slice_step``) thins the validation slices alone: validation runs every epoch, and a mean Dice
    over every n-th slice tracks it at a fraction of the cost. ``admit_excluded`` trains on the cases QC excluded too.

    ``validate_between``: the validation slices also take, from every training scan, the label slices that
    ``slice_step`` leaves out (every ``val_slice_step``-th of them), so that the checkpoint is chosen on every
    scan's anatomy, not on the validation cases alone (at the demo's size one small crop). They lie next to
    training slices: a check of the fit to each scan, not of a new scan."""
    paths = [datalist_path] if isinstance(datalist_path, (str, Path)) else list(datalist_path)
    if not paths:
        raise ValueError("datalist_path names no datalist")
    if validate_between and int(slice_step) < 2:
        raise ValueError("validate_between needs slice_step >= 2: with every label slice in training none lies between them")
    loaded = [load_datalist(p, allow_empty=len(paths) > 1, admit_excluded=admit_excluded) for p in paths]
    datalist = {split: [item for d in loaded for item in d[split]] for split in ("training", "validation")}
    out, skipped = {}, []
    val_step = slice_step if val_slice_step is None else val_slice_step
    for split in ("training", "validation"):
        cases = datalist[split][: max_cases] if max_cases else datalist[split]
        step = slice_step if split == "training" else val_step
        got = volume_slices(cases, slice_size, background_share, hu_window=hu_window, seed=seed, split=split, slice_step=step,
                            background_max_air=background_max_air, between_step=val_step if validate_between and split == "training" else 0)
        out[split] = got["slices"]
        skipped += got["skipped"]
        if split == "training":
            between = got["between"]
    out["validation"] += between  # the training scans' slices between their training slices
    if not out["training"]:
        excluded = sum(len(d["excluded"]) for d in loaded)
        hint = (f"; QC excluded {excluded} case(s): set admit_qc_excluded=true (hsam_finetune: --admit_qc_excluded true) to train on them anyway"
                if excluded else "")
        raise ValueError(f"{datalist_path}: no usable training case ({len(skipped)} skipped: {[s['reason'] for s in skipped][:3]}){hint}")
    out["skipped"] = skipped
    return out
