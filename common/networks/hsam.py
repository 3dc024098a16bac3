"""H-SAM (Cheng et al., CVPR 2024, "Unleashing the Potential of SAM for Medical Adaptation via
Hierarchical Decoding") on any SAM-family backbone.

- The image encoder is frozen; ``peft`` puts LoRA bypasses on its attention projections, and only
  those train.
- Stage 1 is the backbone's own mask decoder, prompt-free by default (the prompt encoder's no-prompt
  embeddings), giving a prior at the decoder's low resolution (4x the embedding grid: 256 px).
- Stage 2 is the hierarchical decoder: mask-guided self-attention over the stage-1 image tokens,
  prior-guided cross-attention from a mask token, and a U-Net-like pixel decoder with skips from the
  stage-1 pixel decoder, finished at the input slice's own resolution with a skip from the image.
- The output is Eq. 14: ``alpha * p1 + (1 - alpha) * p2``.

Slices go in as ``(B, 1, H, W)`` in the HU window mapped to [0, 1]; the backbone's own
preprocessing (:meth:`SamFamily.preprocess`) resizes and normalises them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.networks.fusion import fold_sequential_batch_norms
from common.networks.sam_family import SamFamily, load_sam_family

CHECKPOINT_FORMAT = "hsam-trainable-v2"  # v2: the prior guides the image-to-token attention too


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    q_extra: torch.Tensor | None = None,
    k_extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention of (B, Nq, C) queries over (B, Nk, C) keys/values.

    ``q_extra`` (B, heads, Nq, E) and ``k_extra`` (B, heads, Nk, E) are appended to every head's
    queries and keys, so the attention logits gain ``q_extra @ k_extra^T``: a guide that never
    needs the (Nq x Nk) bias matrix in memory.
    """
    b, nq, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if q_extra is not None:
        q, k = torch.cat([q, q_extra], dim=-1), torch.cat([k, k_extra], dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d))
    return out.transpose(1, 2).reshape(b, nq, c)


