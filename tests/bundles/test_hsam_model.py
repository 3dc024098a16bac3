"""SA-3b H-SAM the network: LoRA, two stages (Eq. 14), the prior in both directions of its attention, trained-tensors-only
checkpoints, the deep-supervision loss, CutMix / Mixup, and the frozen-encoder feature cache, on tiny random models."""

from __future__ import annotations


import pytest
import torch

from common.networks import load_network, read_checkpoint, release_checkpoint, save_network
from common.networks.hsam import build_hsam
from tests.bundles.hsam_helpers import BUNDLE, tiny


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_two_stages_come_out_on_the_decoder_grid_and_the_slice_grid(hw):
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, *hw))
        prob = model.probability(out)
    rh, rw = model.backbone.resized_hw(hw)  # the slice's part of the 64 px encoder input
    assert out["stage1"].shape == (2, 1, rh * 32 // 64, rw * 32 // 64)  # tiny_sam's decoder grid is 32 px
    assert out["stage2"].shape == (2, 1, *hw)
    assert prob.shape == (2, 1, *hw) and float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0


def test_eq14_blends_the_two_stages_with_alpha():
    model = tiny(alpha=0.25)
    out = {"stage1": torch.full((1, 1, 4, 4), 10.0), "stage2": torch.full((1, 1, 8, 8), -10.0)}
    assert torch.allclose(model.probability(out), torch.full((1, 1, 8, 8), 0.25), atol=1e-3)
    with pytest.raises(ValueError, match="alpha"):
        tiny(alpha=1.5)


def _cross_attention_inputs(seed: int = 0, dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    token = torch.randn(1, 1, dim, generator=g)
    image = torch.randn(1, dim, 4, 4, generator=g)
    image[..., 0, 1] = image[..., 0, 0]  # two image tokens with the same features and position encoding
    pos = torch.zeros(1, dim, 4, 4)
    return token, image, pos


def test_stage2_image_tokens_follow_the_prior_at_their_own_position():
    """Image-to-token: two image tokens with the same features (and position encoding) must come out
    different when stage 1 gave them different classes, and alike when it gave them the same one."""
    from common.networks.hsam import PriorGuidedCrossAttention

    torch.manual_seed(0)
    attn = PriorGuidedCrossAttention(dim=32, heads=2, mlp_dim=64).eval()
    token, image, pos = _cross_attention_inputs()
    prior = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(3))  # fg and bg prototypes differ
    prior[..., 0, 0], prior[..., 0, 1] = 0.95, 0.05
    with torch.no_grad():
        _, out = attn(token, image, pos, prior)
        same = prior.clone()
        same[..., 0, 1] = 0.95
        _, out_same = attn(token, image, pos, same)
    assert not torch.allclose(out[..., 0, 0], out[..., 0, 1], atol=1e-4)
    assert torch.allclose(out_same[..., 0, 0], out_same[..., 0, 1], atol=1e-5)


def test_stage2_uses_the_prior_in_both_directions():
    """Token-to-image off (its guide scale 0): the token no longer sees the prior, yet the image tokens
    still do (image-to-token); image side off: the image tokens change only through the token."""
    from common.networks.hsam import PriorGuidedCrossAttention

    torch.manual_seed(0)
    attn = PriorGuidedCrossAttention(dim=32, heads=2, mlp_dim=64).eval()
    token, image, pos = _cross_attention_inputs(1)
    p1, p2 = torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)
    with torch.no_grad():
        attn.prior_scale.zero_()
        attn.token_to_image["k"].weight.zero_()  # the token's attention over the image is now uniform: prior-free
        attn.token_to_image["k"].bias.zero_()
        t1, i1 = attn(token, image, pos, p1)
        t2, i2 = attn(token, image, pos, p2)
    assert torch.allclose(t1, t2, atol=1e-6)  # token side ignores the prior now
    assert not torch.allclose(i1, i2, atol=1e-4)  # the image side still uses it
    torch.manual_seed(0)
    full = PriorGuidedCrossAttention(dim=32, heads=2, mlp_dim=64).eval()
    with torch.no_grad():
        ta, _ = full(token, image, pos, p1)
        tb, _ = full(token, image, pos, p2)
    assert not torch.allclose(ta, tb, atol=1e-4)  # the token side uses it too


