"""Segment one chest CT with the shipped models: the library behind ``lungseg`` (:mod:`common.apps.lungseg`)
and ``make segment``.

:func:`segment` runs the bundles' own inference configs: H-SAM (hsam_finetune) on every slice and, with
``probmap=True``, SA-2 (the probmap bundle) for its five-class probability map. It writes into ``out``
(:data:`OUTPUTS`):

- ``labels.nii.gz``: 1 right lung, 2 left lung (lungmask's and TotalSegmentator's convention), on the input's grid;
- ``lung_mask.nii.gz``: both lungs, binary, the same grid and affine;
- ``probmap.nii.gz`` (``probmap=True``): SA-2's probability per class (``channel_def`` of the probmap bundle);
- ``report.json``: H-SAM's case report with seconds, peak memory and QC;
- for a DICOM series, ``seg.dcm`` (DICOM-SEG) and ``rtstruct.dcm`` (RTSTRUCT) that reference it;
- ``overlay.png``: the mask (and SA-2's) at the base, middle and apex;
- ``statistics.json`` last: volume and mean HU per structure, %LAA-950 per lung, the input's Study and Series
  UIDs, the models and the seconds. Its presence means the case is complete.

Every file is written under a temporary name and renamed, so a kill never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.classes import CLASS_NAMES

from common.bundle_run import BUNDLES, REPO, BundleRun  # noqa: F401  (REPO: where serve finds them too)

DEFAULT_CLIP = BUNDLES / "foundation_clip" / "models" / "model.pt"  # shipped (committed)
DEFAULT_HSAM = BUNDLES / "hsam_finetune" / "models" / "model.pt"  # shipped (committed)
OUTPUTS = {
    "labels": "labels.nii.gz",
    "mask": "lung_mask.nii.gz",
    "probmap": "probmap.nii.gz",
    "report": "report.json",
    "seg": "seg.dcm",
    "rtstruct": "rtstruct.dcm",
    "overlay": "overlay.png",
    "statistics": "statistics.json",
}
LABEL_NAMES = {1: "right lung", 2: "left lung"}  # labels.nii.gz values (common.classes RIGHT_LUNG, LEFT_LUNG)
# --classes: SA-2's other classes, numbered after the two lungs in the probmap bundle's channel_def order (channel + 2)
EXTRA_CLASSES = {name: channel + 2 for channel, name in enumerate(CLASS_NAMES) if name != "lung"}
log = logging.getLogger("segment")


@dataclass(frozen=True)
class Models:
    """The two checkpoints a scan goes through: SA-1 (foundation_clip, for SA-2's map) and H-SAM."""

    clip: Path = DEFAULT_CLIP
    hsam: Path = DEFAULT_HSAM

    @classmethod
    def from_dir(cls, folder: str | Path) -> "Models":
        """``folder`` laid out as ``bundles/``: ``<folder>/foundation_clip/models/model.pt`` and ``<folder>/hsam_finetune/models/model.pt``."""
        folder = Path(folder)
        return cls(folder / "foundation_clip" / "models" / "model.pt", folder / "hsam_finetune" / "models" / "model.pt")

    def used(self, probmap: bool) -> dict[str, Path]:
        """The checkpoints a run reads, by bundle: SA-1's only when SA-2 runs."""
        return {"foundation_clip": self.clip, "hsam_finetune": self.hsam} if probmap else {"hsam_finetune": self.hsam}

    def check(self, probmap: bool = True) -> None:
        what = {"foundation_clip": "SA-1 (foundation_clip)", "hsam_finetune": "H-SAM (hsam_finetune)"}
        for bundle, path in self.used(probmap).items():
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"{path}: no {what[bundle]} checkpoint; the shipped models are bundles/*/models/model.pt "
                    "(make release re-trains them), or pass --models DIR / CLIP_CKPT=... HSAM_CKPT=..."
                )

    def describe(self, probmap: bool = True) -> dict:
        """Bundle version (its ``metadata.json``) and the checkpoint's SHA-256 prefix, per model used."""
        out = {}
        for bundle, path in self.used(probmap).items():
            meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
            out[bundle] = {"bundle_version": meta.get("version"), "checkpoint": str(path), "sha256": digest}
        return out


