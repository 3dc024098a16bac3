"""The H-SAM model: a SAM-family backbone with LoRA bypasses, its own mask decoder as stage 1, the hierarchical
decoder as stage 2, Eq. 14, inference preparation and trained-tensors-only checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.networks.checkpoint import checkpoint_format, half_tensors
from common.networks.fusion import fold_sequential_batch_norms
from common.networks.sam_family import SamFamily

from common.networks.hsam.decoder import HierarchicalDecoder

CHECKPOINT_FORMAT = "hsam-trainable-v2"  # v2: the prior guides the image-to-token attention too


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


@checkpoint_format(CHECKPOINT_FORMAT)
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

    def checkpoint(self, release: bool = False) -> dict:
        """What a checkpoint holds (:mod:`common.networks.checkpoint`): the trained tensors and what they must load
        onto. ``release``: the tensors in float16, and no machine path for a backbone whose registry package ships
        its weights (LiteMedSAM)."""
        from common.networks.sam_family import VARIANTS

        backbone = self.backbone.checkpoint
        if release and not VARIANTS[self.variant].needs_checkpoint:
            backbone = None
        return {
            "format": CHECKPOINT_FORMAT,
            "variant": self.variant,
            "backbone_checkpoint": backbone,
            "lora": self.lora_config,
            "architecture": self.architecture,
            "alpha": self.alpha,
            "model": half_tensors(self.trainable_state_dict()) if release else self.trainable_state_dict(),
            **({"dtype": "float16"} if release else {}),
        }

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: dict,
        source: str | Path,
        variant: str | None = None,
        sam_checkpoint: str | Path | None = None,
        random_init: bool = False,
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> "HSam":
        """A trained H-SAM: backbone, LoRA set-up and alpha as the checkpoint records them, its weights restored
        (eval mode). ``variant``, when given, must be the checkpoint's backbone: a LoRA checkpoint for another
        backbone fails here. A backbone that ships no weights (MedSAM, SAM) loads from ``sam_checkpoint``, else
        from the path the training run recorded."""
        from common.networks.sam_family import VARIANTS, load_sam_family

        if variant is not None and variant != checkpoint["variant"]:
            raise ValueError(
                f"{source}: LoRA checkpoint was trained on the {checkpoint['variant']} backbone, not {variant}; "
                f"set sam_variant to {checkpoint['variant']} (with its sam_checkpoint) or use a checkpoint trained on {variant}"
            )
        if sam_checkpoint is None and VARIANTS[checkpoint["variant"]].needs_checkpoint and not random_init:
            sam_checkpoint = checkpoint.get("backbone_checkpoint")  # where the frozen weights came from at training
        lora = checkpoint["lora"]
        model = cls(
            load_sam_family(checkpoint["variant"], sam_checkpoint, random_init=random_init),
            lora_rank=lora["r"],
            lora_alpha=lora["lora_alpha"],
            lora_targets=lora["target_modules"],
            lora_dropout=lora["lora_dropout"],
            alpha=checkpoint["alpha"],
            **{**checkpoint.get("architecture", {}), **kwargs},
        )
        return model.restore(checkpoint, source).to(device).eval()

    def restore(self, checkpoint: dict, source: str | Path) -> "HSam":
        """Load LoRA and decoder weights (float16 ones in this model's dtype) onto this frozen backbone; another
        backbone or LoRA set-up is a clear error naming ``source``."""
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
