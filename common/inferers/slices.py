"""Run a 2D segmentation network (H-SAM, or a UNet / UNETR baseline) over slices or whole volumes.

The output is always a foreground probability: H-SAM's Eq. 14 ensemble of its two stages, or the
sigmoid of a plain network's logits. Volumes go through in batches of axial slices, so memory
follows the slice batch, not the number of slices.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer


def foreground_probability(network: torch.nn.Module, slices: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) slices in [0, 1] -> (B, 1, H, W) foreground probability."""
    from common.engines.clip import unwrap

    out = network(slices)
    if isinstance(out, dict):
        return unwrap(network).probability(out)
    return torch.sigmoid(out)


class SliceEnsembleInferer(Inferer):
    """``(B, 1, H, W)`` slices -> their probability; ``(1, 1, X, Y, Z)`` volumes -> slice by slice along Z
    (either ``slice_batch`` slices at a time).

    ``slice_mask`` (Z,) booleans, given to ``__call__``, limits a volume to the slices worth running
    (e.g. those the SA-2 lung map touches, plus a margin); the others are 0.

    A MetaTensor volume gives a MetaTensor probability with its affine and metadata (MONAI Label's
    post-processing finds the voxel size there).

    ``input_size`` (None: each slice at its own size) resizes slices to the square size a network was
    trained at, or needs (UNETR), and its probability back to the slice's grid.
    """

    def __init__(self, slice_batch: int = 8, progress: bool = False, input_size: int | None = None):
        super().__init__()
        if int(slice_batch) < 1:
            raise ValueError(f"slice_batch must be at least 1, got {slice_batch}")
        self.slice_batch, self.progress = int(slice_batch), bool(progress)
        self.input_size = None if input_size is None else int(input_size)

    def _probability(self, network: torch.nn.Module, slices: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        hw = tuple(slices.shape[-2:])
        if self.input_size is None or hw == (self.input_size, self.input_size):
            return foreground_probability(network, slices)
        size = (self.input_size, self.input_size)
        prob = foreground_probability(network, F.interpolate(slices, size=size, mode="bilinear", align_corners=False, antialias=True))
        return F.interpolate(prob, size=hw, mode="bilinear", align_corners=False)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, slice_mask=None, **kwargs) -> torch.Tensor:
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else torch.as_tensor(inputs)
        if x.ndim == 4:  # in chunks of slice_batch (common.networks.sam_family.encoder_batch: one on the CPU)
            return torch.cat([self._probability(network, x[i : i + self.slice_batch]) for i in range(0, x.shape[0], self.slice_batch)])
        if x.ndim != 5 or x.shape[:2] != (1, 1):
            raise ValueError(f"SliceEnsembleInferer takes (B, 1, H, W) slices or one (1, 1, X, Y, Z) volume, got {tuple(x.shape)}")
        z_all = np.arange(x.shape[-1]) if slice_mask is None else np.flatnonzero(np.asarray(slice_mask, dtype=bool).reshape(-1))
        out = torch.zeros(x.shape, dtype=torch.float32)
        batches = [z_all[i : i + self.slice_batch] for i in range(0, len(z_all), self.slice_batch)]
        if self.progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="segment", unit="batch", leave=False)
        for zs in batches:
            slices = x[0, :, :, :, torch.as_tensor(zs)].permute(3, 0, 1, 2).float()  # (b, 1, X, Y)
            prob = self._probability(network, slices).float().cpu()
            out[0, :, :, :, torch.as_tensor(zs)] = prob.permute(1, 2, 3, 0)
        if isinstance(inputs, MetaTensor):  # the volume's affine goes with its probability: clean-up volumes are in mL
            return MetaTensor(out).copy_meta_from(inputs)
        return out