def test_stage2_output_depends_on_the_stage1_prior():
    model = tiny().eval()
    dec = model.stage2
    torch.manual_seed(0)
    tokens, pos, token = torch.randn(1, 32, 8, 8), torch.randn(1, 32, 8, 8), torch.randn(1, 1, 32)
    up = model.backbone.mask_decoder.output_upscaling
    skips = (torch.randn(1, up[0].out_channels, 16, 16), torch.randn(1, up[3].out_channels, 32, 32))
    with torch.no_grad():
        a, _ = dec(tokens, pos, token, torch.rand(1, 1, 8, 8), skips)
        b, _ = dec(tokens, pos, token, torch.rand(1, 1, 8, 8), skips)
    assert not torch.allclose(a, b, atol=1e-4)


def test_only_lora_and_decoders_train_and_the_counts_add_up():
    model = tiny(lora_rank=4)
    enc = model.backbone.image_encoder
    for name, p in enc.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    qkv = [m for n, m in enc.named_modules() if n.endswith("attn.qkv")]
    expected_lora = sum(4 * (m.in_features + m.out_features) for m in qkv)
    counts = model.parameter_counts()
    assert counts["lora"] == expected_lora > 0
    md = model.backbone.mask_decoder
    unused = {id(p) for p in [*md.iou_prediction_head.parameters(), *md.output_hypernetworks_mlps[1:].parameters()]}
    assert all(not p.requires_grad for p in md.parameters() if id(p) in unused)  # stage 1 is SAM's single-mask output
    assert counts["trainable"] == counts["lora"] + counts["stage2_decoder"] + sum(
        p.numel() for p in md.parameters() if id(p) not in unused
    )
    assert counts["trainable"] < counts["full_finetuning"]
    frozen = tiny(lora_rank=4, train_stage1_decoder=False).parameter_counts()
    assert frozen["trainable"] == frozen["lora"] + frozen["stage2_decoder"]


def test_lora_on_chosen_blocks_by_regex_and_the_optimizer_groups():
    model = tiny(lora_targets=[r"blocks\.1\..*qkv"])
    with_lora = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_" in n}
    assert with_lora == {"backbone.image_encoder.blocks.1.attn.qkv"}
    groups = model.parameter_groups(1e-3, pretrained_lr_scale=0.1)
    decoder = {id(p) for p in model.backbone.mask_decoder.parameters() if p.requires_grad}
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert {id(p) for p in groups[1]["params"]} == decoder and not decoder & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_lora_targets_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match="match no layer"):
        tiny(lora_targets=["not_a_layer"])


