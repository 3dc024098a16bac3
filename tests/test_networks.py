"""SAM-family and text-encoder loaders: errors that name the file, preprocessing, and the real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.networks import TextEncoder, litemedsam_checkpoint, load_sam_family


@pytest.fixture(scope="module")
def tiny_lite():
    return load_sam_family("litemedsam", random_init=True)


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "medsam_vit_b.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_sam_family("medsam_vit_b", checkpoint=missing)
    with pytest.raises(FileNotFoundError, match="sam_vit_b needs a checkpoint"):
        load_sam_family("sam_vit_b")
    with pytest.raises(ValueError, match="unknown SAM-family variant"):
        load_sam_family("sam_vit_x")


def test_checkpoint_of_another_architecture_is_rejected():
    with pytest.raises(ValueError) as err:
        load_sam_family("sam_vit_b", checkpoint=litemedsam_checkpoint())
    msg = str(err.value)
    assert "lite_medsam.pth" in msg and "does not match the sam_vit_b architecture" in msg
    assert "image_encoder." in msg


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth: cannot be read"):
        load_sam_family("litemedsam", checkpoint=bad)


def test_preprocess_keeps_aspect_and_pads(tiny_lite):
    slices = torch.zeros(2, 300, 400)
    slices[:, :, :200] = 1.0
    x = tiny_lite.preprocess(slices)
    assert x.shape == (2, 3, 256, 256)
    assert tiny_lite.resized_hw((300, 400)) == (192, 256)
    assert torch.all(x[:, :, 192:, :] == 0)  # padding below the resized slice
    assert float(x.max()) == pytest.approx(1.0) and float(x.min()) == 0.0  # per-image min-max


def test_box_mapping_round_trip(tiny_lite):
    boxes = np.array([[40.0, 30.0, 200.0, 150.0]])
    mapped = tiny_lite.box_to_input(boxes, (300, 400))
    assert torch.allclose(mapped, torch.tensor([[25.6, 19.2, 128.0, 96.0]]), atol=0.2)


def test_segment_boxes_shapes(tiny_lite):
    masks, iou = tiny_lite.segment_boxes(np.random.default_rng(0).random((2, 64, 80), dtype=np.float32), [[5, 5, 40, 30], [10, 10, 60, 50]])
    assert masks.shape == (2, 64, 80) and masks.dtype == bool and iou.shape == (2,)
    with pytest.raises(ValueError, match="one box per slice"):
        tiny_lite.segment_boxes(np.zeros((2, 64, 64), np.float32), [[0, 0, 10, 10]])


def test_sam_vit_b_preprocessing_uses_pixel_statistics():
    sam = load_sam_family("sam_vit_b", random_init=True)
    assert sam.image_size == 1024 and sam.embedding_shape == (256, 64, 64)
    x = sam.preprocess(torch.full((1, 32, 32), 0.5))
    expected = (0.5 * 255 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-4)


@pytest.mark.real
def test_litemedsam_segments_a_real_lung_from_a_box():
    """The shipped LiteMedSAM, one box around the right lung on a real LIDC slice."""
    from common.io import read_ct
    from common.lungmask import hu_threshold_lung_mask, split_left_right
    from common.metrics import dice_score
    from common.report import axial_display
    from common.transforms import HUWindow
    from conftest import LIDC_DIR

    vol = read_ct(LIDC_DIR)
    k = 70
    right, _ = split_left_right(hu_threshold_lung_mask(vol.hu[:, :, k - 2 : k + 3], vol.spacing), vol.affine)
    reference = axial_display(right[:, :, 2])  # rows = j, columns = i
    image = axial_display(HUWindow()(torch.from_numpy(vol.hu[:, :, k])).numpy())
    rows, cols = np.nonzero(reference)
    box = [cols.min() - 5, rows.min() - 5, cols.max() + 5, rows.max() + 5]
    model = load_sam_family("litemedsam")
    masks, iou = model.segment_boxes(image[None], [box])
    dice = dice_score(masks[0], reference)
    assert dice >= 0.9, f"LiteMedSAM lung Dice {dice:.3f}"
    assert iou[0] > 0.8


def _tiny_bert_dir(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "lung", "heart", "bone", "left", "right", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37))
    out = tmp_path / "tiny_bert"
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return out


def test_text_encoder_any_model_dir_mean_pools(tmp_path):
    enc = TextEncoder(_tiny_bert_dir(tmp_path)).eval()
    assert enc.hidden_size == 32
    with torch.no_grad():
        out = enc(["left lung", "heart", "right lungs bone"])
        # Mean pooling ignores padding: a text alone gives the same vector as in a padded batch.
        alone = enc(["heart"])
    assert out.shape == (3, 32)
    assert torch.allclose(out[1], alone[0], atol=1e-5)


def test_text_encoder_bad_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        TextEncoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a usable transformers model directory"):
        TextEncoder(tmp_path / "empty")


@pytest.mark.real
def test_real_minilm_text_encoder():
    enc = TextEncoder().eval()
    with torch.no_grad():
        e = torch.nn.functional.normalize(enc(["left lung", "lung", "femur bone", "pulmonary parenchyma"]), dim=-1)
    assert e.shape == (4, 384)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # "left lung" is nearer "lung" than "femur bone"
