"""The classical HU-threshold lung mask and the left/right split, on phantom truth and real scans."""

from __future__ import annotations

import numpy as np
import pytest

from common.io import read_ct
from common.lungmask import hu_threshold_lung_mask, split_left_right
from common.metrics import dice_score
from common.phantom import generate_phantom
from tests.conftest import TOTALSEG_A


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(shape=(96, 96, 56), spacing=(3.0, 3.0, 4.0), seed=3)


def test_threshold_mask_matches_phantom_lungs(phantom):
    vol = phantom.ct
    mask = hu_threshold_lung_mask(vol.hu, vol.spacing)
    assert dice_score(mask, phantom.lungs > 0) >= 0.95


def test_left_right_split_on_phantom(phantom):
    vol = phantom.ct
    right, left = split_left_right(hu_threshold_lung_mask(vol.hu, vol.spacing), vol.affine)
    assert not (right & left).any()
    assert dice_score(right, phantom.lungs == 1) >= 0.9
    assert dice_score(left, phantom.lungs == 2) >= 0.9


def test_split_on_real_crop_puts_right_lung_at_positive_x():
    vol = read_ct(TOTALSEG_A)
    right, left = split_left_right(hu_threshold_lung_mask(vol.hu, vol.spacing), vol.affine)
    world_x = lambda m: float(vol.affine[0, :3] @ np.argwhere(m).mean(axis=0) + vol.affine[0, 3])  # noqa: E731
    assert world_x(right) > world_x(left)
    ratio = right.sum() / left.sum()
    assert 0.6 < ratio < 1.6  # two real lungs of comparable size, not one lung cut in half


def test_no_lung_gives_empty_masks():
    hu = np.full((40, 40, 10), 30.0, np.float32)
    mask = hu_threshold_lung_mask(hu, (2.0, 2.0, 2.0))
    right, left = split_left_right(mask, np.diag([-2.0, -2.0, 2.0, 1.0]))
    assert not mask.any() and not right.any() and not left.any()


def test_split_assigns_every_part_of_a_broken_mask_to_its_side():
    """Pseudo labels can come in pieces: two lungs joined at the apex by a leak, and a gap at one
    slice that cuts both bases off. Every voxel lands on a side, the right one."""
    mask = np.zeros((40, 30, 30), dtype=bool)
    mask[4:16, 5:25, :] = True  # low i = patient left under this RAS affine
    mask[24:36, 5:25, :] = True  # high i = patient right
    mask[16:24, 14:16, 22:] = True  # a thin leak joining the apices
    mask[:, :, 10] = False  # a missing slice cuts both bases off
    right, left = split_left_right(mask, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert not (right & left).any()
    assert np.array_equal(right | left, mask)
    truth_right = mask.copy()
    truth_right[:20] = False
    assert dice_score(right, truth_right) > 0.98
    assert dice_score(left, mask & ~truth_right) > 0.98
    assert right[30, 10, 5] and left[10, 10, 5]  # the cut-off bases


def test_component_medians_equal_scipy_median(rng):
    """The per-box medians that body_mask and the HU threshold use are SciPy's, component for component."""
    from scipy import ndimage

    from common.lungmask import component_medians

    hu = rng.normal(-700, 300, size=(40, 36, 9)).astype(np.float32)
    labels, n = ndimage.label(hu < -800)
    ids = np.arange(1, n + 1)
    assert n > 10
    assert np.array_equal(component_medians(hu, labels, ids), np.atleast_1d(ndimage.median(hu, labels, ids)))


def test_labelfree_table_takes_a_methods_own_sides_only_when_they_cover_its_mask(phantom, tmp_path):
    """benchmarks/real_ct_labelfree.py reads a method's lung_sides output instead of splitting its mask again; a
    sides file that does not cover the mask exactly is ignored and the mask is split as before."""
    import importlib.util
    import json
    from pathlib import Path

    from common.io.nifti import save_nifti_array

    spec = importlib.util.spec_from_file_location(
        "real_ct_labelfree", Path(__file__).resolve().parents[2] / "benchmarks" / "real_ct_labelfree.py"
    )
    labelfree = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(labelfree)
    vol = phantom.ct
    scans = tmp_path / "scans"
    vol.to_nifti(scans / "case.nii.gz")
    mask = hu_threshold_lung_mask(vol.hu, vol.spacing)
    right, left = split_left_right(mask, vol.affine)
    sides = np.zeros(mask.shape, np.uint8)
    sides[right], sides[left] = 1, 2
    for name, own in (("own", sides), ("stale", np.where(left, 2, 0).astype(np.uint8))):
        save_nifti_array(mask, vol.affine, tmp_path / name / "case" / "case_lung_mask.nii.gz", np.uint8)
        save_nifti_array(own, vol.affine, tmp_path / name / "case" / "case_lung_sides.nii.gz", np.uint8)
    got_right, got_left = labelfree._sides_of(tmp_path / "own", "case", mask)
    assert np.array_equal(got_right, right) and np.array_equal(got_left, left)
    assert labelfree._sides_of(tmp_path / "stale", "case", mask) == (None, None)
    assert (
        labelfree.main(
            [
                "--scans",
                str(scans),
                "--method",
                f"own={tmp_path / 'own'}",
                "--method",
                f"stale={tmp_path / 'stale'}",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "labelfree.json").read_text())}
    ml = vol.voxel_volume_ml
    for name in ("own", "stale"):
        assert rows[name]["right_ml"] == round(float(right.sum()) * ml, 1) and rows[name]["left_ml"] == round(
            float(left.sum()) * ml, 1
        )
    assert right.sum() > 0 and left.sum() > 0
