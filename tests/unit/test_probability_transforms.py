"""SA-2 probability-map post-processing: normalisation, smoothing, thresholding; lung-mask clean-up and the
surface refinement that H-SAM's answer goes through."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.classes import LEFT_LUNG, RIGHT_LUNG
from common.metrics import dice_score
from common.transforms import (
    LungMaskCleanup,
    LungMaskCleanupd,
    SplitLungSides,
    SplitLungSidesd,
    RefineLungBoundary,
    RefineLungBoundaryd,
    SimilarityToProbability,
    SimilarityToProbabilityd,
    SmoothProbability,
    SmoothProbabilityd,
    ThresholdProbability,
    ThresholdProbabilityd,
)
from common.transforms.threshold import THRESHOLD_METHODS

SHAPE = (40, 32, 12)


def ellipsoid(centre, radii, shape=SHAPE) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


@pytest.fixture(scope="module")
def lungs() -> np.ndarray:
    """Two 'lungs' along the first axis: the one at small x is smaller (left, RAS x = index)."""
    return ellipsoid((11, 16, 5.5), (7, 10, 5)) | ellipsoid((29, 16, 5.5), (8, 11, 5.5))


@pytest.fixture(scope="module")
def bimodal(lungs) -> np.ndarray:
    """A (1, X, Y, Z) map: about 0.85 in the lungs, 0.15 outside, light noise."""
    rng = np.random.default_rng(0)
    return (np.where(lungs, 0.85, 0.15) + rng.normal(0, 0.04, SHAPE)).astype(np.float32)[None]


# ---------------------------------------------------------------- similarity -> probability


def test_softmax_sums_to_one_and_scale_sharpens():
    sim = torch.from_numpy(np.random.default_rng(1).uniform(-0.3, 0.4, (3, 6, 5, 4)).astype(np.float32))
    soft = SimilarityToProbability("softmax", scale=1.0)(sim)
    sharp = SimilarityToProbability("softmax", scale=14.3)(sim)
    for p in (soft, sharp):
        assert isinstance(p, torch.Tensor) and p.dtype == torch.float32
        assert torch.allclose(p.sum(dim=0), torch.ones(6, 5, 4), atol=1e-5)
    # Same winner, but a higher logit scale is more confident.
    assert torch.equal(soft.argmax(0), sharp.argmax(0))
    assert float(sharp.max(0).values.mean()) > float(soft.max(0).values.mean()) + 0.2
    assert torch.allclose(soft, torch.softmax(sim, dim=0), atol=1e-6)


def test_background_classes_take_their_share_and_are_dropped():
    """Two anatomical channels and one background channel: the softmax runs over all three, only the
    first two come out, and where the background wins they no longer sum to 1."""
    sim = torch.tensor([[0.1, 0.3], [0.0, -0.2], [0.5, -0.5]])[:, :, None]  # (C=3, 2, 1): background wins pixel 0
    full = SimilarityToProbability("softmax", scale=10.0)(sim)
    kept = SimilarityToProbability("softmax", scale=10.0, num_classes=2)(sim)
    assert kept.shape == (2, 2, 1) and torch.allclose(kept, full[:2])
    assert float(kept[:, 0].sum()) < 0.1 and float(kept[:, 1].sum()) > 0.99  # air: no anatomy; lung pixel: all of it
    d = SimilarityToProbabilityd("pred", scale=10.0, num_classes=2)({"pred": sim.numpy()})
    assert d["pred"].shape == (2, 2, 1) and np.allclose(d["pred"], kept.numpy())
    with pytest.raises(ValueError, match="num_classes"):
        SimilarityToProbability(num_classes=4)(sim)
    with pytest.raises(ValueError, match="num_classes"):
        SimilarityToProbability(num_classes=0)


def test_minmax_maps_each_channel_to_unit_range_and_constant_channel_to_zero():
    sim = np.stack([np.linspace(-0.2, 0.6, 60).reshape(3, 4, 5), np.full((3, 4, 5), 0.3)]).astype(np.float64)
    p = SimilarityToProbability("minmax")(sim)
    assert isinstance(p, np.ndarray) and p.dtype == np.float32
    assert p[0].min() == 0.0 and p[0].max() == pytest.approx(1.0)
    assert p[0].reshape(-1)[30] == pytest.approx(30 / 59, abs=1e-6)  # linear
    assert np.all(p[1] == 0.0) and np.isfinite(p).all()


def test_sigmoid_is_one_half_at_beta():
    sim = torch.tensor([[[0.2, 0.5, 0.8]]])
    p = SimilarityToProbability("sigmoid", alpha=10.0, beta=0.5)(sim)
    assert p[0, 0, 1].item() == pytest.approx(0.5)
    assert p[0, 0, 0].item() == pytest.approx(1 / (1 + np.exp(3.0)), abs=1e-6)
    assert p[0, 0, 2].item() == pytest.approx(1 / (1 + np.exp(-3.0)), abs=1e-6)


@pytest.mark.parametrize("method", ["softmax", "minmax", "sigmoid"])
def test_non_finite_similarity_gives_finite_probability(method):
    sim = np.random.default_rng(2).uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    sim[0, 0, 0, 0], sim[0, 1, 1, 1], sim[1, 2, 2, 2] = np.nan, np.inf, -np.inf
    sim_nan_channel = sim.copy()
    sim_nan_channel[1] = np.nan  # a channel with no finite value at all
    for s in (sim, sim_nan_channel):
        p = SimilarityToProbabilityd("sim", method=method, scale=100.0)({"sim": s})["sim"]
        assert np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0
    if method == "minmax":  # NaN takes the channel's finite minimum: 0 after rescaling
        assert SimilarityToProbability("minmax")(sim)[0, 0, 0, 0] == 0.0
    # Huge finite logits must not overflow into NaN either.
    big = np.array([[[[3e38]]], [[[-3e38]]]], dtype=np.float32)
    assert np.isfinite(SimilarityToProbability(method, scale=50.0, alpha=1e6)(big)).all()


def test_unknown_methods_are_rejected_with_the_allowed_ones():
    with pytest.raises(ValueError, match="softmax, minmax, sigmoid"):
        SimilarityToProbability("relu")
    with pytest.raises(ValueError, match="gaussian"):
        SmoothProbability("median")
    with pytest.raises(ValueError, match="adaptive_median"):
        ThresholdProbability("kmeans")


# ---------------------------------------------------------------- smoothing


def test_gaussian_2d_stays_in_its_slice_and_3d_crosses_slices():
    vol = np.zeros((1,) + SHAPE, dtype=np.float32)
    vol[0, 15:25, 10:20, 6] = 1.0
    flat = SmoothProbability("gaussian", sigma_mm=2.0, spatial_dims=2)(vol)
    deep = SmoothProbability("gaussian", sigma_mm=2.0, spatial_dims=3)(vol)
    assert flat.dtype == np.float32 and flat.shape == vol.shape
    assert np.all(np.delete(flat, 6, axis=3) == 0.0)  # no mixing across axial slices
    assert flat[0, :, :, 6].sum() == pytest.approx(100.0, rel=1e-3)  # mass kept in the slice
    assert flat[0, 14, 15, 6] > 0.1 and flat[0, 20, 15, 6] < 1.0  # and blurred in-plane
    assert deep[0, 20, 15, 5] > 0.05 and deep[0, 20, 15, 7] > 0.05  # 3D reaches the neighbours
    # A uniform map stays uniform up to the edges (replicate padding, no dimming at the border).
    ones = SmoothProbability("gaussian", sigma_mm=3.0, spatial_dims=3)(np.ones((1,) + SHAPE, np.float32))
    assert np.ptp(ones) < 1e-6 and np.allclose(ones, 1.0, atol=1e-3)  # (the truncated kernel sums to 0.9999)


def test_gaussian_sigma_follows_metatensor_spacing():
    vol = torch.zeros((1,) + SHAPE)
    vol[0, 20, 16, 6] = 1.0
    fine = MetaTensor(vol.clone(), affine=torch.diag(torch.tensor([1.0, 1.0, 2.5, 1.0])))
    coarse = MetaTensor(vol.clone(), affine=torch.diag(torch.tensor([3.0, 3.0, 2.5, 1.0])))
    smooth = SmoothProbabilityd("p", sigma_mm=3.0)
    out_fine, out_coarse = smooth({"p": fine})["p"], smooth({"p": coarse})["p"]
    assert isinstance(out_fine, MetaTensor) and out_fine.dtype == torch.float32
    assert torch.equal(out_fine.affine, fine.affine)
    # 3 mm is 3 voxels at 1 mm but one voxel at 3 mm: the coarse grid keeps the peak sharper.
    assert out_coarse[0, 20, 16, 6] > 3 * out_fine[0, 20, 16, 6]
    # An explicit pixdim overrides the MetaTensor's.
    forced = SmoothProbabilityd("p", sigma_mm=3.0, pixdim=(1.0, 1.0, 2.5))({"p": coarse})["p"]
    assert torch.allclose(forced, out_fine)


@pytest.fixture(scope="module")
def step_case(lungs):
    """A step truth (0.1 outside, 0.9 in the lungs), a blurry noisy map of it and a sharp CT guide in [0, 1]."""
    rng = np.random.default_rng(3)
    step = 0.8 * lungs[None].astype(np.float32) + 0.1
    blurry = SmoothProbability("gaussian", sigma_mm=1.0)(step) + rng.normal(0, 0.15, step.shape)
    guide = np.where(lungs, 0.15, 0.7) + rng.normal(0, 0.01, SHAPE)  # dark lung, bright tissue
    return step, np.clip(blurry, 0, 1).astype(np.float32), guide.astype(np.float32)


def test_guided_filter_follows_the_guide_edge_better_than_gaussian(lungs, step_case):
    step, blurry, guide = step_case
    gauss = SmoothProbability("gaussian", sigma_mm=2.0)(blurry)
    guided = SmoothProbability("guided", sigma_mm=2.0, guided_eps=1e-3)(blurry, guide=guide[None])
    assert guided.dtype == np.float32 and guided.min() >= 0.0 and guided.max() <= 1.0
    err_gauss, err_guided = np.abs(gauss - step).mean(), np.abs(guided - step).mean()
    assert err_guided < 0.6 * err_gauss  # measured: about 0.06 vs 0.10
    # The 0.5 level follows the lung edge almost exactly; the Gaussian's rounds it off.
    assert ((guided[0] > 0.5) == lungs).mean() > 0.999 > ((gauss[0] > 0.5) == lungs).mean()
    # Dictionary twin: the guide comes from guide_key, (X, Y, Z) guides work too.
    d = SmoothProbabilityd("p", guide_key="ct", method="guided", sigma_mm=2.0)(
        {"p": torch.from_numpy(blurry), "ct": guide}
    )
    assert isinstance(d["p"], torch.Tensor) and np.allclose(d["p"].numpy(), guided, atol=1e-6)
    with pytest.raises(ValueError, match="guide"):
        SmoothProbability("guided")(blurry)
    with pytest.raises(ValueError, match="guide_key"):
        SmoothProbabilityd("p", method="guided")


def test_bilateral_keeps_the_edge_sharper_than_gaussian(step_case):
    step, _, _ = step_case
    noisy_step = np.clip(step + np.random.default_rng(4).normal(0, 0.03, step.shape), 0, 1).astype(np.float32)
    gauss = SmoothProbability("gaussian", sigma_mm=2.0)(noisy_step)
    bilateral = SmoothProbability("bilateral", sigma_mm=2.0, sigma_color=0.1)(noisy_step)
    assert bilateral.dtype == np.float32 and np.isfinite(bilateral).all()
    assert np.abs(bilateral - step).mean() < 0.5 * np.abs(gauss - step).mean()
    assert np.abs(bilateral - step).mean() < np.abs(noisy_step - step).mean()  # and it does denoise


def test_smoothing_never_outputs_nan():
    vol = np.random.default_rng(5).uniform(0, 1, (2,) + SHAPE).astype(np.float32)
    vol[0, 3, 3, 3], vol[1, 5, 5, 5] = np.nan, np.inf
    guide = np.random.default_rng(6).uniform(0, 1, SHAPE).astype(np.float32)
    guide[1, 1, 1] = np.nan
    for method in ("none", "gaussian", "bilateral", "guided"):
        out = SmoothProbability(method, sigma_mm=2.0)(vol, guide=guide)
        assert np.isfinite(out).all() and out.dtype == np.float32, method


# ---------------------------------------------------------------- thresholding


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_every_threshold_recovers_the_blobs(method, lungs, bimodal):
    # Otsu's thresholds decide on their own above a low floor; global and adaptive cut at 0.5.
    tau = 0.2 if "otsu" in method else 0.5
    t = ThresholdProbability(method, tau=tau, offset=0.05, block_mm=9.0)
    mask = t(bimodal)
    assert mask.dtype == np.uint8 and mask.shape == (1,) + SHAPE and set(np.unique(mask)) <= {0, 1}
    assert dice_score(mask[0], lungs) > 0.95
    assert isinstance(t.last_threshold, float) and 0.15 < t.last_threshold < 0.85
    d = ThresholdProbabilityd("prob", method=method, tau=tau, offset=0.05, block_mm=9.0)({"prob": bimodal})
    assert np.array_equal(d["lung_mask"], mask)
    assert d["lung_mask_threshold"] == pytest.approx(t.last_threshold)
    assert d["lung_mask_threshold_method"] == method


def test_threshold_values_are_the_documented_ones(bimodal):
    from skimage.filters import threshold_otsu

    t = ThresholdProbability("otsu", tau=0.0)
    t(bimodal)
    assert t.last_threshold == pytest.approx(threshold_otsu(bimodal[0]))
    g = ThresholdProbability("global", tau=0.7)
    assert g(bimodal).sum() == int((bimodal >= 0.7).sum()) and g.last_threshold == 0.7


def test_threshold_dict_twin_picks_the_channel_and_keeps_metatensor(lungs, bimodal):
    maps = MetaTensor(
        torch.from_numpy(np.concatenate([1.0 - bimodal, bimodal])),
        affine=torch.diag(torch.tensor([2.0, 2.0, 5.0, 1.0])),
    )
    d = ThresholdProbabilityd("prob", channel=1, mask_key="lung", method="otsu", tau=0.0)({"prob": maps})
    assert (
        isinstance(d["lung"], MetaTensor) and d["lung"].dtype == torch.uint8 and tuple(d["lung"].shape) == (1,) + SHAPE
    )
    assert torch.equal(d["lung"].affine, maps.affine)
    assert dice_score(d["lung"][0].numpy(), lungs) > 0.95
    assert isinstance(d["lung_threshold"], float) and d["lung_threshold_method"] == "otsu"


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_flat_or_low_maps_give_empty_masks(method):
    t = ThresholdProbability(method, tau=0.5, offset=0.05)
    assert t(np.zeros(SHAPE, np.float32)).sum() == 0  # all zero, (X, Y, Z) input
    assert t(torch.full((1,) + SHAPE, 0.9)).sum() == 0  # no variation: nothing to tell lung from
    low = np.random.default_rng(7).uniform(0.0, 0.3, (1,) + SHAPE).astype(np.float32)
    assert t(low).sum() == 0  # everything below tau
    nan = np.full(SHAPE, np.nan, np.float32)
    mask = t(nan)
    assert mask.sum() == 0 and np.isfinite(t.last_threshold)


# ---------------------------------------------------------------- mask clean-up and sides


@pytest.fixture(scope="module")
def dirty_mask(lungs):
    mask = lungs.copy()
    mask[11, 16, 3:8] = False  # a hole (a vessel) inside the smaller lung
    mask[11, 16, 5] = False
    mask[2:4, 2:4, 2:4] = True  # an 8-voxel island (0.008 mL at 1 mm)
    third = ellipsoid((20, 29, 5.5), (3, 2, 3))  # a third, smaller component apart from both lungs
    mask |= third & ~lungs
    return mask, third & ~lungs


def test_cleanup_drops_island_fills_hole_keeps_two_largest(lungs, dirty_mask):
    mask, third = dirty_mask
    assert mask.sum() != lungs.sum()
    clean = LungMaskCleanup(max_components=2, min_component_ml=0.05)(mask[None].astype(np.uint8))
    assert clean.dtype == np.uint8 and clean.shape == (1,) + SHAPE
    assert np.array_equal(clean[0].astype(bool), lungs)  # island and third gone, hole filled
    keep3 = LungMaskCleanup(max_components=3, min_component_ml=0.05)(mask)
    assert np.array_equal(keep3[0].astype(bool), lungs | third)  # the island is still under min size
    # Minimum size is in mL: at 2 x 2 x 2 mm each voxel is 0.008 mL, so the island (0.064 mL) passes.
    big_voxels = LungMaskCleanup(max_components=None, min_component_ml=0.05, pixdim=(2, 2, 2))(mask)
    assert big_voxels[0, 2, 2, 2] == 1


def _clean_and_split(d: dict, key: str, affine=None, sides_key: str = "lung_sides", **cleanup) -> dict:
    d = LungMaskCleanupd(key, affine=affine, **cleanup)(d)
    return SplitLungSidesd(key, sides_key=sides_key, affine=affine)(d)


def test_clean_mask_splits_into_right_and_left(lungs, dirty_mask):
    mask, _ = dirty_mask
    d = _clean_and_split({"lung_mask": mask[None].astype(np.uint8)}, "lung_mask", np.eye(4), min_component_ml=0.05)
    sides = d["lung_sides"]
    assert sides.dtype == np.uint8 and sides.shape == (1,) + SHAPE
    right_truth, left_truth = lungs & (np.arange(40)[:, None, None] >= 20), lungs & (np.arange(40)[:, None, None] < 20)
    # Identity affine: RAS x is the first index, so the component at larger x is the right lung.
    assert np.array_equal(sides[0] == RIGHT_LUNG, right_truth) and np.array_equal(sides[0] == LEFT_LUNG, left_truth)
    ml = d["lung_sides_ml"]
    assert ml["right"] == pytest.approx(right_truth.sum() / 1000.0) and ml["left"] == pytest.approx(
        left_truth.sum() / 1000.0
    )
    assert ml["total"] == pytest.approx(ml["right"] + ml["left"]) and ml["right"] > ml["left"]
    # A flipped x axis (LPS-like, x = -index) swaps the sides.
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped = _clean_and_split({"lung_mask": mask[None]}, "lung_mask", flip, min_component_ml=0.05)["lung_sides"]
    assert np.array_equal(flipped[0] == RIGHT_LUNG, left_truth)
    # the array transform gives the same sides as its twin
    clean = LungMaskCleanup(min_component_ml=0.05)(mask[None].astype(np.uint8))
    assert np.array_equal(SplitLungSides(affine=np.eye(4))(clean), sides)


def test_clean_up_and_split_read_metatensor_affine_and_spacing(lungs):
    affine = torch.tensor([[2.0, 0, 0, -40], [0, 2.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    img = MetaTensor(torch.from_numpy(lungs[None].astype(np.float32)), affine=affine)
    d = _clean_and_split({"m": img}, "m", np.diag([-1.0, 1, 1, 1]), sides_key="sides")  # MetaTensor's affine wins
    assert isinstance(d["m"], MetaTensor) and d["m"].dtype == torch.uint8 and torch.equal(d["m"].affine, affine)
    assert isinstance(d["sides"], MetaTensor) and d["sides"].dtype == torch.uint8
    assert int(d["sides"][0, 30, 16, 5]) == RIGHT_LUNG and int(d["sides"][0, 10, 16, 5]) == LEFT_LUNG
    assert d["sides_ml"]["total"] == pytest.approx(lungs.sum() * 12.0 / 1000.0)  # 2 x 2 x 3 mm voxels


def test_refine_boundary_moves_the_surface_onto_the_air_edge_by_at_most_the_band():
    """A mask drawn 2 voxels inside the pleura on one side and 2 voxels out into the chest wall on the other ends on
    the -400 HU edge; an airway beyond the band, a vessel deep inside and a lung cut by the image border stay as
    they were."""
    centre = (20, 16, 6)
    lung = ellipsoid(centre, (14, 12, 9))
    hu = np.where(lung, -850.0, 40.0).astype(np.float32)
    vessel = ellipsoid(centre, (1.5, 1.5, 2))
    hu[vessel] = 40.0  # deep inside: the mask keeps it
    hu[20, 31, :] = -1000.0  # an airway 3 voxels beyond the lung's edge (y = 28)
    inner, outer = ellipsoid(centre, (12, 10, 7)), ellipsoid(centre, (16, 14, 11))
    drawn = np.where(np.arange(40)[:, None, None] < 20, inner, outer)  # 2 voxels inside where x < 20, 2 out elsewhere
    drawn[:, 24:] = inner[:, 24:]  # and 2 inside towards the airway: 5 voxels from it
    assert dice_score(drawn, lung) < 0.95
    refined = RefineLungBoundary(band_mm=3.0)(drawn[None].astype(np.uint8), hu)[0].astype(bool)
    assert np.array_equal(refined, lung)  # the vessel kept, the airway left out
    # A 1 mm band moves the edge by one voxel only; 0 leaves the mask alone.
    one = RefineLungBoundary(band_mm=1.0)(drawn, hu)[0].astype(bool)
    assert dice_score(drawn, lung) < dice_score(one, lung) < 1.0
    assert np.array_equal(RefineLungBoundary(band_mm=0.0)(drawn, hu)[0].astype(bool), drawn)
    # The band is in mm: at 0.5 mm voxels 3 mm reaches 6 voxels, so the airway's middle joins.
    fine = RefineLungBoundaryd("m", image_key="hu", pixdim=(0.5, 0.5, 0.5))({"m": drawn[None], "hu": hu[None]})["m"][0]
    assert fine[20, 31, 6] == 1 and refined[20, 31, 6] == 0
    # The image border is no surface: where a crop cuts the lung, a vessel on the cut stays in the mask.
    cut, hu_cut = lung[20:].copy(), hu[20:].copy()
    hu_cut[0, 16, 4:9], hu_cut[0, 31, :] = 40.0, 40.0  # a vessel on the cut; no airway this time
    kept = RefineLungBoundary(band_mm=3.0)(cut, hu_cut)[0].astype(bool)
    assert kept[0, 16, 4:9].all() and np.array_equal(kept, cut)
    with pytest.raises(ValueError, match="band_mm"):
        RefineLungBoundary(band_mm=-1.0)


def test_empty_mask_stays_empty_with_zero_volumes():
    d = _clean_and_split({"lung_mask": torch.zeros((1,) + SHAPE, dtype=torch.uint8)}, "lung_mask")
    assert isinstance(d["lung_mask"], torch.Tensor) and int(d["lung_mask"].sum()) == 0
    assert int(d["lung_sides"].sum()) == 0 and d["lung_sides"].dtype == torch.uint8
    assert d["lung_sides_ml"] == {"right": 0.0, "left": 0.0, "total": 0.0}


def test_full_chain_on_metatensor(lungs):
    """Similarity maps -> probability -> smooth -> threshold -> clean-up, MetaTensor all the way."""
    rng = np.random.default_rng(8)
    lung_sim = np.where(lungs, 0.3, 0.1) + rng.normal(0, 0.05, SHAPE)
    sims = np.stack([lung_sim, 0.4 - lung_sim]).astype(np.float32)  # lung vs "other"
    sims[0, 0, 0, 0] = np.nan
    img = MetaTensor(torch.from_numpy(sims), affine=torch.eye(4))
    d = SimilarityToProbabilityd("p", method="softmax", scale=14.3)({"p": img})
    d = SmoothProbabilityd("p", sigma_mm=1.5)(d)
    d = ThresholdProbabilityd("p", channel=0, method="global", tau=0.5)(d)
    d = _clean_and_split(d, "lung_mask", min_component_ml=0.05)
    assert isinstance(d["p"], MetaTensor) and d["p"].dtype == torch.float32 and torch.isfinite(d["p"]).all()
    assert isinstance(d["lung_mask"], MetaTensor) and dice_score(d["lung_mask"][0].numpy(), lungs) > 0.9
    assert d["lung_sides_ml"]["right"] > d["lung_sides_ml"]["left"] > 0


def test_in_place_work_never_touches_the_callers_map():
    """Softmax, sigmoid and the guided filter work in place on their own copy (memory on whole scans):
    the input stays as it was, and softmax still equals torch's."""
    from common.transforms.probability import SimilarityToProbability, SmoothProbability

    torch.manual_seed(0)
    sim = torch.rand(5, 16, 16, 3) * 2 - 1
    before = sim.clone()
    prob = SimilarityToProbability("softmax", scale=20.0)(sim)
    assert torch.equal(sim, before)
    assert torch.allclose(torch.as_tensor(prob), torch.softmax(before * 20.0, dim=0), atol=1e-6)
    SimilarityToProbability("sigmoid")(sim)
    assert torch.equal(sim, before)
    p = torch.rand(5, 16, 16, 3)
    p_before = p.clone()
    out = SmoothProbability("guided", sigma_mm=2.0, pixdim=(1.0, 1.0, 1.0))(p, guide=torch.rand(1, 16, 16, 3))
    assert torch.equal(p, p_before) and not torch.equal(torch.as_tensor(out), p_before)