class MaskGuidedSelfAttention(nn.Module):
    """Self-attention over image tokens that favours pairs the stage-1 prior puts in the same class.

    The guide adds ``s_fg * p_i * p_j + s_bg * (1 - p_i) * (1 - p_j)`` to the logits of query i and
    key j, one learned pair of scales per head. Separate scales balance the classes: a small
    foreground would otherwise be outvoted by the background tokens.
    """

    def __init__(self, dim: int = 256, heads: int = 8, pool: int = 2):
        super().__init__()
        self.heads, self.pool = heads, pool
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.class_scales = nn.Parameter(torch.ones(heads, 2))  # (fg, bg) per head

    def forward(self, tokens: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, C, h, w), ``prior`` (B, 1, h, w) foreground probability -> (B, C, h, w)."""
        b, c, h, w = tokens.shape
        x = F.avg_pool2d(tokens, self.pool) if self.pool > 1 else tokens  # the attention runs on a coarser grid
        p = F.avg_pool2d(prior, self.pool) if self.pool > 1 else prior
        x = self.norm(x.flatten(2).transpose(1, 2))
        p = p.flatten(2).transpose(1, 2)  # (B, N, 1)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        fg_bg = torch.cat([p, 1.0 - p], dim=-1)[:, None]  # (B, 1, N, 2)
        scale = math.sqrt(c // self.heads)  # undo the 1/sqrt(d) the attention applies to the guide
        out = self.proj(
            _attention(
                q,
                k,
                v,
                self.heads,
                fg_bg * self.class_scales[None, :, None, :] * scale,
                fg_bg.expand(-1, self.heads, -1, -1),
            )
        )
        out = out.transpose(1, 2).reshape(b, c, h // self.pool, w // self.pool)
        if self.pool > 1:
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return tokens + out


class PriorGuidedCrossAttention(nn.Module):
    """SAM's two-way pattern with the stage-1 prior in both directions (H-SAM's mask-guided two-way
    transformer).

    - token-to-image: the mask token reads the image tokens where stage 1 saw the structure; the guide
      adds ``s * p_j`` to the token's logit for image key j;
    - image-to-token: each image token reads the mask token and two prototypes pooled from the image
      by the prior (foreground: weighted by ``p``, background: by ``1 - p``); the guide adds
      ``s_fg * p_i`` to image query i's logit for the foreground prototype and ``s_bg * (1 - p_i)`` for
      the background one, so a token updates towards the class stage 1 gave its own position. With one
      mask token alone the image side's softmax would have one key and could not use the prior at all.
    """

    def __init__(self, dim: int = 256, heads: int = 8, mlp_dim: int = 1024):
        super().__init__()
        self.heads = heads
        self.norm_t, self.norm_i = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_to_image = nn.ModuleDict(
            {"q": nn.Linear(dim, dim), "k": nn.Linear(dim, dim), "v": nn.Linear(dim, dim), "out": nn.Linear(dim, dim)}
        )
        self.image_to_token = nn.ModuleDict(
            {"q": nn.Linear(dim, dim), "k": nn.Linear(dim, dim), "v": nn.Linear(dim, dim), "out": nn.Linear(dim, dim)}
        )
        self.prior_scale = nn.Parameter(torch.full((heads,), 2.0))
        self.image_prior_scales = nn.Parameter(torch.full((heads, 2), 2.0))  # (fg, bg) per head, image-to-token
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    @staticmethod
    def prototypes(img: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Prior-weighted means of the image tokens: ``img`` (B, N, C), ``p`` (B, N, 1) -> (B, 2, C) (fg, bg)."""
        w = torch.cat([p, 1.0 - p], dim=-1)  # (B, N, 2)
        return (w.transpose(1, 2) @ img) / w.sum(dim=1).clamp_min(1e-6)[..., None]

    def forward(self, token: torch.Tensor, image: torch.Tensor, pos: torch.Tensor, prior: torch.Tensor):
        """``token`` (B, T, C), ``image`` and ``pos`` (B, C, h, w), ``prior`` (B, 1, h, w) -> (token, image)."""
        b, c, h, w = image.shape
        scale = math.sqrt(c // self.heads)  # undo the 1/sqrt(d) the attention applies to the guide
        img = image.flatten(2).transpose(1, 2)
        key = img + pos.flatten(2).transpose(1, 2)
        p_img = prior.flatten(2).transpose(1, 2)  # (B, N, 1)
        p = p_img[:, None].expand(-1, self.heads, -1, -1)  # (B, heads, N, 1)
        t = self.norm_t(token)
        a = self.token_to_image
        ones = torch.ones(b, self.heads, t.shape[1], 1, device=t.device, dtype=t.dtype)
        guide_q = ones * self.prior_scale[None, :, None, None] * scale
        token = token + a["out"](_attention(a["q"](t), a["k"](key), a["v"](img), self.heads, guide_q, p))
        token = token + self.mlp(token)
        # image-to-token: keys are the mask token(s) and the fg / bg prototypes
        r = self.image_to_token
        keys = torch.cat([token, self.prototypes(img, p_img)], dim=1)  # (B, T + 2, C)
        fg_bg = torch.cat([p_img, 1.0 - p_img], dim=-1)[:, None]  # (B, 1, N, 2)
        guide_i = fg_bg * self.image_prior_scales[None, :, None, :] * scale  # (B, heads, N, 2)
        which = torch.zeros(keys.shape[1], 2, device=t.device, dtype=t.dtype)
        which[-2, 0] = which[-1, 1] = 1.0  # the mask tokens get no guide, each prototype its class's
        i = self.norm_i(key)
        img = img + r["out"](
            _attention(
                r["q"](i),
                r["k"](keys),
                r["v"](keys),
                self.heads,
                guide_i,
                which[None, None].expand(b, self.heads, -1, -1),
            )
        )
        return token, img.transpose(1, 2).reshape(b, c, h, w)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.GELU())


class HierarchicalPixelDecoder(nn.Module):
    """U-Net-like upsampling of the refined image tokens (64 -> 128 -> 256 px) with skip connections
    from the stage-1 pixel decoder at both scales, then a refinement at the input slice's resolution
    with a skip from the image itself, so edges finer than the 256 px decoder grid can be drawn."""

    def __init__(self, dim: int = 256, skip_dims: Sequence[int] = (64, 32), stem_dim: int = 16):
        super().__init__()
        d1, d2 = skip_dims
        self.up1 = nn.ConvTranspose2d(dim, d1, 2, stride=2)
        self.fuse1 = _conv_block(2 * d1, d1)
        self.up2 = nn.ConvTranspose2d(d1, d2, 2, stride=2)
        self.fuse2 = _conv_block(2 * d2, d2)
        self.stem = _conv_block(1, stem_dim)
        self.refine = nn.Sequential(_conv_block(d2 + stem_dim + 1, stem_dim), nn.Conv2d(stem_dim, 1, 1))
        nn.init.zeros_(self.refine[-1].weight)  # the refinement starts as the identity on the decoder's mask
        nn.init.zeros_(self.refine[-1].bias)

    def forward(self, tokens: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, C, h, w) tokens, stage-1 skips (B, d1, 2h, 2w), (B, d2, 4h, 4w) -> pixel features (B, d2, 4h, 4w)."""
        x = self.fuse1(torch.cat([self.up1(tokens), skips[0]], dim=1))
        return self.fuse2(torch.cat([self.up2(x), skips[1]], dim=1))

    def full_resolution(self, coarse_logits: torch.Tensor, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Decoder-grid logits and features (already cropped to the slice) -> logits on ``image``'s grid."""
        size = tuple(image.shape[-2:])
        up = F.interpolate(coarse_logits, size=size, mode="bilinear", align_corners=False)
        feats = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        return up + self.refine(torch.cat([feats, self.stem(image), up], dim=1))


