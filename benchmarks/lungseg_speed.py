"""``lungseg`` on one real scan, four ways in one run: ``make segment``'s path before ``lungseg`` (SA-2 first,
then H-SAM on the slices SA-2's lung touches plus 2, unmerged LoRA, its probability saved: the bundle configs as
``common.segment`` ran them at f549007), and ``lungseg`` now: on every slice in float32, on every slice in its
default precision (``auto``: bfloat16 on a CPU with AVX-512 BF16), and as it runs by default (``auto`` and its
slice search, ``--slice-search-step 4``). Each runs as its own process, as a user starts it: wall seconds include
Python's start and the imports; the peak is the process's resident memory. Then how the masks agree with each
other and with the HU threshold.

    python benchmarks/lungseg_speed.py [--scan ../shared/data/lidc_idri_1011_dicom] [--out outputs/lungseg_speed]

Prints one line per way, the agreement, and ``speedup <x>`` (before's wall time over lungseg's default) last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def old_make_segment(scan: str, out: Path) -> None:
    """The path ``make segment`` took before ``lungseg`` (in this process; ``--before`` runs it as a child)."""
    import resource

    import nibabel as nib
    import numpy as np

    from common.transforms import probmap_outputs
    from common.segment import DEFAULT_CLIP, DEFAULT_HSAM, run_bundle

    case = {"image": scan, "case_id": "scan"}
    run_bundle(
        "probmap",
        {
            "ckpt_path": str(DEFAULT_CLIP),
            "output_dir": str(out / "probmap"),
            "datalist": [case],
            "overwrite": True,
            "overlay": False,
        },
    )
    region = probmap_outputs(out / "probmap", "scan")["lung_mask"]
    run_bundle(
        "hsam_finetune",
        {
            "ckpt_path": str(DEFAULT_HSAM),
            "output_dir": str(out / "hsam"),
            "overwrite": True,
            "progress": False,
            "slice_margin": 2,
            "cases": [{**case, "region": str(region)}],
            # the network as f549007's inference.json built it: LoRA bypasses not merged, float32
            "network": "$@network_def.to(@device).eval()",
        },
    )
    sides = nib.load(str(out / "hsam" / "scan" / "scan_lung_sides.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(sides.dataobj).astype(np.uint8), sides.affine), str(out / "labels.nii.gz"))
    (out / "peak.json").write_text(
        json.dumps({"peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)})
    )


def timed(cmd: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", default=str(REPO.parent / "shared/data/lidc_idri_1011_dicom"))
    ap.add_argument("--out", default=str(REPO / "outputs" / "lungseg_speed"))
    ap.add_argument("--before", action="store_true", help=argparse.SUPPRESS)  # the child that runs the old path
    args = ap.parse_args(argv)
    if args.before:
        old_make_segment(args.scan, Path(args.out))
        return 0

    import nibabel as nib
    import numpy as np

    from common.io import read_ct
    from common.lungmask import hu_threshold_lung_mask
    from common.metrics import dice_score

    out = Path(args.out)
    wb = timed(
        [sys.executable, __file__, "--before", "--scan", args.scan, "--out", str(out / "before")], out / "before"
    )
    before_labels = np.asarray(nib.load(str(out / "before" / "labels.nii.gz")).dataobj)
    peak_before = json.loads((out / "before" / "peak.json").read_text())["peak_memory_gb"]
    print(f"before (SA-2, then H-SAM on its slices): {wb:.1f} s wall, peak {peak_before} GB")
    ways = {
        "float32, every slice": ["--precision", "float32", "--slice-search-step", "1"],
        "auto, every slice": ["--precision", "auto", "--slice-search-step", "1"],
        "default (auto, slice search 4)": [],
    }
    runs = {}
    for n, (way, options) in enumerate(ways.items()):
        folder = out / f"lungseg_{n}"
        wall = timed(
            [sys.executable, "-m", "common.apps.lungseg", "-i", args.scan, "-o", str(folder), "--quiet", *options],
            folder,
        )
        stats = json.loads((folder / "statistics.json").read_text())
        runs[way] = (wall, np.asarray(nib.load(str(folder / "labels.nii.gz")).dataobj))
        s = stats["structures"]
        print(
            f"lungseg {' '.join(options) or '(defaults)'} (H-SAM in {stats['settings']['inference_precision']}): {wall:.1f} s wall "
            f"({stats['seconds']} s in segment), peak {stats['peak_memory_gb']} GB; right {s['right lung']['volume_ml']} mL, "
            f"left {s['left lung']['volume_ml']} mL; qc {'passed' if stats['qc']['passed'] else stats['qc']['reasons']}"
        )
    vol = read_ct(args.scan)
    threshold = hu_threshold_lung_mask(vol.hu, vol.spacing)
    for way, (_, labels) in runs.items():
        print(
            f"agreement, lungseg {way}: Dice with before {dice_score(before_labels > 0, labels > 0):.4f} "
            f"(right {dice_score(before_labels == 1, labels == 1):.4f}, left {dice_score(before_labels == 2, labels == 2):.4f}); "
            f"with the HU threshold {dice_score(labels > 0, threshold):.4f} (before {dice_score(before_labels > 0, threshold):.4f})"
        )
    exact, fast, default = (runs[w][1] for w in ways)
    print(
        f"agreement, bfloat16 with float32 (every slice): {dice_score(fast > 0, exact > 0):.4f}; "
        f"slice search with every slice (auto): labels equal {bool(np.array_equal(default, fast))}, Dice {dice_score(default > 0, fast > 0):.4f}"
    )
    print(f"speedup {wb / runs['default (auto, slice search 4)'][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