def test_class_label_map_takes_the_lung_from_its_mask_and_the_rest_by_argmax_above_threshold():
    from common.transforms import ClassLabelMap, ClassLabelMapd

    prob = np.zeros((5, 4, 3, 2), dtype=np.float32)
    prob[0] = 0.9  # raw lung channel high everywhere: ignored
    prob[1, 0] = 0.8  # heart wins in row 0
    prob[2, 1] = 0.7  # vessel wins in row 1 ...
    prob[4, 1, 0] = 0.75  # ... except where bone is higher
    prob[3, 2] = 0.4  # airway below the threshold: background
    lung = np.zeros((1, 4, 3, 2), dtype=np.uint8)
    lung[0, 0, 0, 0] = lung[0, 3] = 1  # the mask overrides heart at one voxel
    out = ClassLabelMap(threshold=0.5)(prob, lung)
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3, 2)
    expected = np.zeros((4, 3, 2), dtype=np.uint8)
    expected[0], expected[1], expected[1, 0] = 2, 3, 5
    expected[0, 0, 0], expected[3] = 1, 1
    np.testing.assert_array_equal(out[0], expected)
    assert not (out[0][2] > 0).any()
    t = ClassLabelMapd("pred", label_key="label_map")(
        {"pred": torch.as_tensor(prob), "lung_mask": torch.as_tensor(lung)}
    )
    assert isinstance(t["label_map"], torch.Tensor) and torch.equal(t["label_map"][0], torch.as_tensor(expected))
    assert t["pred"].shape == (5, 4, 3, 2)
    with pytest.raises(ValueError, match="lung mask shape"):
        ClassLabelMap()(prob, lung[:, :2])


def test_guided_filter_in_threads_equals_plane_by_plane(rng):
    """The guided filter runs its slices in threads and computes the guide's statistics once per slice: the result
    is the plane-by-plane filter's, bit for bit."""
    from common.transforms.probability import _guided_filter

    prob = rng.random((3, 20, 18, 7)).astype(np.float32)
    guide = rng.random((20, 18, 7)).astype(np.float32)
    out = SmoothProbability("guided", sigma_mm=2.0, pixdim=(1.0, 1.0, 1.0), guided_eps=1e-3)(prob, guide=guide)
    size = (2 * int(round(np.sqrt(3.0) * 2.0)) + 1,) * 2
    expected = np.stack(
        [
            np.stack(
                [
                    _guided_filter(prob[c, :, :, k].astype(np.float64), guide[:, :, k].astype(np.float64), size, 1e-3)
                    for k in range(7)
                ],
                axis=-1,
            )
            for c in range(3)
        ]
    ).astype(np.float32)
    assert np.array_equal(np.asarray(out), np.clip(expected, 0.0, 1.0))
