"""The classical HU-threshold lung mask and the left/right split, on phantom truth and real scans."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from common.io import read_ct
from common.lungmask import (
    FREE_AIR_MEDIAN_HU,
    body_mask,
    component_medians,
    hu_threshold_lung_mask,
    split_left_right,
    touches_border,
)
from common.metrics import dice_score
from common.phantom import generate_phantom
from tests.conftest import LUNG_PET_CT_DX_8MM, TOTALSEG_A


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lungs_join_the_outside_air(hu: np.ndarray, lungs: np.ndarray) -> bool:
    """Whether the lungs' 3D air component reaches the in-plane border as dark as free air: what made the
    rule before the per-slice check call them outside air."""
    labels, n = ndimage.label(hu < -400)
    lung_id = int(np.bincount(labels[lungs & (labels > 0)]).argmax())
    return bool(touches_border(labels, n)[lung_id]) and component_medians(hu, labels, [lung_id])[0] < FREE_AIR_MEDIAN_HU


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(shape=(96, 96, 56), spacing=(3.0, 3.0, 4.0), seed=3)


def test_threshold_mask_matches_phantom_lungs(phantom):
    vol = phantom.ct
    mask = hu_threshold_lung_mask(vol.hu, vol.spacing)
    assert dice_score(mask, phantom.lungs > 0) >= 0.95


def test_lungs_joined_to_the_outside_air_by_an_open_airway_stay_lung(phantom):
    """A tracheostomy (or an open mouth and nose in the field) joins the lungs to the air around the patient
    in 3D; the threshold still finds them and they stay inside the body (it found 0.0 of them before)."""
    vol, truth = phantom.ct, phantom.lungs > 0
    reference = hu_threshold_lung_mask(vol.hu, vol.spacing)
    hu, channel = _benchmark("real_ct_bad_input").open_airway(vol.hu, reference, vol.affine, vol.spacing, 10.0)
    assert channel and _lungs_join_the_outside_air(hu, truth)
    assert dice_score(hu_threshold_lung_mask(hu, vol.spacing), truth) >= 0.95
    body = body_mask(hu, vol.spacing)
    assert body[truth].mean() > 0.99
    assert not body[:3, :3].any()  # the air around the patient is still outside


def test_a_blanket_pocket_of_free_air_stays_outside_the_body():
    """Air that a blanket encloses on some slices and lets out on others is outside air, lung-dark air that
    an airway joins to it is not; RestrictToBodyd follows body_mask."""
    from common.transforms import RestrictToBodyd

    rng = np.random.default_rng(1)
    hu = rng.normal(-1000, 5, size=(100, 100, 20)).astype(np.float32)
    x, y = np.meshgrid(np.arange(100), np.arange(100), indexing="ij")
    r = np.hypot(x - 50, y - 50)
    hu[r < 30] = 40.0  # the body
    lung = (r < 14)[..., None] & (np.arange(20) < 15)
    hu[lung] = -850.0  # a lung, 185 mL at 2 x 2 x 5 mm, on slices 0-14
    hu[(r < 3)[..., None] & (np.arange(20) >= 15)] = -1000.0  # its trachea, on slices 15-19
    hu[49:52, :50, 18:] = -1000.0  # opened to the air in front of the body on slices 18-19
    blanket = (y < 50) & (((r >= 36) & (r < 38)) | ((abs(y - 49) < 1) & (r >= 30) & (r < 38)))
    hu[blanket] = 0.0  # closed on every slice, 124 mL of free air under it
    hu[45:56, :20, 10:] = -1000.0  # then opened at the front on slices 10-19
    pocket = (y < 49) & (r > 30.5) & (r < 35.5)
    spacing = (2.0, 2.0, 5.0)
    assert _lungs_join_the_outside_air(hu, lung)
    body = body_mask(hu, spacing)
    assert body[lung].all() and body[50, 50, 15:18].all()  # the lung is inside, its trachea where enclosed
    assert not body[pocket].any()  # the blanket's air is outside on every slice, enclosed or not
    d = RestrictToBodyd("mask", pixdim=spacing)({"mask": np.ones((1, *hu.shape), np.uint8), "image": hu[None]})
    assert np.array_equal(d["mask"][0] > 0, body)


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


def test_real_scan_with_an_open_airway_keeps_its_lungs():
    """Real CT (Lung-PET-CT-Dx A0002, 8 mm) with the trachea opened to the air in front of the neck, as
    benchmarks/real_ct_bad_input.py does: the lungs join the outside air, the threshold still finds them."""
    vol = read_ct(LUNG_PET_CT_DX_8MM)
    reference = hu_threshold_lung_mask(vol.hu, vol.spacing)
    hu, channel = _benchmark("real_ct_bad_input").open_airway(vol.hu, reference, vol.affine, vol.spacing, 10.0)
    assert channel and _lungs_join_the_outside_air(hu, reference)
    assert dice_score(hu_threshold_lung_mask(hu, vol.spacing), reference) > 0.99
    assert body_mask(hu, vol.spacing)[reference].mean() > 0.99


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
