"""A SAM-family image encoder cut in two: the frozen prefix (stages no LoRA bypass touches) and the rest.

With LoRA on the later stages only, the first stages compute the same features for the same input at
every step, so their output can be cached once per slice and augmentation view
(:mod:`common.data.feature_cache`) and training runs only the rest. Features travel channel-first,
``(B, C, h, w)``, whatever the encoder keeps internally, so that batch mixing can cut them like images.

Supported encoders: LiteMedSAM's TinyViT (``patch_embed``, ``layers``, ``neck``) and segment-anything's
``ImageEncoderViT`` (``patch_embed``, ``pos_embed``, ``blocks``, ``neck``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def encoder_stages(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's stages in order (patch embedding first); its neck is not one of them."""
    if hasattr(encoder, "layers"):  # TinyViT
        return [encoder.patch_embed, *encoder.layers]
    if hasattr(encoder, "blocks"):  # ImageEncoderViT
        return [encoder.patch_embed, *encoder.blocks]
    raise TypeError(f"{type(encoder).__name__}: no known stage layout (TinyViT layers or ViT blocks)")


def first_trainable_stage(encoder: nn.Module) -> int:
    """Index of the first stage holding a parameter that trains (a LoRA bypass); all stages frozen: their count."""
    for i, stage in enumerate(encoder_stages(encoder)):
        if any(p.requires_grad for p in stage.parameters()):
            return i
    return len(encoder_stages(encoder))


def _tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape  # TinyViT tokens (B, N, C) on a square grid
    side = math.isqrt(n)
    return x.transpose(1, 2).reshape(b, c, side, side)


def run_prefix(encoder: nn.Module, x: torch.Tensor, split: int) -> torch.Tensor:
    """Encoder input (B, 3, S, S) through stages ``[0, split)`` -> channel-first features (B, C, h, w)."""
    stages = encoder_stages(encoder)
    if not 1 <= split <= len(stages):
        raise ValueError(f"split must be in [1, {len(stages)}], got {split}")
    x = stages[0](x)
    if hasattr(encoder, "blocks") and getattr(encoder, "pos_embed", None) is not None:
        x = x + encoder.pos_embed
    for stage in stages[1:split]:
        x = stage(x)
    if hasattr(encoder, "blocks"):
        return x.permute(0, 3, 1, 2)
    return x if x.ndim == 4 else _tokens_to_grid(x)  # TinyViT's patch embedding is (B, C, H, W)


def run_rest(encoder: nn.Module, features: torch.Tensor, split: int) -> torch.Tensor:
    """Channel-first features of stage ``split - 1`` through the remaining stages and the neck -> embedding."""
    stages = encoder_stages(encoder)
    if hasattr(encoder, "blocks"):  # ViT blocks take (B, H, W, C)
        x = features.permute(0, 2, 3, 1)
        for stage in stages[split:]:
            x = stage(x)
        return encoder.neck(x.permute(0, 3, 1, 2))
    # TinyViT: the patch embedding gives (B, C, H, W) and every later stage (B, N, C) tokens
    x = features if split == 1 else features.flatten(2).transpose(1, 2)
    for stage in stages[split:]:
        x = stage(x)
    b, n, c = x.shape
    side = math.isqrt(n)
    return encoder.neck(x.view(b, side, side, c).permute(0, 3, 1, 2))
