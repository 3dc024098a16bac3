"""Preprocessing transforms: HU window, middle-slice trimming, resampling, resizing, denoising, orientation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.io import read_ct, to_metatensor
from common.transforms import HUWindow, HUWindowd, NLMDenoise, NLMDenoised, TrimSlices, TrimSlicesd, ct_preprocessing
from tests.conftest import TOTALSEG_B


def test_hu_window_maps_lung_window_to_unit_range():
    hu = torch.tensor([-2048.0, -1000.0, -300.0, 400.0, 3000.0])
    out = HUWindow()(hu)
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    d = HUWindowd("image", hu_window=(-1000, 0))({"image": torch.tensor([-500.0]), "label": torch.tensor([3.0])})
    assert torch.allclose(d["image"], torch.tensor([0.5])) and d["label"].item() == 3.0
    with pytest.raises(ValueError, match="high > low"):
        HUWindow((400, -1000))


def test_trim_slices_keeps_the_middle_and_moves_the_affine():
    vol = MetaTensor(
        torch.arange(50, dtype=torch.float32).repeat(1, 4, 4, 1), affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0]))
    )
    out = TrimSlices(20)(vol)
    assert out.shape == (1, 4, 4, 20)
    assert out[0, 0, 0].tolist() == list(range(15, 35))
    assert out.affine[2, 3].item() == pytest.approx(30.0)  # slice 15 at 2 mm
    assert TrimSlices(80)(vol).shape[-1] == 50  # fewer slices than asked: all kept
    d = TrimSlicesd(["image", "label"], 10)({"image": vol, "label": vol.clone()})
    assert torch.equal(d["image"], d["label"]) and d["image"].shape[-1] == 10
    with pytest.raises(ValueError):
        TrimSlices(0)


def test_preprocessing_chain_on_real_crop():
    vol = read_ct(TOTALSEG_B)  # 122 x 102 x 112 at 1.5 mm, LPS
    out = ct_preprocessing(target_spacing=(3.0, 3.0, 3.0), trim_slices=20, spatial_size=(64, 64, -1))(
        {"image": str(TOTALSEG_B)}
    )["image"]
    assert tuple(out.shape) == (1, 64, 64, 20)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    aff = out.affine.numpy()
    assert aff[0, 0] > 0 and aff[1, 1] > 0  # oriented to RAS
    assert aff[2, 2] == pytest.approx(3.0)
    # Resampling alone: physical extent is kept.
    res = ct_preprocessing(load=False, target_spacing=(3.0, 3.0, 3.0))({"image": to_metatensor(vol)})["image"]
    assert tuple(res.shape[1:]) == pytest.approx((61, 51, 56), abs=1)


def test_preprocessing_moves_labels_with_nearest_neighbour():
    vol = read_ct(TOTALSEG_B)
    label = (vol.hu < -400).astype(np.float32)
    lab = MetaTensor(torch.from_numpy(label)[None], affine=torch.from_numpy(vol.affine))
    out = ct_preprocessing(load=False, label_keys=["label"], target_spacing=(2.0, 2.0, 2.0), spatial_size=(48, 48, -1))(
        {"image": to_metatensor(vol), "label": lab}
    )
    assert out["image"].shape == out["label"].shape
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
    # Lung fraction is preserved by the resampling (within a few percent).
    assert float(out["label"].mean()) == pytest.approx(float(label.mean()), rel=0.05)


def test_nlm_denoise_reduces_noise_and_keeps_edges():
    rng = np.random.default_rng(0)
    clean = np.zeros((1, 64, 64, 2), np.float32)
    clean[:, :, 32:, :] = 100.0
    noisy = clean + rng.normal(0, 20, clean.shape).astype(np.float32)
    out = NLMDenoise()(torch.from_numpy(noisy))
    assert isinstance(out, torch.Tensor)
    residual = out.numpy() - clean
    assert residual[:, 4:28, 4:28].std() < 0.5 * 20  # noise at least halved in flat areas
    assert out.numpy()[:, :, 40:].mean() - out.numpy()[:, :, :24].mean() == pytest.approx(100, abs=5)  # edge kept
    flat = NLMDenoised("image")({"image": np.full((1, 16, 16, 1), 7.0, np.float32)})["image"]
    assert np.all(flat == 7.0)
    with pytest.raises(ValueError, match="channel-first"):
        NLMDenoise()(np.zeros((8, 8), np.float32))


def test_patient_field_of_view_frames_a_patient_on_a_wide_field_only():
    """A patient that fills less than ``min_patient_fraction`` of the slice gets a square around them that they
    fill ``patient_fraction`` of (in mm, anisotropic pixels too); a patient that fills the slice gets it whole."""
    from common.transforms import PatientFieldOfView, PatientFieldOfViewd

    hu = np.full((200, 160, 6), -1000.0, np.float32)
    x, y = np.meshgrid(np.arange(200), np.arange(160), indexing="ij")
    body = ((x - 80) / 50.0) ** 2 + ((y - 70) / 25.0) ** 2 < 1  # 100 x 50 px: 0.50 of the 200 px side
    hu[body] = 40.0
    hu[(x - 70) ** 2 + (y - 70) ** 2 < 100] = -850.0  # a lung inside: the patient is the body around it
    image = MetaTensor(torch.from_numpy(hu)[None], affine=torch.diag(torch.tensor([1.0, 2.0, 5.0, 1.0])))
    i0, i1, j0, j1 = PatientFieldOfView(0.7, 0.9)(image)
    side_mm = max(body.any(1).sum() * 1.0, body.any(0).sum() * 2.0) / 0.9  # the widest side in mm over the share
    assert (i1 - i0, j1 - j0) == (round(side_mm / 1.0), round(side_mm / 2.0))
    xs, ys = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
    assert i0 <= xs[0] and i1 > xs[-1] and j0 <= ys[0] and j1 > ys[-1]  # the whole patient is inside
    assert PatientFieldOfView(0.4, 0.9)(image) == (0, 200, 0, 160)  # 0.50 is enough for this setting
    assert PatientFieldOfView(0.0)(image) == (0, 200, 0, 160)
    d = PatientFieldOfViewd("hu")({"hu": image, "image": MetaTensor(torch.zeros(image.shape))})
    assert d["field_of_view"].tolist() == d["image"].meta["field_of_view"].tolist() == [i0, i1, j0, j1]
    with pytest.raises(ValueError, match="patient_fraction"):
        PatientFieldOfView(0.95, 0.9)


def test_slice_inferer_runs_on_the_field_of_view_and_leaves_the_rest_zero():
    from common.inferers import SliceEnsembleInferer

    calls = []

    class Record(torch.nn.Module):
        def forward(self, slices):
            calls.append(tuple(slices.shape))
            return slices * 0.0 + 5.0  # sigmoid: 0.993

    x = MetaTensor(torch.rand(1, 1, 40, 30, 5), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    prob = SliceEnsembleInferer(slice_batch=2)(x, Record(), field_of_view=(5, 25, 10, 30))
    assert isinstance(prob, MetaTensor) and torch.equal(prob.affine, x.affine)
    assert {c[-2:] for c in calls} == {(20, 20)}
    inside = torch.zeros(prob.shape, dtype=torch.bool)
    inside[..., 5:25, 10:30, :] = True
    assert (prob[inside] > 0.99).all() and (prob[~inside] == 0).all()
    calls.clear()
    x.meta["field_of_view"] = np.array([5, 25, 10, 30])  # as PatientFieldOfViewd leaves it, for MONAI Label's call
    assert torch.equal(SliceEnsembleInferer(slice_batch=2)(x[None][0], Record()), prob)
    assert {c[-2:] for c in calls} == {(20, 20)}
    calls.clear()
    whole = SliceEnsembleInferer(slice_batch=2)(x, Record(), field_of_view=(0, 40, 0, 30))
    assert {c[-2:] for c in calls} == {(40, 30)} and (whole > 0.99).all()
    with pytest.raises(ValueError, match="field_of_view"):
        SliceEnsembleInferer()(x, Record(), field_of_view=(0, 50, 0, 30))
