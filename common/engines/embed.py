"""SA-1 inference: export LungCLIP image embeddings (one per axial slice) and class-prompt text embeddings.

``export_clip_embeddings(model, dataset_dir, output_dir)`` finds every scan under ``dataset_dir``
(DICOM series, NIfTI, NRRD/MHA, PNG stacks: :func:`common.qc.discover_cases`) and writes, in
MONAI's SaveImaged layout::

    output_dir/<case_id>/<case_id>_image_embeddings.npy   float32 (Z, D), row k = axial slice k
                                                          of the LPS-oriented volume
    output_dir/text_embeddings.json                       {"prompts", "embeddings", "embed_dim"}
    output_dir/embeddings_summary.json                    written / skipped (done) / failed + reasons

A slice goes through what training saw (:mod:`common.data.clip_pairs`): ``hu[:, :, k].T`` of the
LPS volume, padded to a square with the volume's minimum, resized (area) to ``slice_size``,
HU-windowed to [0, 1], then resized (bilinear, anti-aliased) to ``image_size`` as the training
loader does. ``slice_size=None`` resizes straight to ``image_size`` (one area resize) instead.

Slices are encoded batch by batch, so memory holds the volume and one batch, whatever Z is. Each
npy is written under a temporary name and renamed; a case whose npy exists is skipped, so a
re-run resumes. An unreadable case is logged with its file and reason, listed in the summary, and
the run goes on.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.data.clip_pairs import axial_slice01  # the training slice geometry, shared on purpose
from common.io import CTReadError, CTVolume, read_ct, write_json_atomic
from common.io.atomic import atomic_path
from common.transforms.intensity import HU_WINDOW, HUWindow

log = logging.getLogger(__name__)

SUMMARY_FORMAT = "clip_embeddings/1"
IMAGE_POSTFIX = "image_embeddings"
TEXT_EMBEDDINGS_NAME = "text_embeddings.json"
SUMMARY_NAME = "embeddings_summary.json"
AXCODES = "LPS"  # the orientation training slices were cut in (axis 2 = axial, feet to head)


def embedding_path(output_dir: str | Path, case_id: str) -> Path:
    """Where a case's (Z, D) image embeddings go: ``output_dir/<case_id>/<case_id>_image_embeddings.npy``."""
    return Path(output_dir) / case_id / f"{case_id}_{IMAGE_POSTFIX}.npy"


def slice_batch(
    hu: np.ndarray,
    ks: Sequence[int],
    image_size: int,
    fill: float,
    slice_size: int | None = None,
    hu_window: Sequence[float] = HU_WINDOW,
) -> torch.Tensor:
    """(B, 1, image_size, image_size) float32 model inputs in [0, 1] for axial slices ``ks`` of an LPS HU volume."""
    window = HUWindow(hu_window)
    out = np.empty((len(ks), 1, int(image_size), int(image_size)), dtype=np.float32)
    if slice_size is not None:
        from monai.transforms import Resize

        # the training loader's Resized (bilinear, anti-aliased) from the stored slice_size sample
        to_image = Resize((int(image_size), int(image_size)), mode="bilinear", anti_aliasing=True)
    for n, k in enumerate(ks):
        if slice_size is None:
            out[n, 0] = axial_slice01(hu, k, int(image_size), window, fill)
        else:
            img = axial_slice01(hu, k, int(slice_size), window, fill)
            out[n] = (
                img[None] if img.shape[-1] == int(image_size) else np.asarray(to_image(img[None]), dtype=np.float32)
            )
    return torch.from_numpy(out)


def _read_case(case) -> CTVolume:
    """Read a discovered case in the training orientation (DICOM series filled directly in LPS)."""
    if case.error:
        raise CTReadError(case.path, case.error)
    if case.format == "dicom":
        from common.io.dicom import read_dicom_series

        return read_dicom_series(case.path, series_uid=case.series_uid, axcodes=AXCODES)
    return read_ct(case.path, axcodes=AXCODES)


@torch.no_grad()
def embed_volume(
    model,
    hu: np.ndarray,
    image_size: int = 224,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    slice_size: int | None = None,
    hu_window: Sequence[float] = HU_WINDOW,
) -> np.ndarray:
    """(Z, D) float32 image embeddings of every axial slice of an LPS HU volume, ``batch_size`` slices at a time."""
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"expected a 3D volume, got shape {hu.shape}")
    n_k = hu.shape[2]
    fill = float(hu.min())
    out: np.ndarray | None = None
    for start in range(0, n_k, int(batch_size)):
        ks = range(start, min(start + int(batch_size), n_k))
        x = slice_batch(hu, ks, image_size, fill, slice_size=slice_size, hu_window=hu_window).to(device)
        emb = model.encode_image(x).float().cpu().numpy()
        if out is None:
            out = np.empty((n_k, emb.shape[1]), dtype=np.float32)
        out[start : start + len(ks)] = emb
    assert out is not None
    return out


def _encode_prompts(model, prompts: list[str]) -> np.ndarray | None:
    if getattr(model, "text_encoder", None) is None:
        log.warning("this LungCLIP has no text encoder: %s not written", TEXT_EMBEDDINGS_NAME)
        return None
    with torch.no_grad():
        return model.encode_text(list(prompts)).float().cpu().numpy()


