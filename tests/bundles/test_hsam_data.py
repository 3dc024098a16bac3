"""SA-3b H-SAM's data and answers: training slices with bad cases, the slice inferer and its slice search,
segmentation metrics, and the inference post-processing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.bundles.hsam_helpers import inference_postprocessing, nifti


def test_bad_cases_are_reported_and_skipped(tmp_path, caplog):
    from common.data import training_slices

    hu = np.full((24, 24, 10), -800.0, dtype=np.float32)
    lab = np.zeros((24, 24, 10), dtype=np.uint8)
    lab[6:18, 6:18, 2:8] = 1
    good = {
        "image": nifti(tmp_path / "a_ct.nii.gz", hu),
        "label": nifti(tmp_path / "a_label.nii.gz", lab),
        "case_id": "good",
    }
    cases = [
        good,
        {"image": good["image"], "label": str(tmp_path / "nowhere.nii.gz"), "case_id": "missing"},
        {"image": good["image"], "label": nifti(tmp_path / "b.nii.gz", lab[:20]), "case_id": "grid"},
        {
            "image": good["image"],
            "label": nifti(tmp_path / "c.nii.gz", lab, np.diag([1.0, 2.0, 3.0, 1.0])),
            "case_id": "affine",
        },
        {"image": good["image"], "label": nifti(tmp_path / "d.nii.gz", np.zeros_like(lab)), "case_id": "empty"},
    ]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": cases, "validation": []}))
    got = training_slices(tmp_path / "datalist.json", slice_size=32, background_share=0.5)
    reasons = {s["case"]: s["reason"] for s in got["skipped"]}
    assert set(reasons) == {"missing", "grid", "affine", "empty"}
    assert "not found" in reasons["missing"] and "nowhere.nii.gz" in reasons["missing"]
    assert "another grid" in reasons["grid"] and "another grid" in reasons["affine"] and "empty" in reasons["empty"]
    assert {s["case_id"] for s in got["training"]} == {"good"}
    assert (
        sum(1 for s in got["training"] if s["label"].sum() > 0) == 6 and len(got["training"]) == 9
    )  # 6 lung + 50 % as many background
    assert got["training"][0]["image"].shape == (1, 32, 32)
    assert "4 case(s) skipped" in caplog.text
    with pytest.raises(FileNotFoundError, match="datalist not found"):
        training_slices(tmp_path / "none.json")


def test_when_qc_excluded_every_case_the_error_names_the_option_that_admits_them(tmp_path):
    """A pseudolabel datalist whose every case QC excluded: training stops naming admit_qc_excluded, and with it the
    excluded cases (those with a pseudo label on disk) train; an excluded case with no label stays out."""
    from common.data import training_slices

    hu = np.full((24, 24, 10), -800.0, dtype=np.float32)
    lab = np.zeros((24, 24, 10), dtype=np.uint8)
    lab[6:18, 6:18, 2:8] = 1
    case = {
        "image": nifti(tmp_path / "a_ct.nii.gz", hu),
        "label": nifti(tmp_path / "a_label.nii.gz", lab),
        "case_id": "a",
        "reasons": ["agreement < 0.85"],
    }
    failed = {"case_id": "unreadable", "reasons": ["not a CT"]}  # no pseudo label was written for it
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "validation": [], "excluded": [case, failed]}))
    with pytest.raises(
        ValueError,
        match=r"2 excluded: agreement < 0.85; not a CT\).*admit_qc_excluded=true \(hsam_finetune: --admit_qc_excluded true\)",
    ):
        training_slices(tmp_path / "datalist.json", slice_size=32)
    (tmp_path / "none.json").write_text(json.dumps({"training": [], "validation": [], "excluded": []}))
    with pytest.raises(
        ValueError, match=r"no usable training case .*QC excluded 2 case\(s\): set admit_qc_excluded=true"
    ):
        training_slices([tmp_path / "datalist.json", tmp_path / "none.json"], slice_size=32)  # several datalists joined
    got = training_slices(tmp_path / "datalist.json", slice_size=32, background_share=0.0, admit_excluded=True)
    assert {s["case_id"] for s in got["training"]} == {"a"} and len(got["training"]) == 6 and got["validation"] == []


def test_background_slices_never_show_lung_the_pseudo_label_missed(tmp_path):
    """A slice past the pseudo label's end that still shows enclosed air (lung) is no 'no lung' example."""
    from common.data import training_slices
    from common.data.slices import enclosed_air_share

    hu = np.full((24, 24, 12), -1000.0, dtype=np.float32)  # air around the patient
    hu[3:21, 3:21, :] = 40.0  # the body, every slice
    hu[6:18, 6:18, 0:9] = -850.0  # lung on slices 0-8 ...
    lab = np.zeros(hu.shape, dtype=np.uint8)
    lab[6:18, 6:18, 3:9] = 1  # ... but the pseudo label stops short of slices 0-2
    window = (-1000.0, 400.0)
    share = enclosed_air_share((np.clip(hu, *window) - window[0]) / (window[1] - window[0]), window)
    assert share[:9] == pytest.approx([144 / 576] * 9) and not share[9:].any()  # the outside air is not counted
    case = {
        "image": nifti(tmp_path / "ct.nii.gz", hu),
        "label": nifti(tmp_path / "label.nii.gz", lab),
        "case_id": "short",
    }
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [case], "validation": []}))
    got = training_slices(tmp_path / "datalist.json", slice_size=24, background_share=1.0)
    background = sorted(s["slice"] for s in got["training"] if s["label"].sum() == 0)
    assert background == [9, 10, 11]  # the three lung-free slices; 0-2 are left out
    every = training_slices(tmp_path / "datalist.json", slice_size=24, background_share=1.0, background_max_air=None)
    assert (
        sorted(s["slice"] for s in every["training"] if s["label"].sum() == 0) != background
    )  # the old rule takes lung slices too


