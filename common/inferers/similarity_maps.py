"""SA-2, Algorithm 1 on slices: zero-shot patch-text similarity maps.

Every pixel of a slice gets, per class prompt, the cosine similarity (Eq. 4) between the text
embedding and the embeddings of the sliding-window patches that cover it, averaged (or maxed)
over those patches; ``"gaussian"`` averages them weighted by the pixel's distance from each
window's centre (MONAI's Gaussian importance map), because SA-1 labels a patch by its central
quarter, not by all of it. Two implementations give the same map:

* :func:`algorithm1_literal` is the algorithm as written: one encoder call per patch, the
  prompts encoded inside the loop. It is the reference for tests and ``benchmarks/probmap_speed.py``.
* :func:`patch_similarity_maps` is the production path: all windows of a batch of slices cut with
  ``unfold``, prepared for the encoder in one resize, encoded in batches (channels-last), the
  prompts encoded once per run, and the per-window scores spread back with one ``scatter_reduce``.

Patches are prepared exactly as SA-1 prepared its training patches (``common.data.clip_pairs``):
cut from the slice as the model sees it (radiological view, square, ``slice_size`` pixels), area-
resized to ``patch_size``, then resized (bilinear) to ``image_size``.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.transforms import Resize

from common.classes import CLASS_NAMES
from common.data.clip_pairs import PATCH_PROMPT

logger = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "max", "gaussian")
MODES = ("sliding", "dense")
MULTI_WINDOW = ("mean", "max")
EMPTY_SIMILARITY = -1.0  # the least cosine similarity: what a slice with nothing on it scores for every class


# --------------------------------------------------------------------------- prompts


def class_prompt_texts(
    class_names: Sequence[str] = CLASS_NAMES, templates: Sequence[str] = (PATCH_PROMPT,)
) -> list[list[str]]:
    """The prompt texts of each class: every template filled with the class name."""
    if not class_names:
        raise ValueError("class_names is empty: give at least one class to map")
    if not templates:
        raise ValueError("prompt templates are empty: give at least one, e.g. 'CT patch of the {}'")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"prompt templates need a '{{}}' for the class name, got {bad!r}")
    return [[t.format(name) for t in templates] for name in class_names]


def check_tokenisable(network, class_names: Sequence[str]) -> None:
    """A class name the text encoder reads as nothing but unknown tokens cannot be matched: fail now."""
    tokenizer = network.text_encoder.tokenizer
    unk = tokenizer.unk_token_id
    for name in class_names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class name {name!r} is empty: every class needs a name to prompt with")
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        if not ids or (unk is not None and all(i == unk for i in ids)):
            raise ValueError(
                f"class {name!r} cannot be tokenised by the text encoder in {network.text_encoder.model_dir}: "
                f"all its tokens are unknown ({tokenizer.unk_token}); reword the class name"
            )


@torch.no_grad()
def class_text_embeddings(
    network, class_names: Sequence[str] = CLASS_NAMES, templates: Sequence[str] = (PATCH_PROMPT,)
) -> torch.Tensor:
    """(C, D) unit text embeddings, one per class: the normalised mean over the templates (CLIP's prompt ensembling)."""
    if getattr(network, "text_encoder", None) is None:
        raise ValueError("the network has no text encoder: a zero-shot map needs one")
    check_tokenisable(network, class_names)
    per_class = class_prompt_texts(class_names, templates)
    flat = [t for texts in per_class for t in texts]
    emb = F.normalize(network.encode_text(flat).float(), dim=-1).view(len(per_class), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


# --------------------------------------------------------------------------- windows


def window_starts(size: int, patch_px: int, stride_px: int) -> list[int]:
    """Top-left offsets of the windows along one axis: every ``stride_px``, plus one flush with the far edge."""
    if patch_px > size:
        raise ValueError(f"patch of {patch_px} px does not fit a {size} px slice")
    starts = list(range(0, size - patch_px + 1, stride_px))
    if starts[-1] != size - patch_px:
        starts.append(size - patch_px)  # every pixel is covered, none counted zero times
    return starts


def window_index(size: int, patch_px: int, stride_px: int, device=None) -> torch.Tensor:
    """(L, p*p) flat pixel indices of every window of a square ``size`` slice, rows then columns."""
    starts = torch.tensor(window_starts(size, patch_px, stride_px), device=device)
    offs = torch.arange(patch_px, device=device)
    rows = starts[:, None] + offs[None, :]  # (n, p)
    flat = rows[:, None, :, None] * size + rows[None, :, None, :]  # (n_r, n_c, p, p)
    return flat.reshape(-1, patch_px * patch_px)


def window_weights(patch_px: int, aggregation: str = "mean", sigma_scale: float = 0.125) -> torch.Tensor:
    """(p, p) weight of each pixel of a window in the pixel's average: ones for ``"mean"``; for ``"gaussian"``
    MONAI's Gaussian importance map (sigma ``sigma_scale`` x the window, 0.125 putting one sigma on the
    central quarter that SA-1's patch label describes), so a pixel takes most from the windows centred near it."""
    if aggregation == "gaussian":
        if not sigma_scale > 0:
            raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
        from monai.data.utils import compute_importance_map

        return compute_importance_map(
            (int(patch_px), int(patch_px)), mode="gaussian", sigma_scale=float(sigma_scale)
        ).float()
    return torch.ones((int(patch_px), int(patch_px)))


def model_input_resizer(patch_size: int, image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(N, p, p) patches -> (N, image_size, image_size): SA-1's area resize to ``patch_size``, then its
    loader's bilinear (anti-aliased) resize. MONAI resizes channels together, so patches ride as channels."""
    to_patch = Resize((int(patch_size), int(patch_size)), mode="area", anti_aliasing=True)
    to_image = Resize((int(image_size), int(image_size)), mode="bilinear", anti_aliasing=True)

    def resize(patches: torch.Tensor) -> torch.Tensor:
        x = patches if patches.shape[-1] == int(patch_size) else to_patch(patches)
        x = x if x.shape[-1] == int(image_size) else to_image(x)
        return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else torch.as_tensor(x)

    return resize


# --------------------------------------------------------------------------- Algorithm 1


@torch.no_grad()
def algorithm1_literal(
    slice01: torch.Tensor,
    network,
    class_names: Sequence[str] = CLASS_NAMES,
    templates: Sequence[str] = (PATCH_PROMPT,),
    patch_px: int = 16,
    stride_px: int = 4,
    patch_size: int = 48,
    image_size: int = 96,
    aggregation: str = "mean",
    sigma_scale: float = 0.125,
) -> torch.Tensor:
    """Algorithm 1 line by line on one (S, S) slice in [0, 1]: (C, S, S) similarity map. Slow on purpose.
    ``"gaussian"`` weights line 9's sum and count by :func:`window_weights`."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    device = network.device
    h, w = slice01.shape[-2:]
    c = len(class_names)
    prob_map = torch.full((c, h, w), -float("inf")) if aggregation == "max" else torch.zeros((c, h, w))
    count = torch.zeros((h, w))
    weight = window_weights(patch_px, aggregation, sigma_scale)
    resize = model_input_resizer(patch_size, image_size)
    for i in window_starts(h, patch_px, stride_px):  # line 1
        for j in window_starts(w, patch_px, stride_px):  # line 2
            patch = slice01[i : i + patch_px, j : j + patch_px]  # line 3
            x = resize(patch[None].float())[None].to(device)
            image_embed = network.encode_image(x)  # lines 4-5: image encoder, then W_i
            text_embeds = class_text_embeddings(
                network, class_names, templates
            )  # lines 6-7, inside the loop as written
            sims = F.normalize(image_embed.float(), dim=-1) @ text_embeds.T  # line 8: Eq. 4
            sims = sims[0].cpu()[:, None, None]
            if aggregation == "max":
                prob_map[:, i : i + patch_px, j : j + patch_px] = torch.maximum(
                    prob_map[:, i : i + patch_px, j : j + patch_px], sims
                )
            else:  # line 9
                prob_map[:, i : i + patch_px, j : j + patch_px] += sims * weight
            count[i : i + patch_px, j : j + patch_px] += weight
    return prob_map if aggregation == "max" else prob_map / count  # line 12


@torch.no_grad()
def patch_similarity_maps(
    slices01: torch.Tensor,
    network,
    text_embeds: torch.Tensor,
    patch_px: int,
    stride_px: int,
    patch_size: int,
    image_size: int,
    aggregation: str = "mean",
    batch_size: int = 32,
    channels_last: bool = True,
    amp: bool = False,
    sigma_scale: float = 0.125,
    encoder=None,
) -> torch.Tensor:
    """Production Algorithm 1: (N, 1, S, S) slices in [0, 1] -> (N, C, S, S) similarity maps (on CPU). ``encoder``: the
    image encoder to run (default the network's own; the inferer passes its ``fused_for_inference`` copy)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    n, _, s, s2 = slices01.shape
    if s != s2:
        raise ValueError(f"slices must be square, got {s} x {s2}")
    device = network.device
    index = window_index(s, patch_px, stride_px)  # (L, p*p)
    n_win = index.shape[0]
    # every window of every slice, as rows of pixels; then as (N*L, p, p) patches
    patches = slices01.reshape(n, s * s)[:, index].reshape(n * n_win, patch_px, patch_px).float()
    resize = model_input_resizer(patch_size, image_size)
    text = text_embeds.to(device).float()
    sims = torch.empty((n * n_win, text.shape[0]))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    enc = network.image_encoder if encoder is None else encoder
    enc.to(memory_format=fmt)  # weights in the same layout as the patches (oneDNN's fast path on CPU)
    for a in range(0, n * n_win, batch_size):
        x = resize(patches[a : a + batch_size])[:, None].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            emb = network.project_image(enc.features(enc.prepare(x).contiguous(memory_format=fmt)))
        sims[a : a + batch_size] = (F.normalize(emb.float(), dim=-1) @ text.T).cpu()
    return spread_window_scores(sims.view(n, n_win, -1), s, patch_px, stride_px, aggregation, sigma_scale)


def spread_window_scores(
    scores: torch.Tensor,
    size: int,
    patch_px: int,
    stride_px: int,
    aggregation: str = "mean",
    sigma_scale: float = 0.125,
) -> torch.Tensor:
    """Algorithm 1's lines 9-12 for a whole slice at once: (N, L, C) scores of the :func:`window_index` windows
    of (N) ``size``-pixel square slices -> (N, C, S, S) maps, each pixel aggregating the windows that cover it."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    n, n_win, c = scores.shape
    s = int(size)
    index = window_index(s, patch_px, stride_px)  # (L, p*p)
    if index.shape[0] != n_win:
        raise ValueError(
            f"{n_win} window scores for {index.shape[0]} windows of a {s} px slice (patch {patch_px}, stride {stride_px})"
        )
    # each window's C scores over its p*p pixels: (N*C, L*p*p) values into (N*C, S*S)
    values = (
        scores.float().permute(0, 2, 1).reshape(n * c, n_win, 1).expand(-1, -1, patch_px * patch_px).reshape(n * c, -1)
    )
    flat_index = index.reshape(1, -1).expand(n * c, -1)
    if aggregation == "max":
        out = torch.full((n * c, s * s), -float("inf")).scatter_reduce_(1, flat_index, values, reduce="amax")
    else:  # a weighted mean: every window's pixels weighted by window_weights (all ones for "mean")
        weight = window_weights(patch_px, aggregation, sigma_scale).reshape(1, -1).expand(n_win, -1).reshape(-1)
        out = torch.zeros((n * c, s * s)).scatter_add_(1, flat_index, values * weight)
        out /= torch.zeros(s * s).scatter_add_(0, index.reshape(-1), weight)
    return out.view(n, c, s, s)


@torch.no_grad()
def dense_similarity_maps(
    slices01: torch.Tensor, network, text_embeds: torch.Tensor, patch_px: int, image_size: int, amp: bool = False
) -> torch.Tensor:
    """Dense mode: the whole slice, scaled so that a ``patch_px`` window becomes ``image_size`` pixels as in
    training, through the encoder once; W_i at every feature-map position; cosine to the prompts;
    bilinear back to the slice. (N, 1, S, S) -> (N, C, S, S)."""
    n, _, s, _ = slices01.shape
    device = network.device
    size = max(int(round(s * image_size / patch_px)), 32)
    x = F.interpolate(slices01.float(), size=(size, size), mode="bilinear", align_corners=False).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        dense = network.encode_image_dense(x)
    dense = F.normalize(dense.float(), dim=1)
    sims = torch.einsum("ndhw,cd->nchw", dense, text_embeds.to(device).float())
    return F.interpolate(sims, size=(s, s), mode="bilinear", align_corners=False).cpu()
