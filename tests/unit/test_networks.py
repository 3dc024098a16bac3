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


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    lite_state = torch.load(litemedsam_checkpoint(), map_location="cpu", weights_only=True)
    wrong = tmp_path / "not_sam_vit_b.pth"
    torch.save(lite_state, wrong)
    with pytest.raises(ValueError) as err:
        load_sam_family("sam_vit_b", checkpoint=wrong)
    msg = str(err.value)
    assert "not_sam_vit_b.pth" in msg and "does not match the sam_vit_b architecture" in msg
    assert "image_encoder." in msg  # names some of the offending keys
    # The decoder of LiteMedSAM and SAM is the same: a partial match still is an error, not a partial load.
    assert "missing key" in msg and "unexpected key" in msg


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
    boxes = np.array([[40.0, 30.0, 200.0, 150.0], [0.0, 0.0, 400.0, 300.0]])
    mapped = tiny_lite.box_to_input(boxes, (300, 400))
    # Longest side 400 -> 256 (scale 0.64), the 300 rows -> 192: the whole slice fills [0, 256] x [0, 192].
    assert torch.allclose(mapped, torch.tensor([[25.6, 19.2, 128.0, 96.0], [0.0, 0.0, 256.0, 192.0]]), atol=0.2)
    assert torch.allclose(
        tiny_lite.box_from_input(mapped, (300, 400)), torch.as_tensor(boxes, dtype=torch.float32), atol=0.5
    )


def test_box_mapping_matches_segment_anything():
    """SAM's boxes go through segment_anything's own ResizeLongestSide; MedSAM stretches to the square."""
    from segment_anything.utils.transforms import ResizeLongestSide

    sam = load_sam_family("sam_vit_b", random_init=True)
    boxes = np.array([[12.0, 7.0, 250.0, 180.0]])
    expected = ResizeLongestSide(1024).apply_boxes(boxes, (200, 300))
    assert np.allclose(sam.box_to_input(boxes, (200, 300)).numpy(), expected, atol=1e-3)
    medsam = load_sam_family("medsam_vit_b", random_init=True)
    assert np.allclose(medsam.box_to_input(boxes, (200, 300)).numpy(), boxes / [300, 200, 300, 200] * 1024, atol=1e-3)
    assert torch.allclose(
        medsam.box_from_input(medsam.box_to_input(boxes, (200, 300)), (200, 300)),
        torch.as_tensor(boxes, dtype=torch.float32),
        atol=1e-3,
    )


