"""What the H-SAM test modules share: the tiny random H-SAM, a NIfTI writer, the bundle's command line and its
inference post-processing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from common.networks.hsam import HSam, build_hsam

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "hsam_finetune"


def tiny(**kwargs) -> HSam:
    torch.manual_seed(0)
    return build_hsam("tiny_sam", random_init=True, **kwargs)


def nifti(path: Path, array: np.ndarray, affine=None) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), str(path))
    return str(path)


def run_bundle(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args, "--bundle_root", str(BUNDLE)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def inference_postprocessing(**overrides):
    from common.bundle_run import BundleRun

    return BundleRun("hsam_finetune", ["inference.json"], overrides).parser().get_parsed_content("postprocessing")