def run_bundle(bundle: str, overrides: dict, config: str = "inference.json"):
    """One bundle config in this process (:meth:`BundleRun.run_evaluator`); a failed case is an error. The parser."""
    parser, evaluator = BundleRun(bundle, [config], overrides).run_evaluator()
    if evaluator.failed:
        raise CaseFailed(bundle, str(evaluator.failed[0]["case"]), str(evaluator.failed[0]["reason"]))
    return parser


def _run_on_scan(bundle: str, overrides: dict, ct: Path, work: Path) -> None:
    """:func:`run_bundle` on the one scan ``ct``; a scan the bundle could not read is a :class:`CTReadError` naming it
    (the input's fault), and the work folder goes either way on failure."""
    from common.io import CTReadError

    try:
        run_bundle(bundle, overrides)
    except CaseFailed as e:
        shutil.rmtree(work, ignore_errors=True)
        if e.case == str(ct):
            raise CTReadError(ct, e.reason) from None
        raise


class CaseFailed(RuntimeError):
    """A bundle's evaluator could not load or process its case (``case``: the image path when loading failed)."""

    def __init__(self, bundle: str, case: str, reason: str):
        super().__init__(f"{bundle}: {case}: {reason}")
        self.bundle, self.case, self.reason = bundle, case, reason


