"""SA-2, Algorithm 1 over volumes: :class:`PatchSimilarityInferer` is a MONAI ``Inferer``: a (B, 1, X, Y, Z) HU volume
in, a (B, C, X, Y, Z) similarity map out on the same grid, slice batch by slice batch, through
:mod:`common.inferers.similarity_maps`. ``mode="dense"`` is the faster alternative: the encoder's feature map of the
whole slice, projected pixel-wise.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import Inferer

from common.classes import CLASS_NAMES
from common.data.clip_pairs import PATCH_PROMPT, axial_slice01
from common.transforms.intensity import HU_WINDOW, HUWindow

from common.inferers.similarity_maps import (
    AGGREGATIONS,
    EMPTY_SIMILARITY,
    MODES,
    MULTI_WINDOW,
    algorithm1_literal,
    check_tokenisable,
    class_prompt_texts,
    class_text_embeddings,
    dense_similarity_maps,
    model_input_resizer,
    patch_similarity_maps,
    window_index,
    window_starts,
    window_weights,
)

logger = logging.getLogger(__name__)

AXCODES = "LPS"  # the orientation SA-1 cut its training slices in (axis 2 axial, radiological view)


# --------------------------------------------------------------------------- volume geometry


def to_axcodes(array: np.ndarray, affine: np.ndarray, axcodes: str = AXCODES):
    """``array`` (spatial axes first) in ``axcodes`` voxel order with its affine there
    (:func:`common.io.volume.reorient_array`), and the function that puts an array back."""
    from nibabel import orientations as ornt

    from common.io.volume import reorient_array

    out, out_affine = reorient_array(array, affine, axcodes)
    back = ornt.ornt_transform(ornt.axcodes2ornt(tuple(axcodes)), ornt.io_orientation(affine))
    return (
        out,
        out_affine,
        lambda a, copy=True: (
            np.ascontiguousarray(ornt.apply_orientation(a, back)) if copy else ornt.apply_orientation(a, back)
        ),
    )


def slice_pixel_mm(shape_xy: Sequence[int], spacing_xy: Sequence[float], slice_size: int) -> float:
    """Millimetres per pixel of the square model slice (the longer side of the field spans ``slice_size``)."""
    return float(max(spacing_xy[0] * shape_xy[0], spacing_xy[1] * shape_xy[1])) / float(slice_size)


def map_to_slice(maps: torch.Tensor, shape_xy: Sequence[int]) -> torch.Tensor:
    """(C, S, S) maps of the square radiological-view slice -> (C, X, Y) on the LPS slice grid
    (undoes :func:`common.data.clip_pairs.axial_slice01`: resize, square padding, transpose)."""
    x, y = int(shape_xy[0]), int(shape_xy[1])
    side = max(x, y)
    sq = F.interpolate(maps[None].float(), size=(side, side), mode="bilinear", align_corners=False)[0]
    r0, c0 = (side - y) // 2, (side - x) // 2
    return sq[:, r0 : r0 + y, c0 : c0 + x].transpose(1, 2)


class PatchSimilarityInferer(Inferer):
    """MONAI inferer for SA-2: (B, 1, X, Y, Z) HU volume (MetaTensor with its affine) -> (B, C, X, Y, Z)
    cosine similarity to each class prompt (Eq. 4), on the input grid.

    Sliding mode (Algorithm 1) runs ``patch_mm`` windows every ``stride_mm``, each pixel averaging the windows
    that cover it (``aggregation``: "gaussian", the default, weighted towards each window's centre with
    ``sigma_scale`` as MONAI's ``SlidingWindowInferer`` weights its windows, or "mean" or "max"); several ``patch_mm``
    values are the method's multi-window option, combined by ``multi_window`` ("mean" or "max").
    ``fuse_encoder`` runs the windows through the encoder's ``fused_for_inference`` copy (EfficientNet-Lite: BatchNorm
    folded into the convolutions, 1.3x faster, the same similarities to float rounding).
    A slice with no contrast (all one value) scores ``EMPTY_SIMILARITY`` everywhere, so that it
    maps to no class instead of to noise. Settings the model was trained with (``slice_size``,
    ``image_size``, ``patch_size``, ``patch_mm``, ``hu_window``) default to those in its checkpoint.
    """

    def __init__(
        self,
        class_names: Sequence[str] = CLASS_NAMES,
        templates: Sequence[str] = (PATCH_PROMPT,),
        patch_mm: float | Sequence[float] | None = None,
        stride_mm: float = 10.0,
        aggregation: str = "gaussian",
        multi_window: str = "mean",
        mode: str = "sliding",
        sigma_scale: float = 0.125,
        batch_size: int = 32,
        slice_batch: int = 8,
        slice_size: int | None = None,
        image_size: int | None = None,
        patch_size: int | None = None,
        hu_window: Sequence[float] | None = None,
        channels_last: bool = True,
        amp: bool = False,
        fuse_encoder: bool = True,
        progress: bool = True,
    ):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if multi_window not in MULTI_WINDOW:
            raise ValueError(f"multi_window must be one of {MULTI_WINDOW}, got {multi_window!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not stride_mm > 0:
            raise ValueError(f"stride_mm must be > 0, got {stride_mm}")
        self.class_names = list(class_names)
        self.templates = list(templates)
        class_prompt_texts(self.class_names, self.templates)  # template errors at start-up
        self.patch_mm = None if patch_mm is None else [float(p) for p in np.atleast_1d(patch_mm)]
        self.stride_mm = float(stride_mm)
        window_weights(4, aggregation, sigma_scale)  # sigma_scale errors at start-up
        self.aggregation, self.multi_window, self.mode, self.sigma_scale = (
            aggregation,
            multi_window,
            mode,
            float(sigma_scale),
        )
        self.batch_size, self.slice_batch = int(batch_size), int(slice_batch)
        self.overrides = {
            "slice_size": slice_size,
            "image_size": image_size,
            "patch_size": patch_size,
            "hu_window": hu_window,
        }
        self.channels_last, self.amp, self.fuse_encoder, self.progress = (
            bool(channels_last),
            bool(amp),
            bool(fuse_encoder),
            bool(progress),
        )
        self._text_cache: tuple[int, torch.Tensor] | None = None
        self._encoder_cache: tuple[tuple, torch.nn.Module] | None = None
        self.last_info: dict = {}

    # settings ---------------------------------------------------------------

    def settings(self, network) -> dict:
        """The preprocessing in effect: explicit arguments over the checkpoint's, over SA-1's defaults."""
        pre = dict(getattr(network, "preprocessing", {}) or {})
        defaults = {
            "slice_size": 512,
            "image_size": 224,
            "patch_size": 64,
            "patch_mm": 40.0,
            "hu_window": list(HU_WINDOW),
        }
        out = {k: pre.get(k, v) for k, v in defaults.items()}
        out.update({k: v for k, v in self.overrides.items() if v is not None})
        out["patch_mm"] = self.patch_mm or [float(out["patch_mm"])]
        return out

    def text_embeddings(self, network) -> torch.Tensor:
        """(C, D) prompt embeddings, encoded once per network (not once per patch)."""
        if self._text_cache is None or self._text_cache[0] != id(network):
            self._text_cache = (id(network), class_text_embeddings(network, self.class_names, self.templates))
        return self._text_cache[1]

    def image_encoder(self, network):
        """The encoder the windows go through: with ``fuse_encoder``, the network's ``fused_for_inference`` copy
        (BatchNorm folded into the convolutions; the same features to float rounding), made once per network."""
        if not self.fuse_encoder:
            return network.image_encoder
        # a network being trained (SA-1's validation metric) changes its weights in place: their version counters say so
        key = (id(network), tuple(p._version for p in network.image_encoder.parameters()))
        if self._encoder_cache is None or self._encoder_cache[0] != key:
            self._encoder_cache = (key, network.image_encoder.fused_for_inference())
        return self._encoder_cache[1]

    # one volume ---------------------------------------------------------------

    def slice_maps(self, slices01: torch.Tensor, network, text: torch.Tensor, px_mm: float, cfg: dict) -> torch.Tensor:
        """(N, 1, S, S) model slices -> (N, C, S, S) similarity, multi-window combined."""
        maps = []
        for patch_mm in cfg["patch_mm"]:
            patch_px = max(int(round(patch_mm / px_mm)), 4)
            patch_px = min(patch_px, slices01.shape[-1])
            if self.mode == "dense":
                maps.append(dense_similarity_maps(slices01, network, text, patch_px, cfg["image_size"], amp=self.amp))
            else:
                stride_px = max(int(round(self.stride_mm / px_mm)), 1)
                maps.append(
                    patch_similarity_maps(
                        slices01,
                        network,
                        text,
                        patch_px,
                        stride_px,
                        cfg["patch_size"],
                        cfg["image_size"],
                        self.aggregation,
                        self.batch_size,
                        self.channels_last,
                        self.amp,
                        self.sigma_scale,
                        encoder=self.image_encoder(network),
                    )
                )
        stack = torch.stack(maps)
        return stack.mean(0) if self.multi_window == "mean" else stack.amax(0)

    @torch.no_grad()
    def volume(self, hu: np.ndarray, affine: np.ndarray, network, name: str = "volume") -> torch.Tensor:
        """(X, Y, Z) HU array + its affine -> (C, X, Y, Z) float32 similarity on the same grid."""
        from tqdm.auto import tqdm

        cfg = self.settings(network)
        text = self.text_embeddings(network)
        lps, lps_affine, back = to_axcodes(np.asarray(hu, dtype=np.float32), affine)
        # the same array with each axial slice contiguous in memory: reading lps[:, :, k] of a z-last array sweeps the
        # whole scan for every slice (4 s of a 64-slice scan)
        lps = np.moveaxis(np.ascontiguousarray(np.moveaxis(lps, 2, 0)), 0, 2)
        spacing_lps = np.linalg.norm(lps_affine[:3, :3], axis=0)
        px_mm = slice_pixel_mm(lps.shape[:2], spacing_lps[:2], cfg["slice_size"])
        window = HUWindow(cfg["hu_window"])
        fill = float(lps.min())
        c, nz = len(self.class_names), lps.shape[2]
        per_slice = np.empty(
            (nz, c) + lps.shape[:2], dtype=np.float32
        )  # slice-major: each slice's maps written in one piece
        empty = []
        bar = tqdm(total=nz, desc=f"probmap {name}", unit="slice", disable=not self.progress, leave=False)
        for k0 in range(0, nz, self.slice_batch):
            ks = list(range(k0, min(k0 + self.slice_batch, nz)))
            slices = torch.from_numpy(np.stack([axial_slice01(lps, k, cfg["slice_size"], window, fill) for k in ks]))[
                :, None
            ]
            # judged on the scan's own pixels: the square padding would give any slice an edge
            flat = torch.tensor([float(np.ptp(lps[:, :, k])) <= 1e-3 for k in ks])
            maps = torch.full((len(ks), c) + slices.shape[-2:], EMPTY_SIMILARITY)
            if (~flat).any():
                maps[~flat] = self.slice_maps(slices[~flat], network, text, px_mm, cfg)
            for n, k in enumerate(ks):
                if flat[n]:
                    empty.append(k)
                per_slice[k] = map_to_slice(maps[n], lps.shape[:2]).numpy()
            bar.update(len(ks))
        bar.close()
        if empty:
            logger.warning(
                "%s: %d of %d slices have no contrast (one value throughout) and map to no class: %s",
                name,
                len(empty),
                nz,
                empty[:10],
            )
        self.last_info = {
            "empty_slices": empty,
            "slice_pixel_mm": px_mm,
            **{k: cfg[k] for k in ("slice_size", "image_size", "patch_size", "patch_mm")},
            "stride_mm": self.stride_mm,
            "aggregation": self.aggregation,
            "sigma_scale": self.sigma_scale,
            "mode": self.mode,
            "class_names": self.class_names,
            "templates": self.templates,
        }
        # (C, X, Y, Z) back in the input's voxel order, each channel copied once into the result
        return torch.from_numpy(np.stack([back(ch, copy=False) for ch in np.moveaxis(per_slice, 0, -1)]))

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, X, Y, Z) HU volume, got shape {tuple(inputs.shape)}")
        affines = getattr(inputs, "affine", None)
        outs = []
        for b in range(inputs.shape[0]):
            aff = (
                np.eye(4)
                if affines is None
                else np.asarray(affines[b] if affines.ndim == 3 else affines, dtype=np.float64)
            )
            name = "volume"
            meta = getattr(inputs, "meta", None)
            if meta and "filename_or_obj" in meta:
                fn = meta["filename_or_obj"]
                name = str(fn[b] if isinstance(fn, (list, tuple)) else fn)
            hu = inputs[b, 0].detach().cpu().as_subclass(torch.Tensor).numpy()
            outs.append(self.volume(hu, aff, network, name=name))
        out = torch.stack(outs).to(inputs.device)
        if hasattr(inputs, "affine"):
            from monai.data import MetaTensor

            out = MetaTensor(out, affine=inputs.affine, meta=dict(getattr(inputs, "meta", {}) or {}))
        return out


__all__ = [
    "AGGREGATIONS",
    "EMPTY_SIMILARITY",
    "MODES",
    "PatchSimilarityInferer",
    "algorithm1_literal",
    "check_tokenisable",
    "class_prompt_texts",
    "class_text_embeddings",
    "dense_similarity_maps",
    "map_to_slice",
    "model_input_resizer",
    "patch_similarity_maps",
    "slice_pixel_mm",
    "to_axcodes",
    "window_index",
    "window_starts",
]