def test_several_datalists_are_joined_split_by_split(tmp_path):
    from common.data import training_slices

    hu = np.full((24, 24, 10), -800.0, dtype=np.float32)
    lab = np.zeros((24, 24, 10), dtype=np.uint8)
    lab[6:18, 6:18, 2:8] = 1
    case = {"image": nifti(tmp_path / "ct.nii.gz", hu), "label": nifti(tmp_path / "label.nii.gz", lab)}
    (tmp_path / "a.json").write_text(json.dumps({"training": [{**case, "case_id": "a"}], "validation": []}))
    (tmp_path / "b.json").write_text(
        json.dumps({"training": [{**case, "case_id": "b"}], "validation": [{**case, "case_id": "c"}]})
    )
    got = training_slices([tmp_path / "a.json", str(tmp_path / "b.json")], slice_size=32, background_share=0.0)
    assert sorted({s["case_id"] for s in got["training"]}) == ["a", "b"] and len(got["training"]) == 12
    assert {s["case_id"] for s in got["validation"]} == {"c"} and len(got["validation"]) == 6
    # val_slice_step thins validation alone (6 lung slices -> every 3rd: 2); training keeps slice_step
    thinned = training_slices(
        [tmp_path / "a.json", tmp_path / "b.json"], slice_size=32, background_share=0.0, val_slice_step=3
    )
    assert len(thinned["training"]) == 12 and len(thinned["validation"]) == 2
    both = training_slices(tmp_path / "b.json", slice_size=32, background_share=0.0, slice_step=2)
    assert (
        len(both["training"]) == 3 and len(both["validation"]) == 3
    )  # without val_slice_step, slice_step holds for both
    with pytest.raises(ValueError, match="names no datalist"):
        training_slices([])
    # a datalist whose every case QC excluded: alone an error with the reason, joined with others a warning
    (tmp_path / "none.json").write_text(
        json.dumps(
            {
                "training": [],
                "validation": [],
                "excluded": [{**case, "case_id": "x", "reasons": ["agreement 0.80 < 0.85"]}],
            }
        )
    )
    with pytest.raises(
        ValueError,
        match=r"none.json: datalist has no 'training' or 'validation' cases \(1 excluded: agreement 0.80 < 0.85\)",
    ):
        training_slices(tmp_path / "none.json")
    got = training_slices([tmp_path / "a.json", tmp_path / "none.json"], slice_size=32, background_share=0.0)
    assert {s["case_id"] for s in got["training"]} == {"a"}


