"""Stage 2's decoders: the hierarchical pixel decoder (64 -> 128 -> 256 px with stage-1 skips, then the
slice's own resolution) and the hierarchical decoder that joins attention and pixels."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


from common.networks.hsam.attention import MaskGuidedSelfAttention, PriorGuidedCrossAttention


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