class HierarchicalDecoder(nn.Module):
    """Stage 2: mask-guided self-attention, prior-guided cross-attention, hierarchical pixel decoder."""

    def __init__(
        self, dim: int = 256, heads: int = 8, self_attention_pool: int = 2, skip_dims: Sequence[int] = (64, 32)
    ):
        super().__init__()
        self.self_attention = MaskGuidedSelfAttention(dim, heads, pool=self_attention_pool)
        self.cross_attention = PriorGuidedCrossAttention(dim, heads, mlp_dim=4 * dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pixel_decoder = HierarchicalPixelDecoder(dim, skip_dims)
        self.hypernetwork = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, skip_dims[-1]))

    def forward(self, image_tokens, pos, stage1_token, prior, skips):
        """-> (decoder-grid logits (B, 1, 4h, 4w), pixel features (B, d2, 4h, 4w))."""
        x = self.self_attention(image_tokens, prior)
        token, x = self.cross_attention(stage1_token + self.mask_token, x, pos, prior)
        features = self.pixel_decoder(x, skips)
        b, c, hh, ww = features.shape
        logits = (self.hypernetwork(token[:, 0])[:, None] @ features.flatten(2)).view(b, 1, hh, ww)
        return logits, features


def _lora_target(name: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of targets: a module whose name ends with ``.<target>`` (or is it); a
    target with a regex character is matched against the whole name (e.g. ``layers\\.3\\..*qkv``)."""
    import re

    return any(
        re.fullmatch(t, name) if any(c in t for c in "\\*[(") else (name == t or name.endswith("." + t))
        for t in targets
    )


class LungProbability(nn.Module):
    """An H-SAM seen as one tensor out: slices (B, 1, H, W) in [0, 1] -> the Eq. 14 lung probability (B, 1, H, W).
    What the bundle's inferer computes per slice, and what its ``metadata.json`` ``network_data_format`` describes
    (``monai.bundle verify_net_in_out --net_id probability_network``)."""

    def __init__(self, hsam: "HSam"):
        super().__init__()
        self.hsam = hsam

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        return self.hsam.probability(self.hsam(slices))


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a GPU that supports it, or a CPU with AVX-512 BF16 / AMX (oneDNN)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class HSam(nn.Module):
    """H-SAM on a :class:`SamFamily` backbone: LoRA encoder, stage-1 SAM decoder, stage-2 hierarchical decoder.

    ``forward`` returns ``{"stage1": logits on the decoder grid cropped to the slice (B, 1, rh, rw),
    "stage2": logits on the input grid (B, 1, H, W)}``; :meth:`probability` gives Eq. 14.
    """

    def __init__(
        self,
        backbone: SamFamily,
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_targets: Sequence[str] = ("qkv",),
        lora_dropout: float = 0.0,
        alpha: float = 0.3,
        train_stage1_decoder: bool = True,
        self_attention_pool: int = 2,
    ):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha (Eq. 14 weight of stage 1) must be in [0, 1], got {alpha}")
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.lora_config = {
            "r": int(lora_rank),
            "lora_alpha": float(lora_alpha),
            "target_modules": list(lora_targets),
            "lora_dropout": float(lora_dropout),
        }
        peft_targets = [
            n for n, _ in backbone.image_encoder.named_modules() if _lora_target(n, lora_targets)
        ]  # full names: exactly these
        if lora_rank > 0:
            if not any(_lora_target(name, lora_targets) for name, _ in backbone.image_encoder.named_modules()):
                raise ValueError(
                    f"LoRA target modules {list(lora_targets)} match no layer of the {backbone.variant.name} image encoder"
                )
            inject_adapter_in_model(
                LoraConfig(**{**self.lora_config, "target_modules": peft_targets}), backbone.image_encoder
            )  # only the bypasses train
        for p in backbone.mask_decoder.parameters():
            p.requires_grad_(bool(train_stage1_decoder))
        # stage 1 is the single-mask output: the IoU head and the multimask hypernetworks take no part
        # (DDP would also fail on parameters that get no gradient)
        for p in [
            *backbone.mask_decoder.iou_prediction_head.parameters(),
            *backbone.mask_decoder.output_hypernetworks_mlps[1:].parameters(),
        ]:
            p.requires_grad_(False)
        self.backbone = backbone
        self.alpha = float(alpha)
        self.architecture = {
            "self_attention_pool": int(self_attention_pool),
            "train_stage1_decoder": bool(train_stage1_decoder),
        }
        dim = backbone.embedding_shape[0]
        up = backbone.mask_decoder.output_upscaling
        skip_dims = (up[0].out_channels, up[3].out_channels)
        self.stage2 = HierarchicalDecoder(dim, heads=8, self_attention_pool=self_attention_pool, skip_dims=skip_dims)
        self.compute_dtype: torch.dtype | None = (
            None  # autocast dtype of the forward (None: float32); for_inference sets it
        )
        self.merged = False

    def for_inference(self, precision: str = "float32") -> "HSam":
        """This network, ready to segment and no longer to train: eval mode, each LoRA bypass merged into its frozen
        layer (peft's ``merge``: one matmul where there were three), each encoder batch norm folded into its convolution
        (:func:`common.networks.fusion.fold_sequential_batch_norms`), and its forward computed at ``precision``
        ("float32", "bfloat16" under autocast, or "auto": bfloat16 where the device computes it natively, a CPU with
        AVX-512 BF16 or AMX, or a GPU; float32 elsewhere). The logits it returns are float32 either way."""
        from peft.tuners.lora import LoraLayer

        if precision not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"precision must be float32, bfloat16 or auto, got {precision!r}")
        self.eval()
        if not self.merged:
            for module in self.backbone.image_encoder.modules():
                if isinstance(module, LoraLayer):
                    module.merge()
            fold_sequential_batch_norms(
                self.backbone.image_encoder
            )  # LiteMedSAM's TinyViT: 27 batch norms, about 6 % of its time
            self.merged = True
        device = next(self.parameters()).device
        bf16 = precision == "bfloat16" or (precision == "auto" and native_bfloat16(device))
        self.compute_dtype = torch.bfloat16 if bf16 else None
        return self

    @property
    def variant(self) -> str:
        return self.backbone.variant.name

    def train(self, mode: bool = True):
        if mode and getattr(self, "merged", False):
            raise RuntimeError(
                "this H-SAM's LoRA bypasses are merged for inference (for_inference); load the checkpoint again to train"
            )
        super().train(mode)
        self.backbone.image_encoder.eval()  # frozen: its batch-norm statistics and dropout stay as pre-trained
        return self

    def stage1(self, embedding: torch.Tensor, boxes: torch.Tensor | None = None):
        """SAM's mask decoder (single-mask output), keeping what stage 2 needs: logits, the mask token,
        the updated image tokens and both pixel-decoder scales."""
        pe, md = self.backbone.prompt_encoder, self.backbone.mask_decoder
        b = embedding.shape[0]
        sparse, dense = pe(
            points=None, boxes=None if boxes is None else boxes.reshape(-1, 1, 4).to(embedding.device), masks=None
        )
        if sparse.shape[0] != b:
            sparse = sparse.expand(b, -1, -1)
        dense = dense.expand(b, -1, -1, -1) if dense.shape[0] != b else dense
        pos = pe.get_dense_pe().expand(b, -1, -1, -1)
        tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)[None].expand(b, -1, -1)
        hs, keys = md.transformer(embedding + dense, pos, torch.cat([tokens, sparse], dim=1))
        c, h, w = embedding.shape[1:]
        image_tokens = keys.transpose(1, 2).reshape(b, c, h, w)
        skip_half = md.output_upscaling[:3](image_tokens)
        skip_full = md.output_upscaling[3:](skip_half)
        hyper = md.output_hypernetworks_mlps[0](hs[:, 1])
        logits = (hyper[:, None] @ skip_full.flatten(2)).view(b, 1, *skip_full.shape[-2:])
        return logits, hs[:, 1:2], image_tokens, pos, (skip_half, skip_full)

    @property
    def frozen_stages(self) -> int:
        """How many encoder stages (patch embedding first) no LoRA bypass touches: their output can be cached."""
        from common.networks.frozen_prefix import first_trainable_stage

        return first_trainable_stage(self.backbone.image_encoder)

    @torch.no_grad()
    def frozen_features(self, image: torch.Tensor) -> torch.Tensor:
        """The frozen encoder stages' output (B, C, h, w) for slices (B, 1, H, W): what a feature cache stores."""
        from common.networks.frozen_prefix import run_prefix

        split = self.frozen_stages
        if split < 1:
            raise ValueError("every encoder stage trains: there is no frozen prefix to cache")
        return run_prefix(self.backbone.image_encoder, self.backbone.preprocess(image), split)

    def forward(
        self, image: torch.Tensor, boxes: torch.Tensor | None = None, encoder_features: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``encoder_features``: :meth:`frozen_features` of ``image`` (e.g. from a cache); the frozen stages are then skipped."""
        if image.ndim != 4 or image.shape[1] != 1:
            raise ValueError(f"H-SAM takes slices shaped (B, 1, H, W), got {tuple(image.shape)}")
        with torch.autocast(
            image.device.type, dtype=self.compute_dtype or torch.bfloat16, enabled=self.compute_dtype is not None
        ):
            out = self._forward(image, boxes, encoder_features)
        return {k: v.float() for k, v in out.items()}

    def _forward(
        self, image: torch.Tensor, boxes: torch.Tensor | None, encoder_features: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        hw = tuple(image.shape[-2:])
        if encoder_features is None:
            embedding = self.backbone.image_encoder(self.backbone.preprocess(image))
        else:
            from common.networks.frozen_prefix import run_rest

            embedding = run_rest(
                self.backbone.image_encoder, encoder_features.to(image.device, image.dtype), self.frozen_stages
            )
        logits1, token, image_tokens, pos, skips = self.stage1(embedding, boxes)
        prior = F.adaptive_avg_pool2d(torch.sigmoid(logits1), image_tokens.shape[-2:])
        logits2, features = self.stage2(image_tokens, pos, token, prior, skips)
        rh, rw = self.backbone.resized_hw(hw)
        scale = logits1.shape[-1] / self.backbone.image_size  # decoder grid per encoder-input pixel
        gh, gw = round(rh * scale), round(rw * scale)  # the slice's part of the decoder grid (the rest is padding)
        stage2 = self.stage2.pixel_decoder.full_resolution(
            logits2[..., :gh, :gw], features[..., :gh, :gw], image.to(logits2.dtype)
        )
        return {"stage1": logits1[..., :gh, :gw], "stage2": stage2}

    def probability(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 14: ``alpha * sigmoid(stage 1) + (1 - alpha) * sigmoid(stage 2)`` on the stage-2 grid."""
        p2 = torch.sigmoid(outputs["stage2"])
        p1 = torch.sigmoid(F.interpolate(outputs["stage1"], size=p2.shape[-2:], mode="bilinear", align_corners=False))
        return self.alpha * p1 + (1.0 - self.alpha) * p2

    # ------------------------------------------------------------------ parameters and checkpoints

    def parameter_groups(self, lr: float, pretrained_lr_scale: float = 0.1) -> list[dict]:
        """Optimizer groups: the new parts (LoRA bypasses, stage 2) at ``lr``; the pre-trained stage-1
        decoder at ``lr * pretrained_lr_scale``, so the prior it starts from is adjusted, not overwritten."""
        new = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("backbone.mask_decoder.")]
        pretrained = [
            p for n, p in self.named_parameters() if p.requires_grad and n.startswith("backbone.mask_decoder.")
        ]
        return [
            g
            for g in (
                {"params": new, "lr": float(lr)},
                {"params": pretrained, "lr": float(lr) * float(pretrained_lr_scale)},
            )
            if g["params"]
        ]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters here (LoRA + decoders) against fine-tuning the whole model."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        lora = sum(p.numel() for n, p in self.named_parameters() if "lora_" in n)
        base = sum(p.numel() for n, p in self.backbone.named_parameters() if "lora_" not in n)
        stage2 = sum(p.numel() for p in self.stage2.parameters())
        return {
            "trainable": trainable,
            "lora": lora,
            "stage2_decoder": stage2,
            "full_finetuning": base + stage2,
            "total": sum(p.numel() for p in self.parameters()),
        }

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k in names}

    def checkpoint(self) -> dict:
        """What a checkpoint holds: the trained tensors and what they must load onto."""
        return {
            "format": CHECKPOINT_FORMAT,
            "variant": self.variant,
            "backbone_checkpoint": self.backbone.checkpoint,
            "lora": self.lora_config,
            "architecture": self.architecture,
            "alpha": self.alpha,
            "model": self.trainable_state_dict(),
        }

    def load_trainable(self, checkpoint: dict | str | Path) -> "HSam":
        """Load LoRA and decoder weights onto this frozen backbone; another backbone or LoRA set-up is a clear error."""
        source = str(checkpoint) if not isinstance(checkpoint, dict) else "checkpoint"
        if not isinstance(checkpoint, dict):
            checkpoint = read_hsam_checkpoint(checkpoint)
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{source}: not an H-SAM checkpoint (no format {CHECKPOINT_FORMAT!r}); it must come from HSam.checkpoint()"
            )
        if checkpoint["variant"] != self.variant:
            raise ValueError(
                f"{source}: LoRA checkpoint was trained on the {checkpoint['variant']} backbone, this model is {self.variant}; "
                f"build HSam on {checkpoint['variant']} (sam_variant) to use it"
            )
        if checkpoint["lora"] != self.lora_config:
            raise ValueError(f"{source}: LoRA set-up {checkpoint['lora']} differs from this model's {self.lora_config}")
        own = self.state_dict()
        state = checkpoint["model"]  # the key MONAI Label's bundle loader reads
        wanted = set(self.trainable_state_dict())
        missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - set(own))
        shapes = [
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in state
            if k in own and state[k].shape != own[k].shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{source}: does not fit this {self.variant} H-SAM: missing {missing[:3]}, unexpected {unexpected[:3]}, shapes {shapes[:3]}"
            )
        self.load_state_dict(state, strict=False)
        self.alpha = float(checkpoint.get("alpha", self.alpha))
        return self