def test_cpu_encoding_one_slice_at_a_time_gives_the_batch_embeddings(tiny_lite):
    """On the CPU ``encode`` runs slice by slice (faster there): the embeddings are the whole batch's."""
    slices = torch.rand(3, 1, 48, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = tiny_lite.image_encoder(tiny_lite.preprocess(slices))
        one_by_one = tiny_lite.encode(slices)
        from_numpy = tiny_lite.encode(slices[:, 0].numpy())  # (B, H, W) arrays too
    assert one_by_one.shape == batched.shape == (3, *tiny_lite.embedding_shape)
    torch.testing.assert_close(one_by_one, batched, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_numpy, batched, rtol=1e-5, atol=1e-5)


def test_encoder_batch_is_one_on_the_cpu_and_the_gpu_batch_on_cuda():
    from common.networks.sam_family import encoder_batch

    assert encoder_batch("cpu", 16) == 1 and encoder_batch(torch.device("cpu")) == 1
    assert encoder_batch("cuda:0", 16) == 16 and encoder_batch("cuda", 0) == 1


def test_image_encoder_weights_are_channels_last_with_the_nchw_embeddings(tiny_lite):
    """NHWC conv weights (faster on the CPU): the same embeddings as NCHW ones, and loading weights keeps NHWC."""
    convs = [m.weight for m in tiny_lite.image_encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    slices = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        nhwc = tiny_lite.encode(slices)
        tiny_lite.image_encoder.to(memory_format=torch.contiguous_format)
        nchw = tiny_lite.encode(slices)
        tiny_lite.image_encoder.to(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-5, atol=1e-5)
    tiny_lite.image_encoder.load_state_dict(tiny_lite.image_encoder.state_dict())
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_segment_boxes_shapes(tiny_lite):
    masks, iou = tiny_lite.segment_boxes(
        np.random.default_rng(0).random((2, 64, 80), dtype=np.float32), [[5, 5, 40, 30], [10, 10, 60, 50]]
    )
    assert masks.shape == (2, 64, 80) and masks.dtype == bool and iou.shape == (2,)
    with pytest.raises(ValueError, match="one box per slice"):
        tiny_lite.segment_boxes(np.zeros((2, 64, 64), np.float32), [[0, 0, 10, 10]])


def test_sam_vit_b_preprocessing_matches_segment_anything():
    """0..255, resize longest side, SAM's mean/std, zero padding: the same tensor Sam.preprocess gives."""
    from segment_anything.utils.transforms import ResizeLongestSide

    sam = load_sam_family("sam_vit_b", random_init=True)
    assert sam.image_size == 1024 and sam.embedding_shape == (256, 64, 64)
    x = sam.preprocess(torch.full((1, 32, 32), 0.5))
    expected = (0.5 * 255 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-4)

    # segment_anything's reference path (SamPredictor.set_image): uint8 HWC -> apply_image (PIL resize)
    # -> Sam.preprocess (normalise, pad). Its apply_image_torch is not used: in segment-anything 1.0
    # it reads the target size from (B, C) instead of (H, W).
    yy, xx = np.mgrid[0:120, 0:90]
    slice01 = (0.5 + 0.4 * np.sin(yy / 17.0) * np.cos(xx / 11.0)).astype(np.float32)
    ours = sam.preprocess(torch.from_numpy(slice01)[None])
    rgb = np.repeat(np.round(slice01 * 255).astype(np.uint8)[..., None], 3, axis=-1)
    resized = torch.from_numpy(ResizeLongestSide(1024).apply_image(rgb)).permute(2, 0, 1)[None].float()
    assert tuple(resized.shape[-2:]) == sam.resized_hw((120, 90)) == (1024, 768)
    reference = torch.nn.functional.pad((resized - sam.pixel_mean) / sam.pixel_std, (0, 1024 - 768, 0, 0))
    assert ours.shape == reference.shape == (1, 3, 1024, 1024)
    assert torch.all(ours[..., 768:] == 0) and torch.all(reference[..., 768:] == 0)  # padding after normalising
    assert float((ours - reference).abs().mean()) < 0.02  # uint8 rounding and PIL vs torch bilinear only


def test_medsam_preprocessing_stretches_and_min_max_normalises():
    medsam = load_sam_family("medsam_vit_b", random_init=True)
    slices = 0.2 + 0.5 * torch.rand(1, 100, 160, generator=torch.Generator().manual_seed(1))  # values in [0.2, 0.7]
    x = medsam.preprocess(slices)
    assert x.shape == (1, 3, 1024, 1024)  # no padding: MedSAM resizes to the square
    assert float(x.min()) == pytest.approx(0.0, abs=1e-6) and float(x.max()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


@pytest.mark.real
def test_litemedsam_segments_a_real_lung_from_a_box():
    """The shipped LiteMedSAM, one box around the right lung on a real LIDC slice (measured Dice 0.97)."""
    from common.io import read_ct
    from common.lungmask import hu_threshold_lung_mask, split_left_right
    from common.metrics import dice_score
    from common.report import axial_display
    from common.transforms import HUWindow
    from tests.conftest import LIDC_DIR

    vol = read_ct(LIDC_DIR, axcodes="LPS")  # axial_display: patient right on the image left
    k = vol.hu.shape[2] // 2
    right, left = split_left_right(hu_threshold_lung_mask(vol.hu[:, :, k - 2 : k + 3], vol.spacing), vol.affine)
    right_lung, left_lung = axial_display(right[:, :, 2]), axial_display(left[:, :, 2])
    hu = axial_display(vol.hu[:, :, k])
    image = axial_display(HUWindow((-1000, 400))(torch.from_numpy(vol.hu[:, :, k])).numpy())
    assert image.min() >= 0.0 and image.max() <= 1.0
    rows, cols = np.nonzero(right_lung)
    box = [cols.min() - 5, rows.min() - 5, cols.max() + 5, rows.max() + 5]

    model = load_sam_family("litemedsam")
    assert model.image_size == 256 and not model.training
    masks, iou = model.segment_boxes(image[None], [box])
    assert masks.shape == (1,) + hu.shape and masks.dtype == bool
    dice = dice_score(masks[0], right_lung)
    print(f"LiteMedSAM right-lung Dice {dice:.3f}, predicted IoU {iou[0]:.3f}")
    assert dice >= 0.9, f"LiteMedSAM lung Dice {dice:.3f}"
    assert dice_score(masks[0], left_lung) < 0.05  # the box, not the image, chose the lung
    assert iou[0] > 0.8


def _tiny_bert_dir(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "lung",
        "heart",
        "bone",
        "left",
        "right",
        "##s",
        "blood",
        "vessel",
        "airway",
        "ct",
        "patch",
        "of",
        "the",
        "air",
        "outside",
        "body",
        "soft",
        "tissue",
    ]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(tmp_path))  # the vocab_file constructor reads every word as [UNK]
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
        )
    )
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


def test_text_encoder_llama_family_without_pad_token(tmp_path):
    """A decoder-only model whose tokenizer has no pad token: eos pads, the mask keeps it out of the mean."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "lung", "heart", "left", "right", "bone"])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    assert tok.pad_token is None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    out = tmp_path / "tiny_llama"
    tok.save_pretrained(out)
    LlamaModel(config).save_pretrained(out)

    enc = TextEncoder(out).eval()
    assert enc.tokenizer.pad_token == "</s>" and enc.hidden_size == 32
    with torch.no_grad():
        batch = enc(["left lung bone", "heart"])
        alone = enc(["heart"])
    assert batch.shape == (2, 32) and torch.isfinite(batch).all()
    assert torch.allclose(batch[1], alone[0], atol=1e-5)


@pytest.mark.real
def test_real_minilm_text_encoder():
    enc = TextEncoder().eval()
    with torch.no_grad():
        e = torch.nn.functional.normalize(enc(["left lung", "lung", "femur bone", "pulmonary parenchyma"]), dim=-1)
    assert e.shape == (4, 384)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # "left lung" is nearer "lung" than "femur bone"
