"""Stage 2's attention: mask-guided self-attention over the image tokens and prior-guided cross-attention
between the mask token and the image (the prior in both directions)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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