def read_hsam_checkpoint(path: str | Path) -> dict:
    """An H-SAM checkpoint file, checked for its format; a missing file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: H-SAM checkpoint not found (train the hsam_finetune bundle first, or pass ckpt_path)"
        )
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: not an H-SAM checkpoint (no format {CHECKPOINT_FORMAT!r}); it must come from HSam.checkpoint()"
        )
    return ckpt


def load_hsam(
    hsam_checkpoint: str | Path,
    variant: str | None = None,
    sam_checkpoint: str | Path | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    **kwargs,
) -> HSam:
    """A trained H-SAM: backbone, LoRA set-up and alpha as the checkpoint records them, its weights loaded (eval mode).

    ``variant``, when given, must be the checkpoint's backbone: a LoRA checkpoint for another backbone fails here.
    A backbone that ships no weights (MedSAM, SAM) loads from ``sam_checkpoint``, else from the path the
    training run recorded.
    """
    ckpt = read_hsam_checkpoint(hsam_checkpoint)
    if variant is not None and variant != ckpt["variant"]:
        raise ValueError(
            f"{hsam_checkpoint}: LoRA checkpoint was trained on the {ckpt['variant']} backbone, not {variant}; "
            f"set sam_variant to {ckpt['variant']} (with its sam_checkpoint) or use a checkpoint trained on {variant}"
        )
    from common.networks.sam_family import VARIANTS

    if sam_checkpoint is None and VARIANTS[ckpt["variant"]].needs_checkpoint and not random_init:
        sam_checkpoint = ckpt.get("backbone_checkpoint")  # where the frozen weights came from at training time
    lora = ckpt["lora"]
    model = build_hsam(
        ckpt["variant"],
        sam_checkpoint,
        random_init=random_init,
        lora_rank=lora["r"],
        lora_alpha=lora["lora_alpha"],
        lora_targets=lora["target_modules"],
        lora_dropout=lora["lora_dropout"],
        alpha=ckpt["alpha"],
        **{**ckpt.get("architecture", {}), **kwargs},
    )
    model.load_trainable(ckpt)
    return model.to(device).eval()


def build_hsam(
    variant: str = "litemedsam",
    sam_checkpoint: str | Path | None = None,
    hsam_checkpoint: str | Path | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    **kwargs,
) -> HSam:
    """The backbone (weights from ``load_sam_family``), LoRA and decoders; ``hsam_checkpoint`` loads trained weights."""
    backbone = load_sam_family(variant, sam_checkpoint, random_init=random_init)
    model = HSam(backbone, **kwargs)
    if hsam_checkpoint is not None:
        model.load_trainable(hsam_checkpoint)
    return model.to(device)