def test_validate_between_holds_out_the_slices_training_skips_in_every_training_scan(tmp_path):
    """validate_between: the validation cases' slices plus, from each training scan, the label slices slice_step leaves
    out (thinned by val_slice_step); never a slice that trains, and the training slices stay exactly as without it."""
    from common.data import training_slices

    hu = np.full((24, 24, 14), -800.0, dtype=np.float32)
    lab = np.zeros((24, 24, 14), dtype=np.uint8)
    lab[6:18, 6:18, 1:13] = 1  # label slices 1-12
    case = {"image": nifti(tmp_path / "ct.nii.gz", hu), "label": nifti(tmp_path / "label.nii.gz", lab)}
    (tmp_path / "d.json").write_text(
        json.dumps(
            {"training": [{**case, "case_id": "a"}, {**case, "case_id": "b"}], "validation": [{**case, "case_id": "c"}]}
        )
    )
    plain = training_slices(tmp_path / "d.json", slice_size=24, background_share=0.0, slice_step=2, val_slice_step=4)
    got = training_slices(
        tmp_path / "d.json", slice_size=24, background_share=0.0, slice_step=2, val_slice_step=4, validate_between=True
    )
    trained = {(s["case_id"], s["slice"]) for s in got["training"]}
    assert (
        trained
        == {(s["case_id"], s["slice"]) for s in plain["training"]}
        == {(c, z) for c in "ab" for z in (1, 3, 5, 7, 9, 11)}
    )
    held = sorted((s["case_id"], s["slice"]) for s in got["validation"])
    assert held == [
        ("a", 2),
        ("a", 10),
        ("b", 2),
        ("b", 10),
        ("c", 1),
        ("c", 5),
        ("c", 9),
    ]  # every 4th of 2,4,...,12; c as before
    assert not trained & set(held)
    with pytest.raises(ValueError, match="validate_between needs slice_step >= 2"):
        training_slices(tmp_path / "d.json", slice_size=24, validate_between=True)


def test_slice_inferer_runs_a_fixed_size_network_at_its_size_and_returns_the_slice_grid():
    from common.inferers import SliceEnsembleInferer

    seen = []

    class FixedSize(torch.nn.Module):  # like UNETR: one input size only
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            assert tuple(x.shape[-2:]) == (32, 32), x.shape
            return torch.where(x > 0.5, 20.0, -20.0)

    volume = torch.zeros(1, 1, 48, 40, 6)
    volume[:, :, 8:40, 8:32, 1:5] = 1.0
    prob = SliceEnsembleInferer(slice_batch=2, input_size=32)(
        volume, FixedSize(), slice_mask=np.array([0, 1, 1, 1, 1, 0], bool)
    )
    assert prob.shape == volume.shape and seen == [(32, 32), (32, 32)]
    assert float(prob[..., 0].max()) == 0.0  # a masked-out slice is not run
    inside, outside = prob[0, 0, 16:32, 12:28, 2], prob[0, 0, :4, :4, 2]
    assert float(inside.min()) > 0.99 and float(outside.max()) < 0.01
    # a MetaTensor volume (as MONAI Label passes it) keeps its affine: the clean-up measures mL from it
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([-0.7, -0.7, 2.5, 1.0], dtype=torch.float64))
    meta_prob = SliceEnsembleInferer(slice_batch=4, input_size=32)(MetaTensor(volume, affine=affine), FixedSize())
    assert isinstance(meta_prob, MetaTensor) and torch.allclose(meta_prob.affine.reshape(4, 4).double(), affine)
    # a batch of slices (validation) goes through slice_batch at a time, with the probability of one pass
    seen.clear()
    slices = volume[0].permute(3, 0, 1, 2)  # (6, 1, 48, 40)
    chunked = SliceEnsembleInferer(slice_batch=4, input_size=32)(slices, FixedSize())
    assert len(seen) == 2 and chunked.shape == slices.shape  # two forward passes: 4 slices, then 2
    torch.testing.assert_close(chunked, SliceEnsembleInferer(slice_batch=6, input_size=32)(slices, FixedSize()))


