"""CutMix and Mixup on whole training batches (MONAI's ``CutMix`` / ``MixUp``), as the trainer's ``prepare_batch``."""

from __future__ import annotations

import numpy as np
import torch


class MixingBatch:
    """``prepare_batch`` for the trainer: each batch gets CutMix (``cutmix_prob``), else Mixup
    (``mixup_prob``), else nothing, through MONAI's ``CutMixd`` / ``MixUpd``. Image and label get the
    same cut or blend: CutMix pastes the label with the image, Mixup blends them to a soft label."""

    def __init__(
        self,
        cutmix_prob: float = 0.2,
        mixup_prob: float = 0.1,
        alpha: float = 1.0,
        seed: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        features_key: str = "features",
    ):
        if cutmix_prob < 0 or mixup_prob < 0 or cutmix_prob + mixup_prob > 1:
            raise ValueError(
                f"cutmix_prob and mixup_prob must be >= 0 and sum to at most 1, got {cutmix_prob}, {mixup_prob}"
            )
        self.cutmix_prob, self.mixup_prob, self.alpha = float(cutmix_prob), float(mixup_prob), float(alpha)
        self.rng = np.random.default_rng(seed)
        self.keys = (image_key, label_key)
        self.features_key = (
            features_key  # cached frozen-encoder features, when the batch has them: cut or blended alike
        )
        self.last = "none"

    def mix(self, batch: dict) -> dict:
        # MONAI's array CutMix / MixUp: randomize once, then ``apply`` the same cut or blend to image and
        # label (CutMixd with image and label both as keys returns one sample per key in MONAI 1.6).
        from monai.transforms import CutMix, MixUp

        image, label = (batch[k].as_tensor() if hasattr(batch[k], "as_tensor") else batch[k] for k in self.keys)
        n = int(image.shape[0])
        u = self.rng.random()
        if n < 2 or u >= self.cutmix_prob + self.mixup_prob:
            self.last = "none"
            return batch
        self.last = "cutmix" if u < self.cutmix_prob else "mixup"
        mixer = (CutMix if self.last == "cutmix" else MixUp)(batch_size=n, alpha=self.alpha)
        mixer.set_random_state(seed=int(self.rng.integers(2**31)))
        mixer.randomize(image)
        out = {**batch, self.keys[0]: mixer.apply(image), self.keys[1]: mixer.apply(label.float())}
        if self.features_key in batch:
            out[self.features_key] = self._mix_features(mixer, image, batch[self.features_key])
        return out

    def _mix_features(self, mixer, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The same cut (its mask taken down to the feature grid) or blend on the cached features."""
        import torch.nn.functional as F

        n = int(image.shape[0])
        if self.last == "mixup":
            return mixer.apply(features.float())
        own = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, *image.shape[-2:]).contiguous()
        keep = (mixer.apply(own) == own).float()  # 1 where a sample keeps its own pixels
        keep = F.interpolate(keep, size=tuple(features.shape[-2:]), mode="area")
        perm = torch.as_tensor(mixer._params[1])  # the partner of each sample, as CutMix.apply uses it
        return keep * features + (1.0 - keep) * features[perm]

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        batch = self.mix(batchdata)
        image, label = (batch[k].as_tensor() if hasattr(batch[k], "as_tensor") else batch[k] for k in self.keys)
        image, label = (
            image.to(device, non_blocking=non_blocking).float(),
            label.to(device, non_blocking=non_blocking).float(),
        )
        if (
            self.features_key in batch
        ):  # SupervisedTrainer hands the kwargs on to the network: the frozen stages are skipped
            return (
                image,
                label,
                (),
                {"encoder_features": batch[self.features_key].to(device, non_blocking=non_blocking).float()},
            )
        return image, label


__all__ = [
    "MixingBatch",
]
