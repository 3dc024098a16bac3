"""``make segment CT=<file or DICOM folder> OUT=<dir>``: one scan through SA-2 (probmap bundle) and H-SAM.

Exit 0: done; 2: a missing input or checkpoint; 3: the mask failed QC (``report.json`` ``qc.reasons``
says why: too little lung, a side missing, soft tissue in the mask). Writes ``OUT/lung_mask.nii.gz`` (binary, the input's grid and affine), ``OUT/probmap.nii.gz`` (one
channel per class, SA-2) and ``OUT/report.json`` (lung volume in mL per side, mean lung HU, % of lung
below -950 HU, seconds and peak memory). H-SAM runs only on the slices the SA-2 lung mask touches
(plus a margin). ``OUT/overlay.png`` shows both masks on three slices. Every file is written under a
temporary name and renamed.

    python -m common.segment CT OUT [--clip-ckpt bundles/foundation_clip/models/model.pt]
                                    [--hsam-ckpt bundles/hsam_finetune/models/model.pt]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = REPO / "bundles" / "foundation_clip" / "models" / "model.pt"  # shipped (committed)
DEFAULT_HSAM = REPO / "bundles" / "hsam_finetune" / "models" / "model.pt"  # shipped (committed)
log = logging.getLogger("segment")


def _run_bundle(bundle: str, overrides: dict, config: str = "inference.json"):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / config))
    parser.update({"bundle_root": str(REPO / "bundles" / bundle), **overrides})
    if parser.get("initialize"):
        parser.get_parsed_content("initialize")
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    if evaluator.failed:
        raise RuntimeError(f"{bundle}: {evaluator.failed[0]['case']}: {evaluator.failed[0]['reason']}")
    return parser


def segment(ct: str | Path, out: str | Path, clip_ckpt: str | Path = DEFAULT_CLIP, hsam_ckpt: str | Path = DEFAULT_HSAM, slice_margin: int = 2) -> dict:
    from common.engines.hsam import SEGMENTATION_OUTPUTS
    from common.engines.cases import case_paths
    from common.engines.probmap import case_outputs as probmap_outputs
    from common.io import write_json_atomic
    from common.io.atomic import atomic_path

    ct, out = Path(ct), Path(out)
    if not ct.exists():
        raise FileNotFoundError(f"{ct}: no such CT file or DICOM folder")
    for what, path in (("SA-1 (foundation_clip)", clip_ckpt), ("H-SAM (hsam_finetune)", hsam_ckpt)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no {what} checkpoint; the shipped models are bundles/*/models/model.pt (make release re-trains them), or pass CLIP_CKPT=... HSAM_CKPT=...")
    start = time.perf_counter()
    work = out / ".work"
    case = {"image": str(ct), "case_id": "scan"}
    _run_bundle("probmap", {"ckpt_path": str(clip_ckpt), "output_dir": str(work / "probmap"), "datalist": [case], "overwrite": True, "overlay": False})
    t_probmap = time.perf_counter() - start
    pm = probmap_outputs(work / "probmap", "scan")
    _run_bundle("hsam_finetune", {"ckpt_path": str(hsam_ckpt), "output_dir": str(work / "hsam"), "overwrite": True, "progress": True,
                                  "slice_margin": int(slice_margin), "cases": [{**case, "region": str(pm["lung_mask"])}]})
    seg = case_paths(work / "hsam", "scan", SEGMENTATION_OUTPUTS)
    import json

    report = json.loads(seg["report"].read_text())
    from common.qc import lung_mask_qc

    report.update({"input": str(ct), "seconds": {"probmap": round(t_probmap, 1), "total": round(time.perf_counter() - start, 1)},
                   "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)})
    report["qc"] = lung_mask_qc(report)  # an empty or implausible mask is written, but never reported as a success
    out.mkdir(parents=True, exist_ok=True)
    for src, name in ((seg["mask"], "lung_mask.nii.gz"), (pm["probmap"], "probmap.nii.gz")):
        with atomic_path(out / name) as tmp:
            shutil.copyfile(src, tmp)
    write_json_atomic(out / "report.json", report)
    try:  # a figure: its failure must not cost the results written above
        _save_overlay(ct, out / "overlay.png", out / "lung_mask.nii.gz", pm["lung_mask"])
    except Exception as e:  # noqa: BLE001 (any plotting error)
        log.warning("%s: overlay not written (%s: %s); mask, probmap and report are", out / "overlay.png", type(e).__name__, e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _save_overlay(ct: Path, path: Path, hsam_mask: Path, sa2_mask: Path) -> None:
    """``OUT/overlay.png``: the H-SAM lung mask and the SA-2 mask on the scan's base, middle and apex."""
    import nibabel as nib
    import numpy as np

    from common.io import read_ct
    from common.report import save_method_overlays_png

    vol = read_ct(ct)
    masks = [("H-SAM lung mask", np.asarray(nib.load(str(hsam_mask)).dataobj) > 0), ("SA-2 lung mask", np.asarray(nib.load(str(sa2_mask)).dataobj) > 0)]
    save_method_overlays_png(path, vol.hu, masks, vol.affine, fractions=(0.15, 0.5, 0.85), title=f"{ct.name}: base, middle and apex of the lung")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ct")
    p.add_argument("out")
    p.add_argument("--clip-ckpt", default=os.environ.get("CLIP_CKPT") or str(DEFAULT_CLIP))
    p.add_argument("--hsam-ckpt", default=os.environ.get("HSAM_CKPT") or str(DEFAULT_HSAM))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    try:
        report = segment(args.ct, args.out, args.clip_ckpt, args.hsam_ckpt)
    except FileNotFoundError as e:
        print(f"make segment: {e}", file=sys.stderr)
        return 2
    vol = report.get("lung_volume_ml", {})
    if not report["qc"]["passed"]:
        print(f"make segment: {args.out}/lung_mask.nii.gz failed QC: {'; '.join(report['qc']['reasons'])}", file=sys.stderr)
        return 3
    print(f"lung volume {vol.get('total')} mL (right {vol.get('right')}, left {vol.get('left')}); mean lung HU {report.get('mean_lung_hu')}; "
          f"{report['seconds']['total']} s, peak {report['peak_memory_gb']} GB; wrote {args.out}/lung_mask.nii.gz, probmap.nii.gz, report.json, overlay.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
