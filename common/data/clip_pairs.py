"""SA-1 training data: (slice or patch, text) pairs and text-less slices, as MONAI-style datalists.

Every CT volume of a manifest (``common.default_data``) becomes 2D samples written once to disk as
float16 ``.npy`` (HU window [-1000, 400] -> [0, 1], radiological view: patient right on the
image left, anterior up):

* **slices**: the middle ``num_slices`` axial slices (the method trims to 20), resized to
  ``slice_size``. Their text is a report (phantom report sentences; RAD-ChestCT labels and
  DeepLesion lesion metadata turned into sentences) or empty: text-less slices teach the image
  encoder through distillation only.
* **patches**: squares of ``patch_mm`` millimetres centred on one class, resized to ``patch_size``,
  with a grounded caption ("CT patch of the aorta, a blood vessel"). They are what makes
  patch-level zero-shot classification (SA-2) work. Phantoms give every class of
  ``PATCH_CLASSES`` (their label map says what is under the patch; label 0 inside the body is
  "soft tissue"); real scans give what needs no hand-drawn label: "air outside the body"
  (``body_mask``) and "lung" where the classical HU threshold finds it. Without the first SA-2 has
  no class for that air but lung; without the second the only real patches are of air, and the
  model learns that dark real CT is outside air.

Held-out phantoms make the validation split (their patches carry a class index for zero-shot
accuracy). A case already written is reused on re-run; an unreadable case is reported and skipped.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from common.classes import PATCH_CLASSES
from common.io import read_ct, read_radchestct_labels, write_json_atomic
from common.io.atomic import atomic_path
from common.transforms.intensity import HU_WINDOW, HUWindow

log = logging.getLogger(__name__)

# Zero-shot prompt per class (Eq. 4 compares a patch with these); patch captions share its wording.
PATCH_PROMPT = "CT patch of the {}"
DATALIST_FORMAT = "clip_pairs/1"
# The patch classes a real scan gives without a hand-drawn label (body_mask, the classical HU threshold).
REAL_PATCH_CLASSES = ("lung", "air outside the body")

# DeepLesion DL_info.csv Coarse_lesion_type codes.
DEEPLESION_TYPES = {1: "bone", 2: "abdomen", 3: "mediastinum", 4: "liver", 5: "lung", 6: "kidney", 7: "soft tissue", 8: "pelvis"}


def class_prompts(template: str = PATCH_PROMPT, class_names: Sequence[str] = PATCH_CLASSES) -> list[str]:
    """One text prompt per patch class (the anatomical classes in channel order, then the background ones)."""
    return [template.format(c) for c in class_names]


def patch_caption(structure: str, class_name: str) -> str:
    """Grounded caption of a patch: the structure by name, and its class when the name does not say it."""
    text = PATCH_PROMPT.format(structure)
    if class_name not in structure:
        text += f", {'an' if class_name[0] in 'aeiou' else 'a'} {class_name}"
    return text


# --------------------------------------------------------------------------- report sentences


def radchestct_sentences(labels: Sequence[str]) -> list[str]:
    """RAD-ChestCT ``abnormality*location`` labels -> sentences ("Nodule in the right upper lobe.")."""
    findings: dict[str, list[str]] = {}
    for label in labels:
        abnormality, _, location = str(label).partition("*")
        findings.setdefault(abnormality.replace("_", " ").strip(), [])
        if location:
            findings[abnormality.replace("_", " ").strip()].append(location.replace("_", " ").strip())
    out = []
    for abnormality, locations in findings.items():
        where = f" in the {' and '.join(sorted(set(locations)))}" if locations else ""
        out.append(f"{abnormality.capitalize()}{where}.")
    return out or ["No abnormality labelled."]


def deeplesion_sentences(rows: Sequence[dict]) -> list[str]:
    """DL_info.csv rows of one series -> one sentence per lesion ("Lung lesion, 12 mm by 8 mm.")."""
    out = []
    for row in rows:
        kind = DEEPLESION_TYPES.get(int(float(row.get("Coarse_lesion_type", -1) or -1)), "unclassified")
        diam = [float(x) for x in re.split(r"[,\s]+", str(row.get("Lesion_diameters_Pixel_", "")).strip()) if x]
        spacing = [float(x) for x in re.split(r"[,\s]+", str(row.get("Spacing_mm_px_", "")).strip()) if x]
        size = ""
        if len(diam) >= 2 and spacing:
            size = f", {diam[0] * spacing[0]:.0f} mm by {diam[1] * spacing[0]:.0f} mm"
        out.append(f"{kind.capitalize()} lesion{size}.")
    return out


def read_deeplesion_rows(dl_info_csv: str | Path, series: str) -> list[dict]:
    """The DL_info.csv rows whose File_name belongs to ``series`` (patient_study_series)."""
    import csv

    with open(dl_info_csv, newline="") as fh:
        return [row for row in csv.DictReader(fh) if str(row.get("File_name", "")).startswith(series + "_")]


def case_text(case: dict, text_preprocessing: str = "clean") -> str:
    """The report text of a manifest case ('' when it has none: distillation-only)."""
    sentences: list[str] = []
    if case.get("kind") == "phantom" and case.get("report"):
        sentences = list(json.loads(Path(case["report"]).read_text())["report"])
    elif case.get("labels_csv"):
        sentences = radchestct_sentences(read_radchestct_labels(case["labels_csv"], Path(case["path"]).stem))
    elif case.get("dl_info_csv"):
        sentences = deeplesion_sentences(read_deeplesion_rows(case["dl_info_csv"], Path(case["path"]).name))
    text = " ".join(sentences)
    if text and text_preprocessing == "clean":
        from common.text import clean_report

        text = clean_report(text)
    elif text_preprocessing not in ("clean", "none"):
        raise ValueError(f"text_preprocessing must be 'clean' or 'none', got {text_preprocessing!r}")
    return text


# --------------------------------------------------------------------------- slices and patches


def _resize2d(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    from monai.transforms import Resize

    if img.shape == (size, size):
        return img
    kw = {"anti_aliasing": True} if mode != "nearest" else {}
    return np.asarray(Resize((size, size), mode=mode, **kw)(img[None]))[0]


def _square(img: np.ndarray, fill: float) -> np.ndarray:
    """Pad the shorter side so that the slice is square (a field of view is round, slices usually square)."""
    h, w = img.shape
    if h == w:
        return img
    s = max(h, w)
    out = np.full((s, s), fill, dtype=img.dtype)
    out[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = img
    return out


def axial_slice01(hu: np.ndarray, k: int, size: int, window: HUWindow, fill: float | None = None) -> np.ndarray:
    """Axial slice ``k`` of an LPS-ordered [i, j, k] HU volume as the model sees it: radiological view
    (``hu[:, :, k].T``), padded square with ``fill`` (default: the volume minimum), resized (area) to
    ``size`` and HU-windowed to [0, 1], float32. Training samples and inference share it."""
    fill = float(hu.min()) if fill is None else float(fill)
    sq = _square(np.asarray(hu[:, :, k], dtype=np.float32).T, fill)
    return np.asarray(window(_resize2d(sq, int(size), "area")), dtype=np.float32)


def sample_patch_centres(label: np.ndarray, class_value: int, patch_px: int, purity: float, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to ``n`` (row, col) centres where the central quarter of the patch is >= ``purity`` this class."""
    from scipy import ndimage

    half = patch_px // 2
    core = max(patch_px // 4, 1)
    frac = ndimage.uniform_filter((label == class_value).astype(np.float32), size=core, mode="constant")
    ok = (frac >= purity) & (label == class_value)
    ok[:half, :] = ok[-half:, :] = False  # the whole patch must lie inside the slice
    ok[:, :half] = ok[:, -half:] = False
    rows, cols = np.nonzero(ok)
    if rows.size == 0:
        return []
    pick = rng.choice(rows.size, size=min(n, rows.size), replace=False)
    return [(int(rows[p]), int(cols[p])) for p in pick]


def _structure_at(captions: list[dict], class_name: str, ijk: tuple[int, int, int]) -> str:
    """Name of the smallest captioned structure of ``class_name`` whose 3D box holds voxel ``ijk``."""
    best, best_size = class_name, None
    for cap in captions:
        if cap["class"] != class_name:
            continue
        lo, hi = cap["bbox_ijk"]
        if all(lo[a] <= ijk[a] <= hi[a] for a in range(3)) and (best_size is None or cap["voxels"] < best_size):
            best, best_size = cap["text"], cap["voxels"]
    return best


class _CaseWriter:
    """Writes one case's samples (npy, float16) and its entry list; the case index file is written last."""

    def __init__(self, out_dir: Path, case_id: str):
        self.out_dir, self.case_id, self.entries = out_dir, case_id, []

    def add(self, img01: np.ndarray, kind: str, name: str, text: str, label: int, slice_index: int) -> None:
        rel = Path("samples") / self.case_id / f"{name}.npy"
        with atomic_path(self.out_dir / rel) as tmp:
            np.save(tmp, img01.astype(np.float16))
        self.entries.append({"image": str(rel), "text": text, "label": int(label), "kind": kind, "case_id": self.case_id,
                             "slice_index": int(slice_index), "sample_id": f"{self.case_id}/{name}"})


def patch_class_map(label2d: np.ndarray | None, body2d: np.ndarray, hu_lung2d: np.ndarray | None = None) -> np.ndarray:
    """Per pixel, 1 + the index in ``PATCH_CLASSES`` of what is there (0: no patch class).

    ``label2d`` is a phantom's label map; label 0 inside the body (``body2d``) is soft tissue, anything
    outside it is air. A real scan has no label map (None): what is known there without one is the air
    outside the body and, from the classical HU threshold (``hu_lung2d``), the lung."""
    air, soft = PATCH_CLASSES.index("air outside the body") + 1, PATCH_CLASSES.index("soft tissue") + 1
    out = np.zeros(body2d.shape, dtype=np.uint8) if label2d is None else np.asarray(label2d, dtype=np.uint8).copy()
    if label2d is not None:
        out[(out == 0) & body2d] = soft
    elif hu_lung2d is not None:
        out[hu_lung2d & body2d] = PATCH_CLASSES.index("lung") + 1
    out[~body2d] = air
    return out


def _mask_plane(mask: np.ndarray, k: int, size: int) -> np.ndarray:
    """Axial plane ``k`` of an [i, j, k] label or mask volume on the model's slice grid (as :func:`axial_slice01`), float32."""
    return _resize2d(_square(mask[:, :, k].T.astype(np.float32), 0), size, "nearest")


def build_case_samples(case: dict, out_dir: str | Path, settings: dict) -> list[dict]:
    """Write the slices and patches of one manifest case; returns its datalist entries."""
    from common.lungmask import body_mask, hu_threshold_lung_mask

    out_dir = Path(out_dir)
    vol = read_ct(case["path"], axcodes="LPS")
    hu = vol.hu
    n_k = hu.shape[2]
    is_phantom = case.get("kind") == "phantom"
    window = HUWindow(settings["hu_window"])
    writer = _CaseWriter(out_dir, case["id"])
    text = case_text(case, settings["text_preprocessing"])
    label = None
    if is_phantom:
        import nibabel as nib

        from common.io.volume import reorient_array

        label_img = nib.load(str(case["label"]))
        label, _ = reorient_array(np.asarray(label_img.dataobj), label_img.affine, "LPS")
        if label.shape != hu.shape:
            raise ValueError(f"{case['label']}: label shape {label.shape} differs from the CT {hu.shape}")
        meta = json.loads(Path(case["report"]).read_text())
        captions = meta["captions"]
        lung_k = np.flatnonzero((label == PATCH_CLASSES.index("lung") + 1).any(axis=(0, 1)))
        ks = np.unique(np.linspace(lung_k[0], lung_k[-1], settings["phantom_slices"] + 2)[1:-1].round().astype(int))
    else:
        start = max((n_k - settings["num_slices"]) // 2, 0)
        ks = np.arange(start, min(start + settings["num_slices"], n_k))
    # real scans: the air around the patient and the HU threshold's lung are known without a label; real
    # lung patches keep "dark real CT" from meaning "outside air" (the only other real patch class)
    classes = [c for c in settings["patch_classes"] if is_phantom or c in settings.get("real_patch_classes", REAL_PATCH_CLASSES)]
    body = body_mask(hu, vol.spacing) if settings["patches_per_class"] and classes else None
    hu_lung = hu_threshold_lung_mask(hu, vol.spacing) if body is not None and not is_phantom else None
    rng = np.random.default_rng(_stable_seed(case["id"]))
    px_mm = float(max(vol.spacing[0] * hu.shape[0], vol.spacing[1] * hu.shape[1])) / settings["slice_size"]
    fill = float(hu.min())
    side = max(hu.shape[0], hu.shape[1])  # the square-padded slice's side, in voxels
    for k in ks.tolist():
        img = axial_slice01(hu, k, settings["slice_size"], window, fill)
        writer.add(img, "slice", f"z{k:04d}", text, -1, k)
        if body is None:
            continue
        lab2d = None if label is None else _mask_plane(label, k, settings["slice_size"]).astype(np.uint8)
        lung2d = None if hu_lung is None else _mask_plane(hu_lung, k, settings["slice_size"]) > 0.5
        region = patch_class_map(lab2d, _mask_plane(body, k, settings["slice_size"]) > 0.5, lung2d)
        patch_px = max(int(round(settings["patch_mm"] / px_mm)), 4)
        half = patch_px // 2
        for name in classes:
            c = PATCH_CLASSES.index(name)
            for n, (r, q) in enumerate(sample_patch_centres(region, c + 1, patch_px, settings["patch_purity"], settings["patches_per_class"], rng)):
                crop = img[r - half : r - half + patch_px, q - half : q - half + patch_px]
                if is_phantom:  # back to voxel indices of the (square-padded) volume for the caption lookup
                    s = side / settings["slice_size"]
                    pad_i, pad_j = (side - hu.shape[0]) // 2, (side - hu.shape[1]) // 2
                    ijk = (int(q * s) - pad_i, int(r * s) - pad_j, k)
                    caption = patch_caption(_structure_at(captions, name, ijk), name)
                else:
                    caption = patch_caption(name, name)
                writer.add(_resize2d(crop, settings["patch_size"], "area"), "patch", f"z{k:04d}_{name.replace(' ', '_')}_{n}", caption, c, k)
    return writer.entries


def _stable_seed(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "little")


def validation_phantoms(manifest: str | Path, val_phantoms: int = 1, exclude: Sequence[str] = ()) -> list[dict]:
    """The manifest's cases SA-1 validates on: its last ``val_phantoms`` phantoms (after ``exclude``)."""
    manifest_path = Path(manifest)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: manifest not found (run `make data`)")
    phantoms = [c for c in json.loads(manifest_path.read_text())["cases"] if c.get("kind") == "phantom" and c["id"] not in set(exclude)]
    if val_phantoms and len(phantoms) <= int(val_phantoms):
        raise ValueError(f"{manifest_path}: {len(phantoms)} phantoms, need more than val_phantoms={val_phantoms} (some must train)")
    return phantoms[len(phantoms) - int(val_phantoms):] if val_phantoms else []


def build_clip_datalist(
    manifest: str | Path,
    out_dir: str | Path,
    slice_size: int = 512,
    num_slices: int = 20,
    phantom_slices: int = 12,
    patch_mm: float = 40.0,
    patch_size: int = 64,
    patches_per_class: int = 4,
    patch_purity: float = 0.6,
    val_phantoms: int = 1,
    text_preprocessing: str = "clean",
    hu_window: Sequence[float] = HU_WINDOW,
    exclude: Sequence[str] = (),
    real_patch_classes: Sequence[str] = REAL_PATCH_CLASSES,
    progress: bool = True,
) -> dict:
    """Write every sample of a manifest's cases under ``out_dir`` and return the datalist.

    The returned dict (also ``out_dir/datalist.json``) has ``training`` and ``validation`` lists
    (the last ``val_phantoms`` phantoms), image paths absolute, and ``skipped`` (case, reason).
    A case written before with the same settings is reused; one that fails to read is skipped
    with its reason. ``exclude`` names case ids to leave out (e.g. those QC rejected); ``real_patch_classes``
    the captioned patch classes a real scan gives (a subset of ``REAL_PATCH_CLASSES``; empty: real scans give
    slices for the slice captions and the distillation loss only).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    manifest_path = Path(manifest)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: manifest not found (run `make data`)")
    cases = [c for c in json.loads(manifest_path.read_text())["cases"] if c["id"] not in set(exclude)]
    settings = {"slice_size": int(slice_size), "num_slices": int(num_slices), "phantom_slices": int(phantom_slices), "patch_mm": float(patch_mm),
                "patch_size": int(patch_size), "patches_per_class": int(patches_per_class), "patch_purity": float(patch_purity),
                "text_preprocessing": text_preprocessing, "hu_window": [float(h) for h in hu_window], "patch_classes": list(PATCH_CLASSES),
                "real_patch_classes": list(real_patch_classes)}
    unknown = sorted(set(real_patch_classes) - set(REAL_PATCH_CLASSES))
    if unknown:
        raise ValueError(f"real_patch_classes {unknown}: a real scan gives only {list(REAL_PATCH_CLASSES)} without a label")
    val_ids = {c["id"] for c in validation_phantoms(manifest_path, val_phantoms, exclude)}
    datalist: dict = {"format": DATALIST_FORMAT, "settings": settings, "training": [], "validation": [], "skipped": []}
    for case in tqdm(cases, desc="SA-1 samples", unit="case", disable=not progress):
        index = out_dir / "cases" / f"{case['id']}.json"
        entries = None
        if index.is_file():
            stored = json.loads(index.read_text())
            if stored.get("settings") == settings:
                entries = stored["entries"]
        if entries is None:
            try:
                entries = build_case_samples(case, out_dir, settings)
            except Exception as e:  # one unreadable case is one skipped case, never a stopped run
                reason = f"{type(e).__name__}: {e}"
                log.warning("skipping case %s: %s", case["id"], reason)
                datalist["skipped"].append({"case_id": case["id"], "path": str(case["path"]), "reason": reason})
                continue
            write_json_atomic(index, {"settings": settings, "entries": entries})
        split = "validation" if case["id"] in val_ids else "training"
        datalist[split] += [{**e, "image": str(out_dir / e["image"])} for e in entries]
    write_json_atomic(out_dir / "datalist.json", datalist)
    return datalist


def load_clip_datalist(path: str | Path, split: str) -> list[dict]:
    """One split of a datalist JSON written by :func:`build_clip_datalist`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist not found")
    data = json.loads(path.read_text())
    if split not in data:
        raise KeyError(f"{path}: no '{split}' split (has {sorted(k for k in data if isinstance(data[k], list))})")
    return data[split]


__all__ = [
    "PATCH_PROMPT",
    "axial_slice01",
    "build_case_samples",
    "build_clip_datalist",
    "case_text",
    "class_prompts",
    "deeplesion_sentences",
    "load_clip_datalist",
    "patch_caption",
    "patch_class_map",
    "radchestct_sentences",
    "sample_patch_centres",
    "validation_phantoms",
]