def test_slice_search_runs_the_foreground_slab_and_matches_every_slice():
    from common.inferers import SliceEnsembleInferer

    class CountingThreshold(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.slices = 0

        def forward(self, x):
            self.slices += x.shape[0]
            return torch.where(x > 0.5, 20.0, -20.0)

    volume = torch.zeros(1, 1, 16, 16, 40)
    volume[:, :, 4:12, 4:12, 13:27] = 1.0  # the foreground slab: slices 13-26, ends between sampled slices
    full_net, search_net = CountingThreshold(), CountingThreshold()
    full = SliceEnsembleInferer(slice_batch=3)(volume, full_net)
    searched = SliceEnsembleInferer(slice_batch=3, slice_search_step=4)(volume, search_net)
    torch.testing.assert_close(searched, full)  # every foreground slice found, ends included
    assert (
        full_net.slices == 40 and search_net.slices == 10 + (28 - 12 + 1) - 5
    )  # 10 sampled, then slab 12-28 less its 5 sampled
    # the slab reaching the volume's last slice, which is not a sampled one: still run
    edge = torch.zeros(1, 1, 16, 16, 42)
    edge[:, :, 4:12, 4:12, 38:] = 1.0
    torch.testing.assert_close(
        SliceEnsembleInferer(slice_search_step=4)(edge, CountingThreshold()),
        SliceEnsembleInferer()(edge, CountingThreshold()),
    )
    # no foreground in any sampled slice: only those ran, all zero
    empty_net = CountingThreshold()
    assert (
        float(SliceEnsembleInferer(slice_search_step=4)(torch.zeros(1, 1, 8, 8, 20), empty_net).max()) < 0.01
        and empty_net.slices == 5
    )
    with pytest.raises(ValueError, match="slice_search_step"):
        SliceEnsembleInferer(slice_search_step=0)


def test_segmentation_scores_and_the_central_peripheral_split():
    from common.metrics import central_slices, segmentation_scores

    truth = np.zeros((20, 20, 20), bool)
    truth[5:15, 5:15, 2:18] = True  # lung on slices 2..17: central 50 % is 6..13
    assert np.flatnonzero(central_slices(truth)).tolist() == list(range(6, 14))
    pred = truth.copy()
    pred[..., 2:4] = False  # the apex missed
    s = segmentation_scores(pred, truth, spacing=(1.0, 1.0, 2.0))
    assert s["dice"] == pytest.approx(2 * 1400 / 3000, abs=1e-4)
    assert s["jaccard"] == pytest.approx(1400 / 1600, abs=1e-4)
    assert s["sensitivity"] == pytest.approx(1400 / 1600, abs=1e-4) and s["specificity"] == pytest.approx(1.0)
    assert s["dice_central"] == pytest.approx(1.0) and s["dice_peripheral"] == pytest.approx(2 * 600 / 1400, abs=1e-4)
    assert s["hd95_mm"] > 0 and s["assd_mm"] > 0


@pytest.mark.parametrize("restrict_to_body", [True, False])
def test_inference_drops_what_the_network_draws_outside_the_body(restrict_to_body):
    """A0001's top slices: the shipped H-SAM drew 465 mL in the air between the blanket and the neck, a component of
    its own, and with both lungs welded into one component "the two largest" kept it. With ``restrict_to_body`` (the
    default) the answer keeps only what lies inside the body; without it the blob stays."""
    from monai.data import MetaTensor

    hu = np.full((48, 48, 24), -1000.0, np.float32)  # free air around the patient
    yy, xx = np.mgrid[:48, :48]
    body = ((yy - 30) / 16.0) ** 2 + ((xx - 24) / 22.0) ** 2 <= 1.0
    hu[body, :16] = 40.0  # the trunk on slices 0..15, a blanket's air above it on 16..23
    lungs = np.zeros_like(hu, bool)
    lungs[22:36, 8:40, 2:14] = True
    lungs[22:36, 23:25, 2:14] = False  # right and left lung, 2 voxels apart
    lungs[28, 8:40, 6] = True  # welded by one bridge, as A0001's lungs are at the carina
    hu[lungs] = -850.0
    blob = np.zeros_like(hu, bool)
    blob[2:12, 4:44, 16:24] = True  # in the free air above the trunk
    pred = (lungs | blob).astype(np.float32)[None]
    affine = torch.diag(
        torch.tensor([2.0, 2.0, 5.0, 1.0], dtype=torch.float64)
    )  # 0.02 mL a voxel: both components above 20 mL
    d = {
        "pred": MetaTensor(torch.from_numpy(pred), affine=affine),
        "hu": MetaTensor(torch.from_numpy(hu)[None], affine=affine),
    }
    out = inference_postprocessing(restrict_to_body=restrict_to_body, refine_boundary_mm=0.0)(d)
    mask = np.asarray(out["pred"])[0] > 0
    assert np.array_equal(mask[:, :, :14], lungs[:, :, :14])
    assert np.array_equal(mask[:, :, 16:], np.zeros_like(blob[:, :, 16:]) if restrict_to_body else blob[:, :, 16:])
    assert out["lung_sides_ml"]["total"] == pytest.approx(mask.sum() * 0.02)