def segment(
    ct: str | Path,
    out: str | Path,
    models: Models = Models(),
    probmap: bool = False,
    device: str | None = None,
    precision: str = "auto",
    classes: Sequence[str] = (),
    dicom_files: Sequence[str | Path] | None = None,
    source: dict | None = None,
    slice_search_step: int = 4,
) -> dict:
    """Segment ``ct`` (a CT file or a folder holding one DICOM series) into ``out``; returns ``statistics.json``'s content.

    - ``probmap``: also run SA-2 and write its five-class map (``probmap.nii.gz``; about 2 more minutes on 2 CPU
      cores for 133 slices). The lung labels are H-SAM's on every slice either way.
    - ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; the bundles' default (the first GPU when there is one) when ``None``.
    - ``precision``: H-SAM computed in ``"float32"``, ``"bfloat16"`` or ``"auto"`` (bfloat16 where the device computes
      it natively: about 2x faster on an AVX-512 BF16 CPU, masks within Dice 0.998 of float32's; ``docs/lungseg.md``).
    - ``slice_search_step``: H-SAM first on every ``slice_search_step``-th slice, then on every slice of the slab where
      it found lung (``common.inferers.SliceEnsembleInferer``); 1 runs every slice.
    - ``classes``: SA-2's other structures to add (``EXTRA_CLASSES``: heart 3, blood vessel 4, airway 5, bone 6), each
      where it is SA-2's most probable class at 0.5 or more outside H-SAM's lungs; runs SA-2.
    - ``dicom_files``: the series' files, for the DICOM-SEG and RTSTRUCT.
    - ``source``: what to record of the input (path, Study/Series UIDs, series skipped), else the path.
    """
    from common.io.nifti import case_paths
    from common.transforms import SEGMENTATION_OUTPUTS, probmap_outputs
    from common.io import write_json_atomic
    from common.qc import lung_mask_qc

    ct, out = Path(ct), Path(out)
    if not ct.exists():
        raise FileNotFoundError(f"{ct}: no such CT file or DICOM folder")
    unknown = sorted(set(classes) - set(EXTRA_CLASSES))
    if unknown:
        raise ValueError(f"unknown class(es) {unknown}; the classes beside the lungs are {', '.join(EXTRA_CLASSES)}")
    probmap = probmap or bool(classes)
    models.check(probmap)
    start = time.perf_counter()
    vol = checked_scan(ct)
    work = out / ".work"
    case = {"image": str(ct), "case_id": "scan"}
    run = {"device": f"$torch.device('{device}')"} if device else {}
    pm = None
    if probmap:
        _run_on_scan(
            "probmap",
            {
                **run,
                "ckpt_path": str(models.clip),
                "output_dir": str(work / "probmap"),
                "datalist": [case],
                "overwrite": True,
                "overlay": False,
            },
            ct,
            work,
        )
        pm = probmap_outputs(work / "probmap", "scan")
    t_probmap = time.perf_counter() - start
    # the slices H-SAM's own search finds, not SA-2's region: the answer does not depend on whether SA-2 ran
    _run_on_scan(
        "hsam_finetune",
        {
            **run,
            "ckpt_path": str(models.hsam),
            "output_dir": str(work / "hsam"),
            "overwrite": True,
            "progress": True,
            "cases": [case],
            "save_probability": False,
            "inference_precision": precision,
            "slice_search_step": int(slice_search_step),
        },
        ct,
        work,
    )
    seg = case_paths(work / "hsam", "scan", SEGMENTATION_OUTPUTS)
    report = json.loads(seg["report"].read_text())
    report.update(
        {"input": str((source or {}).get("input", ct)), "seconds": {"probmap": round(t_probmap, 1)} if pm else {}}
    )
    report["qc"] = lung_mask_qc(report)  # an empty or implausible mask is written, but never reported as a success
    try:
        paths = {k: out / v for k, v in OUTPUTS.items()}
        for src, name in ((seg["mask"], "mask"),) + (((pm["probmap"], "probmap"),) if pm else ()):
            _copy_atomic(src, paths[name])
        labels, affine = _read_labels(vol, seg["sides"])
        names = dict(LABEL_NAMES)
        if classes:
            from common.io.nifti import save_nifti_array

            labels = add_sa2_classes(labels, pm["probmap"], classes)
            names.update({EXTRA_CLASSES[c]: c for c in classes})
            save_nifti_array(labels, affine, paths["labels"], dtype=np.uint8)  # written once, with the classes
        else:
            _copy_atomic(seg["sides"], paths["labels"])
        used = models.describe(probmap)
        written = ["labels", "mask"] + (["probmap"] if pm else []) + ["report"]
        dicom_error = None
        if dicom_files:
            try:
                written += write_dicom_outputs(
                    labels, affine, dicom_files, paths, used["hsam_finetune"]["bundle_version"], names
                )
            except Exception as e:  # noqa: BLE001 (the NIfTI results stand; the failure is reported)
                dicom_error = f"{type(e).__name__}: {e}"
                log.error("%s: DICOM-SEG / RTSTRUCT not written (%s); labels.nii.gz and the rest are", out, dicom_error)
        try:  # a figure: its failure must not cost the results written above
            _save_overlay(
                vol,
                Path(str((source or {}).get("input", ct))).name,
                paths["overlay"],
                (labels == 1) | (labels == 2),
                pm["lung_mask"] if pm else None,
            )
            written.append("overlay")
        except Exception as e:  # noqa: BLE001 (any plotting error)
            log.warning(
                "%s: overlay not written (%s: %s); the masks, maps and statistics are",
                paths["overlay"],
                type(e).__name__,
                e,
            )
        seconds = round(time.perf_counter() - start, 1)
        peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
        report["seconds"]["total"], report["peak_memory_gb"] = seconds, peak
        write_json_atomic(paths["report"], report)
        statistics = statistics_of(
            labels, vol.hu, affine, report, used, source or {"input": str(ct)}, seconds, peak, names
        )
        statistics["outputs"] = [OUTPUTS[k] for k in written + ["statistics"]]
        if dicom_error:
            statistics["dicom_error"] = dicom_error
        write_json_atomic(paths["statistics"], statistics)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return statistics


def add_sa2_classes(labels, probmap_path: Path, classes: Sequence[str]):
    """``labels`` (H-SAM's right/left lungs) with SA-2's ``classes`` added outside the lungs (``EXTRA_CLASSES`` values)."""
    import nibabel as nib

    from common.transforms import ClassLabelMap

    prob = np.moveaxis(np.asarray(nib.load(str(probmap_path)).dataobj, dtype=np.float32), -1, 0)  # (C, X, Y, Z)
    sa2 = np.asarray(ClassLabelMap(threshold=0.5)(prob, (labels > 0)[None]))[0]  # 1 + channel; the lungs are H-SAM's
    del prob
    out = labels.copy()
    for name in classes:
        out[(sa2 == CLASS_NAMES.index(name) + 1) & (labels == 0)] = EXTRA_CLASSES[name]
    return out