def test_training_step_changes_only_trainable_weights():
    model = tiny().train()
    assert not model.backbone.image_encoder.training  # frozen encoder stays in eval mode
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    from common.losses import DeepSupervisionLoss

    x, y = torch.rand(2, 1, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):  # LoRA's B starts at 0, so A moves from the second step on
        loss = DeepSupervisionLoss()(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if p.requires_grad:
            continue
        assert torch.equal(p, frozen[n]), n
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert (
        any("lora_A" in n for n in moved)
        and any("lora_B" in n for n in moved)
        and any(n.startswith("stage2.") for n in moved)
    )


def test_checkpoint_holds_only_trained_tensors_and_loads_back(tmp_path):
    model = tiny().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained-looking bypass, so a failed load would show
    path = save_network(model, tmp_path / "model.pt")
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["model"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("base_layer" in k for k in ckpt["model"])
    x = torch.rand(1, 1, 64, 64)
    torch.manual_seed(0)  # the frozen backbone is not in the checkpoint: rebuild the same random one
    loaded = load_network(path, random_init=True)
    with torch.no_grad():
        assert torch.allclose(model.probability(model(x)), loaded.probability(loaded(x)), atol=1e-5)


def test_for_inference_merges_lora_into_the_same_answer_and_refuses_to_train():
    from peft.tuners.lora import LoraLayer

    model = tiny().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a bypass that changes the answer, so an unmerged or lost one would show
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        before = model.probability(model(x))
        model.for_inference("float32")
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers and all(m.merged for m in layers) and model.compute_dtype is None
        assert torch.allclose(model.probability(model(x)), before, atol=1e-5)
        model.for_inference("float32")  # twice is once: a bypass is never added to its weight again
        assert torch.allclose(model.probability(model(x)), before, atol=1e-5)
        model.for_inference("bfloat16")  # computed in bfloat16, the logits and the answer in float32
        assert model.compute_dtype == torch.bfloat16
        low = model.probability(model(x))
        assert low.dtype == torch.float32 and (low - before).abs().max() < 0.1
    with pytest.raises(RuntimeError, match="merged for inference"):
        model.train()
    with pytest.raises(ValueError, match="precision must be float32, bfloat16 or auto"):
        model.for_inference("float16")


def test_checkpoint_for_another_backbone_or_lora_fails_clearly(tmp_path):
    path = save_network(tiny(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="trained on the tiny_sam backbone, not litemedsam"):
        load_network(path, variant="litemedsam")
    other = build_hsam("litemedsam", random_init=True)
    with pytest.raises(ValueError, match="trained on the tiny_sam backbone, this model is litemedsam"):
        other.restore(read_checkpoint(path), path)
    with pytest.raises(ValueError, match="LoRA set-up"):
        tiny(lora_rank=8).restore(read_checkpoint(path), path)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a network checkpoint of this project"):
        load_network(tmp_path / "other.pt", random_init=True)

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_network(tmp_path / "missing.pt")


def test_deep_supervision_scores_stage1_at_reduced_and_stage2_at_full_resolution():
    from common.losses import DeepSupervisionLoss, resize_label

    label = torch.zeros(1, 1, 64, 64)
    label[..., 16:48, 16:48] = 1
    right = {"stage1": (resize_label(label, (32, 32)) * 40 - 20), "stage2": label * 40 - 20}
    wrong = {"stage1": -right["stage1"], "stage2": -right["stage2"]}
    loss = DeepSupervisionLoss(stage_weights=(0.4, 0.6))
    assert float(loss(right, label)) < 0.25 < 1.0 < float(loss(wrong, label))  # the reduced label is soft at the border
    total = float(loss(wrong, label))  # the per-stage terms the trainer averages per epoch, before the stage weights
    assert set(loss.terms) == {"loss_stage1", "loss_stage2"} and not loss.terms["loss_stage2"].requires_grad
    assert total == pytest.approx(
        0.4 * float(loss.terms["loss_stage1"]) + 0.6 * float(loss.terms["loss_stage2"]), rel=1e-5
    )
    only2 = DeepSupervisionLoss(stage_weights=(0.0, 1.0))
    assert float(only2({"stage1": wrong["stage1"], "stage2": right["stage2"]}, label)) < 0.05  # stage 1 not scored
    assert set(only2.terms) == {"loss_stage2"}
    assert float(loss(label * 40 - 20, label)) < 0.05  # a plain network's logits are stage 2
    with pytest.raises(ValueError, match="stage_weights"):
        DeepSupervisionLoss(stage_weights=(0.0, 0.0))


def test_boundary_ignore_leaves_the_pseudo_labels_border_out_of_the_loss():
    from common.losses import DeepSupervisionLoss, boundary_band

    label = torch.zeros(1, 1, 64, 64)
    label[..., 16:48, 16:48] = 1
    band = boundary_band(label, 2)
    assert band[0, 0, 32, 14:19].tolist() == [1.0] * 4 + [0.0] and band[0, 0, 32, 45:50].tolist() == [0.0] + [1.0] * 4
    assert float(band[0, 0, 32, 32]) == 0.0 and float(band[0, 0, 2, 2]) == 0.0
    grown = torch.zeros_like(label)
    grown[..., 14:50, 14:50] = 1  # 2 px wider than the label all round: wrong only inside the band
    outputs = {"stage1": resize_label_logits(grown, 32), "stage2": grown * 40 - 20}
    assert float(DeepSupervisionLoss(boundary_ignore_px=2)(outputs, label)) < 0.02
    assert float(DeepSupervisionLoss()(outputs, label)) > 0.1
    far = torch.zeros_like(label)
    far[..., 24:40, 24:40] = 1  # wrong beyond the band: still penalised
    assert (
        float(
            DeepSupervisionLoss(boundary_ignore_px=2)(
                {"stage1": resize_label_logits(far, 32), "stage2": far * 40 - 20}, label
            )
        )
        > 0.3
    )
    with pytest.raises(ValueError, match="boundary_ignore_px"):
        DeepSupervisionLoss(boundary_ignore_px=-1)


def resize_label_logits(mask: torch.Tensor, size: int) -> torch.Tensor:
    from common.losses import resize_label

    return (resize_label(mask, (size, size)) >= 0.5).float() * 40 - 20


@pytest.mark.parametrize("kind", ["cutmix", "mixup"])
def test_cutmix_and_mixup_treat_image_and_label_alike(kind):
    from common.transforms import MixingBatch

    g = torch.Generator().manual_seed(0)
    label = (torch.rand(4, 1, 32, 32, generator=g) > 0.5).float()
    batch = {"image": label.clone(), "label": label.clone()}  # image == label, so any mismatch shows
    mixer = MixingBatch(
        cutmix_prob=1.0 if kind == "cutmix" else 0.0, mixup_prob=0.0 if kind == "cutmix" else 1.0, seed=1
    )
    image, mixed_label = mixer(batch)
    assert mixer.last == kind
    assert not torch.equal(image, label)  # something was mixed in
    assert torch.allclose(image, mixed_label)
    if kind == "cutmix":
        assert set(torch.unique(mixed_label).tolist()) <= {0.0, 1.0}  # pasted, not blended
    with pytest.raises(ValueError):
        MixingBatch(cutmix_prob=0.7, mixup_prob=0.5)


def test_cached_frozen_features_give_the_same_outputs_and_gradients_as_the_whole_encoder():
    torch.manual_seed(0)
    model = build_hsam("litemedsam", lora_targets=["layers\\.3\\..*qkv"], lora_rank=2).train()
    assert model.frozen_stages == 4  # patch embedding and stages 0-2 carry no LoRA
    x = torch.rand(1, 1, 96, 96)
    full = model(x)
    cached = model(x, encoder_features=model.frozen_features(x))
    for k in full:
        assert torch.allclose(full[k], cached[k], atol=1e-5)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n][0]
    g_full = torch.autograd.grad(full["stage2"].sum(), lora)[0]
    g_cached = torch.autograd.grad(cached["stage2"].sum(), lora)[0]
    assert torch.allclose(g_full, g_cached, atol=1e-4) and g_cached.abs().sum() > 0


def test_feature_cache_writes_each_view_once_and_serves_them_in_turn(tmp_path):
    from monai.transforms import Compose, RandGaussianNoised

    from common.data import CachedViewDataset, build_feature_cache

    model = tiny().train()
    slices = [
        {"image": torch.rand(1, 64, 64), "label": (torch.rand(1, 64, 64) > 0.5).float(), "case_id": "c", "slice": k}
        for k in range(3)
    ]
    aug = Compose([RandGaussianNoised(keys="image", prob=1.0, std=0.1)])
    entries = build_feature_cache(slices, model, aug, tmp_path, views=2, seed=0, progress=False)
    assert model.training  # put back as it was
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 6 and all(len(e["views"]) == 2 for e in entries)
    stamp = {f: f.stat().st_mtime_ns for f in files}
    again = build_feature_cache(
        slices, model, aug, tmp_path, views=2, seed=0, progress=False
    )  # a re-run reuses every file
    assert again == entries and {f: f.stat().st_mtime_ns for f in files} == stamp
    ds = CachedViewDataset(entries)
    v0 = ds[0]
    ds.set_epoch(1)
    v1 = ds[0]
    assert not torch.allclose(v0["image"], v1["image"])  # another augmentation view
    with torch.no_grad():
        feats = model.frozen_features(v1["image"][None])
    assert torch.allclose(feats[0], v1["features"], atol=2e-2)  # float16 on disk
    changed = [{**slices[0], "label": 1.0 - slices[0]["label"]}, *slices[1:]]  # a new pseudo label: new files
    assert (
        build_feature_cache(changed, model, aug, tmp_path, views=2, seed=0, progress=False)[0]["views"]
        != entries[0]["views"]
    )
    stronger = Compose(
        [RandGaussianNoised(keys="image", prob=1.0, std=0.2)]
    )  # same chain, another parameter: new files
    assert (
        build_feature_cache(slices, model, stronger, tmp_path, views=2, seed=0, progress=False)[0]["views"]
        != entries[0]["views"]
    )


def test_field_of_view_crop_makes_training_lungs_touch_the_image_border():
    """Real scans cut the lungs at the image edge (chest crops, DeepLesion 02); H-SAM's training chain shows it
    such slices on purpose, where the slice itself has air all round its lungs."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    size = 64
    label = torch.zeros(1, size, size)
    label[:, 16:48, 12:28] = 1.0
    label[:, 16:48, 36:52] = 1.0
    image = 0.5 * (1.0 - label)

    def touching(prob):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        parser.update({"bundle_root": str(BUNDLE), "slice_size": size, "field_of_view_crop_prob": prob})
        chain = Compose(parser.get_parsed_content("train#augmentation")[:1])  # the crop alone, as configured
        hits = 0
        for seed in range(20):
            chain.set_random_state(seed=seed)
            out = chain({"image": image.clone(), "label": label.clone()})["label"][0]
            assert tuple(out.shape) == (size, size)
            hits += bool(out[0].any() or out[-1].any() or out[:, 0].any() or out[:, -1].any())
        return hits

    assert touching(0.0) == 0
    assert touching(1.0) >= 10


def test_cutmix_cuts_cached_features_where_it_cuts_the_image():
    from common.transforms import MixingBatch

    n = 4
    image = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 32, 32).contiguous()
    feats = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    mixer = MixingBatch(cutmix_prob=1.0, mixup_prob=0.0, seed=1)
    image_, label_, args, kwargs = mixer({"image": image, "label": torch.zeros(n, 1, 32, 32), "features": feats})
    mixed = kwargs["encoder_features"]
    assert mixer.last == "cutmix" and args == ()
    # each feature cell holds the image's mean over the 4x4 pixels it covers
    pooled = torch.nn.functional.avg_pool2d(image_, 4)
    assert torch.allclose(mixed[:, :1], pooled, atol=1e-5) and not torch.equal(mixed, feats)


def test_release_checkpoint_is_float16_trained_tensors_that_load_back(tmp_path):
    from common.networks import load_sam_family

    torch.manual_seed(0)
    backbone = load_sam_family("tiny_sam", random_init=True)
    backbone_weights = tmp_path / "tiny_sam.pth"
    torch.save(
        torch.nn.ModuleDict(
            {
                "image_encoder": backbone.image_encoder,
                "prompt_encoder": backbone.prompt_encoder,
                "mask_decoder": backbone.mask_decoder,
            }
        ).state_dict(),
        backbone_weights,
    )
    model = build_hsam("tiny_sam", sam_checkpoint=backbone_weights)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # trained-looking LoRA weights
    full = save_network(model, tmp_path / "full.pt")
    release = release_checkpoint(full, tmp_path / "release.pt")
    raw = torch.load(release, weights_only=True)
    assert raw["dtype"] == "float16" and all(
        v.dtype == torch.float16 for v in raw["model"].values() if v.is_floating_point()
    )
    assert set(raw["model"]) == set(model.trainable_state_dict())
    loaded = load_network(release, sam_checkpoint=backbone_weights)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        a, b = model.eval().probability(model(x)), loaded.probability(loaded(x))
    assert float((a - b).abs().max()) < 5e-3


def test_fold_sequential_batch_norms_keeps_outputs_and_layout():
    from torch import nn

    from common.networks.fusion import fold_sequential_batch_norms

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
        nn.GELU(),
        nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)),
        nn.Sequential(nn.BatchNorm2d(4)),
    )
    for bn in [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]:
        (
            bn.running_mean.normal_(0, 1),
            bn.running_var.uniform_(0.5, 2.0),
            bn.weight.data.normal_(1, 0.2),
            bn.bias.data.normal_(0, 0.2),
        )
    net = net.eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = net(x)
        assert fold_sequential_batch_norms(net) == 2  # the lone batch norm has no convolution to go into
        torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 1
    assert net[0][0].weight.is_contiguous(memory_format=torch.channels_last)
