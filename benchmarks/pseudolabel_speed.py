"""SA-3 Algorithm 2: the literal loop against the production path, same slices, same model, one process.

    .venv/bin/python benchmarks/pseudolabel_speed.py [--case /work/shared/data/lidc_idri_1011_dicom]
        [--slices 1] [--grid-mm 10] [--sam litemedsam] [--probmap-dir bundles/probmap/eval]

* literal: Algorithm 2 as written (``common.inferers.algorithm2_literal``): for every dot prompt the
  model runs on the image and that dot (image encoder included), then the candidates are voted
  one by one (Eq. 9) and unioned (Eq. 10);
* production: what the pseudolabel bundle runs (``common.inferers.pseudo_label_slice``): the image
  encoder once per slice, every dot of the slice through the prompt encoder and mask decoder in one
  batch, Eq. 9 and Eq. 10 as tensor reductions. Dots only, so both do the same work.

The lung map that places the dots is the SA-2 lung mask of the case when ``--probmap-dir`` holds
it, else the classical HU-threshold lung mask (``common.lungmask``); both paths get the same one.
Slices are the ``--slices`` axial slices around the middle of the lung. Prints the times, the
number of dots, how many pixels the two pseudo labels differ in, and ``speedup <x>`` last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default=str(REPO.parent / "shared/data/lidc_idri_1011_dicom"))
    ap.add_argument("--slices", type=int, default=1)
    ap.add_argument("--grid-mm", type=float, default=10.0, help="grid spacing (the bundle's grid_mm)")
    ap.add_argument("--overlap-threshold", type=float, default=0.5)
    ap.add_argument("--sam", default="litemedsam", help="SAM-family variant (common.networks.VARIANTS)")
    ap.add_argument("--checkpoint", default=None, help="weights for --sam (LiteMedSAM ships offline)")
    ap.add_argument("--probmap-dir", default=str(REPO / "bundles/probmap/eval"))
    ap.add_argument(
        "--prompt-batch",
        type=int,
        default=None,
        help="prompts per decoder call (default: the bundle's, 4 on CPU, 64 on a GPU)",
    )
    args = ap.parse_args(argv)

    import nibabel as nib
    import numpy as np
    import torch

    from common.transforms import probmap_outputs
    from common.inferers import algorithm2_literal, pseudo_label_slice
    from common.io import read_ct
    from common.lungmask import hu_threshold_lung_mask
    from common.networks import load_sam_family
    from common.qc import discover_cases
    from common.transforms.intensity import HUWindow

    torch.set_grad_enabled(False)
    prompt_batch = args.prompt_batch or (64 if torch.cuda.is_available() else 4)
    sam = load_sam_family(args.sam, checkpoint=args.checkpoint)
    if torch.cuda.is_available():
        sam = sam.cuda()
    vol = read_ct(args.case, axcodes="LPS")
    case_id = discover_cases(Path(args.case))[0].case_id if Path(args.case).is_dir() else None
    mask_path = probmap_outputs(args.probmap_dir, case_id or "")["lung_mask"] if case_id else None
    if mask_path is not None and mask_path.is_file():
        img = nib.load(str(mask_path))
        from common.io.volume import reorient_array

        region = reorient_array(np.asarray(img.dataobj) > 0, img.affine, "LPS")[0]
        source = f"SA-2 lung mask {mask_path}"
    else:
        region = hu_threshold_lung_mask(vol.hu, vol.spacing)
        source = "HU-threshold lung mask (no SA-2 output found)"
    ks = np.flatnonzero(region.any(axis=(0, 1)))
    if not ks.size:
        print(f"{args.case}: no lung in the map; nothing to prompt", file=sys.stderr)
        return 2
    mid = int(ks[len(ks) // 2])
    picks = [
        int(k)
        for k in ks[np.clip(np.searchsorted(ks, mid) + np.arange(args.slices) - args.slices // 2, 0, len(ks) - 1)]
    ]
    window = HUWindow()
    grid = max(1, int(round(args.grid_mm / float(np.mean(vol.spacing[:2])))))
    print(
        f"case {args.case}: {vol.shape}, slices {picks}, grid {grid} px ({args.grid_mm} mm), map: {source}, model {args.sam}, "
        f"prompt batch {prompt_batch}, device {sam.device}, torch threads {torch.get_num_threads()}"
    )

    t_lit = t_prod = 0.0
    dots = differ = 0
    for k in picks:
        slice01 = window(torch.from_numpy(np.ascontiguousarray(vol.hu[:, :, k].T))).numpy()
        reg = np.ascontiguousarray(region[:, :, k].T)
        t0 = time.perf_counter()
        literal = algorithm2_literal(sam, slice01, reg, grid, args.overlap_threshold)
        t_lit += time.perf_counter() - t0
        t0 = time.perf_counter()
        emb = sam.encode(slice01[None])
        res = pseudo_label_slice(
            sam,
            emb,
            slice01.shape,
            reg,
            prompts="dots",
            grid_size=grid,
            overlap_threshold=args.overlap_threshold,
            prompt_batch=prompt_batch,
        )
        t_prod += time.perf_counter() - t0
        dots += res.n_dots
        differ += int((literal != res.mask).sum())
        print(
            f"slice {k}: {res.n_dots} dots, {res.n_kept} kept, literal area {int(literal.sum())} px, production area {int(res.mask.sum())} px, "
            f"differing pixels {int((literal != res.mask).sum())}",
            flush=True,
        )
    print(f"literal    {t_lit:8.2f} s  ({t_lit / max(dots, 1) * 1000:.0f} ms per dot)")
    print(f"production {t_prod:8.2f} s  ({t_prod / max(dots, 1) * 1000:.1f} ms per dot)")
    print(
        f"dots {dots}, differing pixels {differ} of {len(picks) * vol.shape[0] * vol.shape[1]}: {'same masks' if differ == 0 else 'MASKS DIFFER'}"
    )
    print(f"speedup {t_lit / t_prod:.1f}")
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
