"""Metrics: Dice through MONAI, and the image-text metrics of SA-1 on hand-made embeddings."""

import numpy as np
import pytest
import torch

from common.metrics import dice_score, embedding_cosine, retrieval_recall_at_k, zero_shot_accuracy


def test_dice_score():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert dice_score(a, b) == pytest.approx(0.5)
    assert dice_score(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice_score(a, b[:2])


def test_zero_shot_accuracy_by_argmax_cosine():
    classes = torch.eye(3)  # one prompt direction per class
    images = torch.tensor([[2.0, 0.1, 0.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.9], [0.0, 0.0, 3.0]])
    assert zero_shot_accuracy(images, classes, [0, 1, 2, 2]) == pytest.approx(0.75)  # image 2 is nearer class 0
    assert zero_shot_accuracy(images * 10, classes, [0, 1, 0, 2]) == 1.0  # scale does not matter
    with pytest.raises(ValueError):
        zero_shot_accuracy(images, classes, [0, 1])


def test_retrieval_recall_counts_identical_captions_as_hits():
    texts = ["lung", "heart", "lung"]
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01]])
    img = torch.tensor([[1.0, 0.02], [0.1, 1.0], [1.0, 0.0]])
    assert retrieval_recall_at_k(img, txt, texts, k=1) == 1.0
    img_wrong = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert retrieval_recall_at_k(img_wrong, txt, texts, k=1) == pytest.approx(1 / 3)
    assert retrieval_recall_at_k(img_wrong, txt, texts, k=3) == 1.0


def test_embedding_cosine():
    t = torch.randn(2, 4, 3, 3)
    assert embedding_cosine(t, t) == pytest.approx(1.0)
    assert embedding_cosine(t, -t) == pytest.approx(-1.0)


def test_iou_score_is_intersection_over_union():
    from common.metrics import dice_score, iou_score

    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:4] = True  # 40 pixels
    b[2:6] = True  # 40 pixels, 20 shared
    assert iou_score(a, b) == pytest.approx(20 / 60)
    assert dice_score(a, b) == pytest.approx(2 * 20 / 80)
    assert iou_score(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        iou_score(a, b[:5])


def test_structure_statistics_count_volume_hu_and_emphysema_per_label():
    from common.metrics import structure_statistics

    labels = np.zeros((4, 4, 2), np.uint8)
    labels[:2, :, 0] = 1  # 8 voxels of right lung
    labels[2:, :2, 0] = 2  # 4 voxels of left lung
    hu = np.full(labels.shape, 40.0, np.float32)
    hu[labels == 1] = -900.0
    hu[:2, :2, 0] = -980.0  # 4 of the right lung's 8 below -950
    hu[labels == 2] = -800.0
    affine = np.diag([2.0, 2.0, 5.0, 1.0])  # 20 mm^3 = 0.02 mL a voxel
    s = structure_statistics(labels, hu, affine, {1: "right lung", 2: "left lung", 3: "heart"})
    assert s["right lung"] == {
        "label": 1,
        "voxels": 8,
        "volume_ml": 0.2,
        "mean_hu": -940.0,
        "percent_below_950_hu": 50.0,
    }
    assert s["left lung"] == {"label": 2, "voxels": 4, "volume_ml": 0.1, "mean_hu": -800.0, "percent_below_950_hu": 0.0}
    assert s["heart"] == {"label": 3, "voxels": 0, "volume_ml": 0.0, "mean_hu": None}  # absent: listed, no HU
    assert s["lungs"] == {"voxels": 12, "volume_ml": 0.2, "mean_hu": -893.3, "percent_below_950_hu": 33.33}
    with pytest.raises(ValueError, match="differ in shape"):
        structure_statistics(labels, hu[..., :1], affine, {1: "right lung"})
