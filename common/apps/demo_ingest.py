"""The demo's first step: every default case read, checked (QC), preprocessed and drawn; the HU-threshold lungs\nand sides of each, and the phantoms' ground truth."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from common.default_data import PHANTOM_SHAPE, PHANTOM_SPACING, load_manifest
from common.io.volume import reorient_array
from common.lungmask import hu_threshold_lung_mask, split_left_right
from common.metrics import dice_score
from common.qc import CaseRef, qc_case, write_qc_report
from common.report import LUNG_WINDOW, save_overlay_png


# Demo-size preprocessing: 1.5 mm in-plane keeps the lungs' shape and is fast on 2 CPU cores.
DEMO_SPACING = (1.5, 1.5, 2.5)


# --------------------------------------------------------------------------- ingest + QC


def _case_ref(case: dict) -> CaseRef:
    path = Path(case["path"])
    fmt = (
        "dicom"
        if case["format"] == "dicom" and path.is_dir()
        else ("deeplesion_png" if case["format"] == "deeplesion_png" else "file")
    )
    return CaseRef(case["id"], path, fmt)


def _best_slice(mask: np.ndarray) -> int:
    area = mask.sum(axis=(0, 1))
    return int(np.argmax(area)) if area.any() else mask.shape[2] // 2


INGEST_WORKERS = 2  # one case per core: a case's reading, QC, HU threshold, sides and figure are single-threaded


def _ingest_worker_init() -> None:
    import torch

    torch.set_num_threads(
        1
    )  # two workers on two cores: each its own core (the same results: resampling is elementwise)


def _ingest_case(case: dict, out: Path, fig_dir: Path) -> tuple:
    """One case of the ingest: QC, then for a case that passes the HU-threshold lungs drawn on it, the standard
    preprocessing written to ``<out>/preprocessed``, and a phantom's Dice against its truth. (record, row, figure)."""
    from common.io import to_metatensor
    from common.io.nifti import save_nifti_array
    from common.transforms import ct_preprocessing

    record, vol = qc_case(_case_ref(case))
    row = {
        "case": case["id"],
        "kind": case["kind"],
        "qc": "pass" if record.passed else "EXCLUDED",
        "read+qc s": round(record.seconds, 2),
    }
    if vol is None or not record.passed:
        row["reasons"] = "; ".join(record.reasons)
        return record, row, None
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
    figure = (
        f"figures/{png.name}",
        f"{case['id']} ({case['kind']}), {vol.shape[0]}x{vol.shape[1]}x{vol.shape[2]} at {'x'.join(f'{s:.2f}' for s in vol.spacing)} mm",
    )
    t = time.perf_counter()
    pre = ct_preprocessing(load=False, target_spacing=DEMO_SPACING)({"image": to_metatensor(vol)})["image"]
    save_nifti_array(pre[0].numpy(), pre.affine.numpy(), out / "preprocessed" / f"{case['id']}_preproc.nii.gz")
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
    return record, row, figure


def run_ingest(out: Path, data_dir: Path, fig_dir: Path, workers: int = INGEST_WORKERS) -> dict:
    """Ingest + QC + preprocessing of every default case, HU-threshold lungs drawn on each, phantom truth; the cases
    ``workers`` at a time, each in a process of its own (the results in the manifest's order)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from common.phantom import generate_phantom, render_slice_png

    manifest = load_manifest(data_dir)
    records, figures, per_case = [], [], []
    with ProcessPoolExecutor(
        max(1, int(workers)), mp_context=multiprocessing.get_context("fork"), initializer=_ingest_worker_init
    ) as pool:
        jobs = [pool.submit(_ingest_case, case, out, fig_dir) for case in manifest["cases"]]
        for job in tqdm(jobs, desc="ingest + QC + preprocessing", unit="scan"):
            record, row, figure = job.result()
            records.append(record)
            per_case.append(row)
            if figure is not None:
                figures.append(figure)
    write_qc_report(records, out / "qc")
    first = next((c for c in manifest["cases"] if c["kind"] == "phantom" and "seed" in c), None)
    if first is not None:
        phantom = generate_phantom(
            shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING, seed=first["seed"]
        )  # as make data wrote it
        render_slice_png(phantom, fig_dir / "phantom_ground_truth.png", coronal=True)
    excluded = [r for r in records if not r.passed]
    return {
        "n_cases": len(records),
        "n_passed": len(records) - len(excluded),
        "n_excluded": len(excluded),
        "excluded": {r.case_id: r.reasons for r in excluded},
        "cases": per_case,
        "figures": figures,
        "qc_rows": [
            {
                "case": r.case_id,
                "verdict": "pass" if r.passed else "EXCLUDED",
                **{c.name: ("ok" if c.passed else "FAIL") for c in r.checks},
            }
            for r in records
        ],
        "phantom_example": None
        if first is None
        else {"id": first["id"], "seed": first["seed"], "report": phantom.report},
        "qc_dir": str(out / "qc"),
    }