def statistics_of(
    labels,
    hu,
    affine,
    report: dict,
    models: dict,
    source: dict,
    seconds: float,
    peak_gb: float,
    names: dict | None = None,
) -> dict:
    """``statistics.json``: per structure volume and mean HU, %LAA-950 per lung, the input, models and cost."""
    from common.metrics import structure_statistics

    names = names or LABEL_NAMES
    return {
        "input": source,
        "structures": structure_statistics(labels, hu, affine, names),
        "labels": {str(k): v for k, v in names.items()},
        "qc": report.get("qc"),
        "models": models,
        "settings": report.get("settings"),
        "seconds": seconds,
        "peak_memory_gb": peak_gb,
    }


def write_dicom_outputs(
    labels, affine, dicom_files: Sequence[str | Path], paths: dict, version: str, names: dict | None = None
) -> list[str]:
    """DICOM-SEG and RTSTRUCT of ``labels`` on the series ``dicom_files``; returns the :data:`OUTPUTS` keys written."""
    from common.io.dicom_out import (
        STRUCTURES,
        labels_on_series_grid,
        read_series_headers,
        write_dicom_seg,
        write_rtstruct,
    )

    datasets = read_series_headers(dicom_files)
    frames = labels_on_series_grid(labels, affine, datasets)
    structures = [STRUCTURES[name] for name in (names or LABEL_NAMES).values()]
    if not frames.any():
        log.warning("%s: the label map is empty; no DICOM-SEG or RTSTRUCT written", paths["labels"])
        return []
    write_dicom_seg(paths["seg"], frames, datasets, structures, software_version=str(version))
    write_rtstruct(paths["rtstruct"], frames, datasets, structures)
    return ["seg", "rtstruct"]


def _copy_atomic(src: Path, dst: Path) -> None:
    from common.io.atomic import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def checked_scan(ct: Path):
    """The scan read once, or a :class:`~common.io.CTReadError` naming it when its geometry cannot give a true mask:
    not CT, fewer than 10 slices, missing or duplicated slices, uneven slice steps, pixel spacing that changes
    between slices (``common.qc``'s checks and limits)."""
    from common.io import CTReadError, read_ct
    from common.qc import QCThresholds, check_modality, check_slices

    vol = read_ct(ct)
    limits = QCThresholds()
    failed = [c for c in (check_modality(vol, limits), *check_slices(vol, limits)) if not c.passed]
    if failed:
        raise CTReadError(ct, "not segmented: " + "; ".join(f"{c.name}: {c.reason}" for c in failed))
    return vol


def _read_labels(vol, labels_path: Path):
    """The written label map and its affine, checked to lie on the scan's grid."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(labels_path))
    labels = np.asarray(img.dataobj).astype(np.uint8)
    if labels.shape != vol.shape:
        raise RuntimeError(f"{labels_path}: label map {labels.shape} is not on the CT's grid {vol.shape}")
    return labels, img.affine


def _save_overlay(vol, name: str, path: Path, hsam_mask, sa2_mask: Path | None) -> None:
    """``OUT/overlay.png``: the H-SAM lung mask (and SA-2's, when it ran) on the scan's base, middle and apex."""
    import nibabel as nib
    import numpy as np

    from common.report import save_method_overlays_png

    masks = [("H-SAM lung mask", hsam_mask)] + (
        [("SA-2 lung mask", np.asarray(nib.load(str(sa2_mask)).dataobj) > 0)] if sa2_mask else []
    )
    save_method_overlays_png(
        path, vol.hu, masks, vol.affine, fractions=(0.15, 0.5, 0.85), title=f"{name}: base, middle and apex of the lung"
    )
