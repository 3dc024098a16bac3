"""Run a 2D segmentation network (H-SAM, or a UNet / UNETR baseline) over slices or whole volumes.

The output is always a foreground probability: H-SAM's Eq. 14 ensemble of its two stages, or the
sigmoid of a plain network's logits. Volumes go through in batches of axial slices, so memory
follows the slice batch, not the number of slices.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

log = logging.getLogger(__name__)


def foreground_probability(network: torch.nn.Module, slices: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) slices in [0, 1] -> (B, 1, H, W) foreground probability."""
    from common.networks.checkpoint import unwrap

    out = network(slices)
    if isinstance(out, dict):
        return unwrap(network).probability(out)
    return torch.sigmoid(out)


class SliceEnsembleInferer(Inferer):
    """``(B, 1, H, W)`` slices -> their probability; ``(1, 1, X, Y, Z)`` volumes -> slice by slice along Z
    (either ``slice_batch`` slices at a time).

    ``slice_mask`` (Z,) booleans, given to ``__call__``, limits a volume to the slices worth running
    (e.g. those the SA-2 lung map touches, plus a margin); the others are 0.

    ``field_of_view`` ``(i0, i1, j0, j1)``, given to ``__call__`` or else found in a MetaTensor volume's metadata under
    that name, is the in-plane box its slices are run on (:class:`common.transforms.PatientFieldOfViewd`: the patient on
    a wide reconstruction field); outside it the probability is 0.

    A MetaTensor volume gives a MetaTensor probability with its affine and metadata (MONAI Label's
    post-processing finds the voxel size there).

    ``input_size`` (None: each slice at its own size) resizes slices to the square size a network was
    trained at, or needs (UNETR), and its probability back to the slice's grid.

    ``slice_search_step`` > 1 looks for the foreground's slab before segmenting it: every ``slice_search_step``-th
    slice first, then every slice from one step before the first of those with a probability above
    ``foreground_threshold`` to one step after the last. The slab's ends are exact (the slices between a sampled
    slice with foreground and one without are all run); what is not looked for is foreground beyond the slab
    (a second island, above or below a sampled slice without any), which a lung, one slab from apex to base, does
    not have. Chest CT that reaches into the neck or abdomen runs about a quarter of those slices instead of all.
    """

    def __init__(
        self,
        slice_batch: int = 8,
        progress: bool = False,
        input_size: int | None = None,
        slice_search_step: int = 1,
        foreground_threshold: float = 0.5,
    ):
        super().__init__()
        if int(slice_batch) < 1:
            raise ValueError(f"slice_batch must be at least 1, got {slice_batch}")
        if int(slice_search_step) < 1:
            raise ValueError(f"slice_search_step must be at least 1, got {slice_search_step}")
        self.slice_batch, self.progress = int(slice_batch), bool(progress)
        self.input_size = None if input_size is None else int(input_size)
        self.slice_search_step, self.foreground_threshold = int(slice_search_step), float(foreground_threshold)

    def _probability(self, network: torch.nn.Module, slices: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        hw = tuple(slices.shape[-2:])
        if self.input_size is None or hw == (self.input_size, self.input_size):
            return foreground_probability(network, slices)
        size = (self.input_size, self.input_size)
        prob = foreground_probability(
            network, F.interpolate(slices, size=size, mode="bilinear", align_corners=False, antialias=True)
        )
        return F.interpolate(prob, size=hw, mode="bilinear", align_corners=False)

    def _run(self, network: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, z: np.ndarray, desc: str) -> None:
        """``out[..., z]`` = the probability of the volume ``x``'s slices ``z``, ``slice_batch`` at a time."""
        batches = [z[i : i + self.slice_batch] for i in range(0, len(z), self.slice_batch)]
        if self.progress and batches:
            from tqdm import tqdm

            batches = tqdm(batches, desc=desc, unit="batch", leave=False)
        for zs in batches:
            index = torch.as_tensor(zs)
            slices = x[0, :, :, :, index].permute(3, 0, 1, 2).float()  # (b, 1, X, Y)
            out[0, :, :, :, index] = self._probability(network, slices).float().cpu().permute(1, 2, 3, 0)

    def __call__(
        self, inputs: torch.Tensor, network: torch.nn.Module, *args, slice_mask=None, field_of_view=None, **kwargs
    ) -> torch.Tensor:
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else torch.as_tensor(inputs)
        if field_of_view is None and isinstance(inputs, MetaTensor):
            field_of_view = inputs.meta.get("field_of_view")
        if field_of_view is not None and x.ndim == 5:
            i0, i1, j0, j1 = (int(v) for v in np.asarray(field_of_view).ravel())
            if (i0, i1, j0, j1) != (0, x.shape[2], 0, x.shape[3]):
                if not (0 <= i0 < i1 <= x.shape[2] and 0 <= j0 < j1 <= x.shape[3]):
                    raise ValueError(
                        f"field_of_view {field_of_view} is not a box inside the slices {tuple(x.shape[2:4])}"
                    )
                out = torch.zeros(x.shape, dtype=torch.float32)
                out[:, :, i0:i1, j0:j1] = self(x[:, :, i0:i1, j0:j1], network, slice_mask=slice_mask)
                return MetaTensor(out).copy_meta_from(inputs) if isinstance(inputs, MetaTensor) else out
        if x.ndim == 4:  # in chunks of slice_batch (common.networks.sam_family.encoder_batch: one on the CPU)
            return torch.cat(
                [
                    self._probability(network, x[i : i + self.slice_batch])
                    for i in range(0, x.shape[0], self.slice_batch)
                ]
            )
        if x.ndim != 5 or x.shape[:2] != (1, 1):
            raise ValueError(
                f"SliceEnsembleInferer takes (B, 1, H, W) slices or one (1, 1, X, Y, Z) volume, got {tuple(x.shape)}"
            )
        z_all = (
            np.arange(x.shape[-1])
            if slice_mask is None
            else np.flatnonzero(np.asarray(slice_mask, dtype=bool).reshape(-1))
        )
        out = torch.zeros(x.shape, dtype=torch.float32)
        step = self.slice_search_step
        if step > 1 and len(z_all) > step:
            sampled = z_all[::step]
            self._run(network, x, out, sampled, "search")
            found = np.flatnonzero([bool((out[..., z] > self.foreground_threshold).any()) for z in sampled])
            if len(found):  # from one sampled slice before the first with foreground to one after the last
                lo = sampled[found[0] - 1] if found[0] > 0 else z_all[0]
                hi = sampled[found[-1] + 1] if found[-1] + 1 < len(sampled) else z_all[-1]
                slab = z_all[(z_all >= lo) & (z_all <= hi)]
                rest = np.setdiff1d(slab, sampled)
                log.info(
                    "slice search: foreground in slices %d-%d of %d; %d of %d slices run",
                    sampled[found[0]],
                    sampled[found[-1]],
                    x.shape[-1],
                    len(sampled) + len(rest),
                    len(z_all),
                )
                self._run(network, x, out, rest, "segment")
            else:
                log.info("slice search: no foreground in any of the %d sampled slices", len(sampled))
        else:
            self._run(network, x, out, z_all, "segment")
        if isinstance(inputs, MetaTensor):  # the volume's affine goes with its probability: clean-up volumes are in mL
            return MetaTensor(out).copy_meta_from(inputs)
        return out
