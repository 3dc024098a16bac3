"""CTRandAugment / CTRandAugmentd: deterministic teacher views, range and type, magnitude, dictionary twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.transforms import CTRandAugment, CTRandAugmentd
from common.transforms.augment import OPS, view_seed


@pytest.fixture
def slice_img() -> np.ndarray:
    """1x64x64 in [0, 1]: a gradient along j plus an off-centre disc, so no flip or shift is a no-op."""
    i, j = np.mgrid[:64, :64] / 63.0
    return (0.2 + 0.3 * j + 0.4 * ((i - 0.35) ** 2 + (j - 0.6) ** 2 < 0.05)).astype(np.float32)[None]


def test_view_seed_is_stable_across_processes():
    # sha256 of "case_001|slice_12|3": a salted hash() would change this number in every process
    assert view_seed("case_001|slice_12", 3) == 2164421235
    assert view_seed("a", 1) != view_seed("a", 2) != view_seed("b", 1)


def test_same_key_same_view_across_instances_and_calls(slice_img):
    a, b = CTRandAugment(n_ops=3, magnitude=0.8), CTRandAugment(n_ops=3, magnitude=0.8)
    b.set_random_state(123)
    first = a.view(slice_img, "case_7", 2)
    for _ in range(3):  # other calls in between move the instances' own RNG and must not matter
        a(slice_img), b(slice_img), a.view(slice_img, "case_8", 5)
    np.testing.assert_array_equal(first, a.view(slice_img, "case_7", 2))
    np.testing.assert_array_equal(first, b.view(slice_img, "case_7", 2))
    views = [a.view(slice_img, "case_7", v) for v in range(1, 6)] + [a.view(slice_img, "case_9", 2)]
    for k, v in enumerate(views):
        for w in views[k + 1 :]:
            assert not np.array_equal(v, w)
    np.testing.assert_array_equal(a.view(slice_img, "case_7", 0), slice_img)


def test_view_does_not_touch_own_rng_or_input(slice_img):
    a, b = CTRandAugment(), CTRandAugment()
    a.set_random_state(5), b.set_random_state(5)
    before = slice_img.copy()
    a.view(slice_img, "case_1", 3)
    np.testing.assert_array_equal(a(slice_img), b(slice_img))
    np.testing.assert_array_equal(slice_img, before)  # in-place MONAI ops (cutout) work on a copy


@pytest.mark.parametrize("magnitude", [0.3, 1.0])
def test_range_shape_dtype_and_type(slice_img, magnitude):
    aug = CTRandAugment(n_ops=3, magnitude=magnitude)
    for v in range(1, 9):
        out = aug.view(slice_img.astype(np.float64), f"s{v}", v)
        assert isinstance(out, np.ndarray) and out.shape == slice_img.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
    out_t = aug.view(torch.from_numpy(slice_img), "s1", 1)
    assert type(out_t) is torch.Tensor and out_t.dtype == torch.float32
    np.testing.assert_array_equal(out_t.numpy(), aug.view(slice_img, "s1", 1))
    clean = aug.view(np.full((1, 8, 8), 1.5), "s", 0)  # view 0: clipped float32 copy
    assert clean.dtype == np.float32 and clean.max() == 1.0


@pytest.mark.parametrize("op", list(OPS))
def test_magnitude_scales_every_op(slice_img, op):
    def mean_change(m):
        aug = CTRandAugment(n_ops=1, magnitude=m, ops=[op])
        return np.mean([np.abs(aug.view(slice_img, f"s{k}", 1) - slice_img).mean() for k in range(8)])

    zero, small, full = mean_change(0.0), mean_change(0.05), mean_change(1.0)
    assert zero < 1e-5, f"{op} at magnitude 0 changes the image by {zero}"
    assert full > 0.01, f"{op} at magnitude 1 barely changes the image ({full})"
    assert small < full / 3, f"{op}: magnitude 0.05 changes as much as 1 ({small} vs {full})"


def test_dict_views_cover_range_and_follow_random_state(slice_img):
    def draw(seed, n=60):
        t = CTRandAugmentd(
            keys="image", views=4, n_ops=1, magnitude=0.5, ops=["gamma"]
        )  # a cheap op: this test is about ids
        t.set_random_state(seed)
        outs = [t({"image": slice_img, "sample_id": "case_3"}) for _ in range(n)]
        return outs, [o["view_id"] for o in outs]

    outs, ids = draw(0)
    assert set(ids) == {0, 1, 2, 3} and all(type(v) is int for v in ids)
    assert draw(0)[1] == ids and draw(1)[1] != ids
    aug = CTRandAugment(n_ops=1, magnitude=0.5, ops=["gamma"])
    for o in outs[:8]:  # each image is exactly the cached-key view
        np.testing.assert_array_equal(o["image"], aug.view(slice_img, "case_3", o["view_id"]))


def test_dict_follows_set_determinism_through_monai_dataloader(slice_img):
    from monai.data import DataLoader, Dataset
    from monai.utils import set_determinism

    data = [{"image": slice_img, "sample_id": f"c{k}"} for k in range(16)]

    def ids():
        set_determinism(seed=7)
        loader = DataLoader(Dataset(data, CTRandAugmentd(keys="image", views=8)), batch_size=16, num_workers=0)
        return next(iter(loader))["view_id"].tolist()

    try:
        assert ids() == ids()
    finally:
        set_determinism(seed=None)


def test_dict_single_view_is_clean_and_missing_id_raises(slice_img):
    t = CTRandAugmentd(keys=["image", "teacher_image"], views=1, magnitude=1.0, id_key="case")
    for _ in range(10):
        d = t({"image": slice_img, "teacher_image": slice_img, "case": "x"})
        assert d["view_id"] == 0
        np.testing.assert_array_equal(d["image"], slice_img)
    with pytest.raises(KeyError, match="'case'"):
        t({"image": slice_img, "teacher_image": slice_img, "sample_id": "x"})
    d = CTRandAugmentd(keys=["image", "label"], allow_missing_keys=True)({"image": slice_img, "sample_id": "x"})
    assert "label" not in d


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_ops": 0}, "n_ops must be an integer between 1"),
        ({"n_ops": len(OPS) + 1}, "n_ops must be an integer between 1"),
        ({"n_ops": 3, "ops": ["rotate", "gamma"]}, r"between 1 and the number of ops \(2\)"),
        ({"n_ops": 1.5}, "n_ops must be an integer"),
        ({"magnitude": -0.1}, r"magnitude must be a number in \[0, 1\]"),
        ({"magnitude": 1.5}, r"magnitude must be a number in \[0, 1\]"),
        ({"ops": ["rotate", "solarize"]}, r"unknown augmentation op\(s\) \['solarize'\]; valid ops are \['rotate'"),
        ({"ops": []}, "non-empty"),
        ({"ops": ["gamma", "gamma"]}, "distinct"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CTRandAugment(**kwargs)


def test_bad_views_and_inputs(slice_img):
    with pytest.raises(ValueError, match="views must be an integer >= 1"):
        CTRandAugmentd(keys="image", views=0)
    with pytest.raises(ValueError, match="view_id must be a non-negative integer"):
        CTRandAugment().view(slice_img, "x", -1)
    with pytest.raises(ValueError, match=r"channel-first 2D slice \(C, H, W\)"):
        CTRandAugment().view(slice_img[0], "x", 1)


def test_reused_pipeline_gives_the_views_of_a_fresh_one_in_threads_and_after_pickling(slice_img):
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from monai.transforms import SomeOf

    aug = CTRandAugment(n_ops=3, magnitude=1.0)

    def fresh(key: str, view_id: int) -> np.ndarray:  # what every view was before pipelines were reused
        t = torch.from_numpy(slice_img.copy())
        pipeline = SomeOf([OPS[n](1.0, t.shape[1:]) for n in aug.ops], num_transforms=3, replace=False)
        out = pipeline.set_random_state(seed=view_seed(key, view_id))(t)
        return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)

    keys = [(f"case_{k}", 1 + k % 4) for k in range(40)]
    expected = [fresh(*k) for k in keys]
    for (key, v), e in zip(keys, expected):
        np.testing.assert_array_equal(aug.view(slice_img, key, v), e)
    with ThreadPoolExecutor(4) as pool:  # one pipeline per thread: no draw leaks between threads
        outs = list(pool.map(lambda kv: aug.view(slice_img, *kv), keys * 3))
    for out, e in zip(outs, expected * 3):
        np.testing.assert_array_equal(out, e)
    clone = pickle.loads(pickle.dumps(aug))  # a spawned DataLoader worker's copy
    assert "_local" not in clone.__dict__
    np.testing.assert_array_equal(clone.view(slice_img, *keys[0]), expected[0])