def export_clip_embeddings(
    model,
    dataset_dir: str | Path,
    output_dir: str | Path,
    prompts: Sequence[str] | None = None,
    image_size: int = 224,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
    slice_size: int | None = None,
    hu_window: Sequence[float] = HU_WINDOW,
    overwrite: bool = False,
    exclude: Sequence[str] = (),
) -> dict:
    """Write per-slice image embeddings of every scan under ``dataset_dir`` and the prompt text embeddings.

    Returns the summary that is also ``output_dir/embeddings_summary.json``: ``written`` (case id,
    source, npy, slices), ``skipped_done`` (npy already there; ``overwrite=True`` recomputes),
    ``failed`` (case id, source, reason). ``prompts`` defaults to the five class prompts
    (:func:`common.data.class_prompts`). ``exclude`` holds glob patterns on the file or folder
    name of a scan (e.g. ``"*_label.nii.gz"`` for label maps stored beside the CTs); excluded
    scans are listed under ``excluded``. A ``dataset_dir`` with no scan in it is an error.
    """
    from tqdm.auto import tqdm

    from common.qc import discover_cases

    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    if not dataset_dir.exists():
        raise FileNotFoundError(f"{dataset_dir}: dataset_dir does not exist")
    if int(batch_size) < 1 or int(image_size) < 1:
        raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size} and {image_size}")
    if prompts is None:
        from common.data import class_prompts

        prompts = class_prompts()
    prompts = [str(p) for p in prompts]
    device = torch.device(device)
    found = discover_cases(dataset_dir)
    is_excluded = [any(fnmatch.fnmatch(Path(c.path).name, pat) for pat in exclude) for c in found]
    cases = [c for c, x in zip(found, is_excluded) if not x]
    excluded = [{"case_id": c.case_id, "source": str(c.path)} for c, x in zip(found, is_excluded) if x]
    if not cases:
        raise ValueError(
            f"{dataset_dir}: no CT scan found (looked for DICOM series, NIfTI, NRRD/MHA, npz and PNG stacks"
            + (f"; {len(excluded)} excluded by {list(exclude)})" if excluded else ")")
        )
    output_dir.mkdir(parents=True, exist_ok=True)

    was_training = model.training
    model = model.to(device)
    model.eval()
    summary: dict = {
        "format": SUMMARY_FORMAT,
        "dataset_dir": str(dataset_dir),
        "output_dir": str(output_dir),
        "image_size": int(image_size),
        "slice_size": int(slice_size) if slice_size is not None else None,
        "hu_window": [float(h) for h in hu_window],
        "axcodes": AXCODES,
        "embed_dim": int(model.embed_dim) if hasattr(model, "embed_dim") else None,
        "text_embeddings": None,
        "written": [],
        "skipped_done": [],
        "failed": [],
        "excluded": excluded,
    }
    try:
        text = _encode_prompts(model, prompts)
        if text is not None:
            path = write_json_atomic(
                output_dir / TEXT_EMBEDDINGS_NAME,
                {"prompts": prompts, "embeddings": text.tolist(), "embed_dim": int(text.shape[1])},
            )
            summary["text_embeddings"] = str(path)

        bar = tqdm(cases, desc="SA-1 embeddings", unit="case", disable=not progress)
        for case in bar:
            bar.set_postfix_str(case.case_id, refresh=False)
            target = embedding_path(output_dir, case.case_id)
            if target.is_file() and not overwrite:
                summary["skipped_done"].append(
                    {"case_id": case.case_id, "source": str(case.path), "embeddings": str(target)}
                )
                continue
            start = time.perf_counter()
            try:
                vol = _read_case(case)
                emb = embed_volume(
                    model,
                    vol.hu,
                    image_size=image_size,
                    batch_size=batch_size,
                    device=device,
                    slice_size=slice_size,
                    hu_window=hu_window,
                )
                del vol
                if not np.all(np.isfinite(emb)):
                    raise ValueError(
                        f"{case.path}: the model gave non-finite embeddings on {int((~np.isfinite(emb)).any(axis=1).sum())} slice(s)"
                    )
            except Exception as e:  # one bad case is one failed case, never a stopped run
                reason = str(e) if isinstance(e, CTReadError) else f"{case.path}: {type(e).__name__}: {e}"
                if isinstance(e, CTReadError):
                    log.warning("skipping case %s: %s", case.case_id, reason)
                else:
                    log.exception("skipping case %s: %s", case.case_id, reason)
                summary["failed"].append({"case_id": case.case_id, "source": str(case.path), "reason": reason})
                continue
            with atomic_path(target) as tmp:
                np.save(tmp, emb)
            summary["written"].append(
                {
                    "case_id": case.case_id,
                    "source": str(case.path),
                    "embeddings": str(target),
                    "n_slices": int(emb.shape[0]),
                    "seconds": round(time.perf_counter() - start, 3),
                }
            )
    finally:
        model.train(was_training)

    write_json_atomic(output_dir / SUMMARY_NAME, summary)
    log.info(
        "SA-1 embeddings: %d written, %d already done, %d failed -> %s",
        len(summary["written"]),
        len(summary["skipped_done"]),
        len(summary["failed"]),
        output_dir,
    )
    for f in summary["failed"]:
        log.warning("failed: %s (%s)", f["case_id"], f["reason"])
    return summary


__all__ = ["embed_volume", "embedding_path", "export_clip_embeddings", "slice_batch"]
