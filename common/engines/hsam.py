"""SA-3b: what the hsam_finetune bundle wires around MONAI's SupervisedTrainer / SupervisedEvaluator:
batch-level CutMix and Mixup, the best-checkpoint writer, the parameter-count report, and the
whole-volume segmentation evaluator with its scorer and writer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.engines.cases import CaseEvaluator, _as_numpy, case_paths, first_affine
from common.networks.checkpoint import unwrap
from common.io import write_json_atomic
from common.io.nifti import save_nifti_array

log = logging.getLogger(__name__)

SEGMENTATION_OUTPUTS = {
    "mask": "lung_mask.nii.gz",
    "probability": "lung_probability.nii.gz",
    "sides": "lung_sides.nii.gz",
    "report": "report.json",
}


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


class CachedViewEpoch:
    """Attached to the trainer: tells a :class:`common.data.CachedViewDataset` which epoch starts, so each
    epoch reads the next augmentation view of every slice."""

    def __init__(self, dataset):
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if hasattr(self.dataset, "set_epoch"):  # an on-the-fly dataset draws new augmentations by itself
            self.dataset.set_epoch(engine.state.epoch - 1)


def parameter_counts(network: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters against full fine-tuning (H-SAM's own count; a baseline trains everything)."""
    model = unwrap(network)
    if hasattr(model, "parameter_counts"):
        return model.parameter_counts()
    n = sum(p.numel() for p in model.parameters())
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "full_finetuning": n,
        "total": n,
    }


def parameter_groups(network: torch.nn.Module, lr: float, pretrained_lr_scale: float = 0.1) -> list[dict]:
    """Optimizer groups: H-SAM's own split (:meth:`HSam.parameter_groups`); a baseline's trainable parameters at ``lr``."""
    model = unwrap(network)
    if hasattr(model, "parameter_groups"):
        return model.parameter_groups(lr, pretrained_lr_scale)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": float(lr)}]


class ParameterCountReport:
    """Attached to the trainer: logs the trainable parameter count against full fine-tuning at the start."""

    def __init__(self, network):
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        c = parameter_counts(self.network)
        share = 100.0 * c["trainable"] / max(c["full_finetuning"], 1)
        extra = f" (LoRA {c['lora']:,}, stage-2 decoder {c['stage2_decoder']:,})" if "lora" in c else ""
        log.info(
            "trainable parameters: %s of %s with full fine-tuning (%.1f %%)%s",
            f"{c['trainable']:,}",
            f"{c['full_finetuning']:,}",
            share,
            extra,
        )


class SegmentationEvaluator(CaseEvaluator):
    """Whole volumes through a 2D network slice by slice (:class:`SliceEnsembleInferer`), then
    ``postprocessing`` (threshold, 3D clean-up, sides), ``scorer`` and ``saver``; one failing case is
    one failed case. ``image`` is the HU-windowed volume the network sees; ``skipped`` (files the
    dataset found missing at start-up) are recorded as failed."""

    stage = "segment"

    def __init__(self, *args, skipped: Sequence[dict] = (), slice_margin: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.slice_margin = int(slice_margin)
        self.failed.extend({"case": s.get("case", s.get("image")), "reason": s["reason"]} for s in skipped)

    def predict(self, engine, item: dict) -> dict:
        from monai.data import MetaTensor

        image = item["image"]
        slice_mask = None
        region = item.get("region")  # the SA-2 lung mask, when given: only its slices (and a margin) are segmented
        if region is not None:
            if tuple(region.shape[1:]) != tuple(image.shape[1:]):
                raise ValueError(
                    f"{item.get('case_id')}: the SA-2 lung mask is on another grid than the CT ({tuple(region.shape[1:])} vs {tuple(image.shape[1:])})"
                )
            touched = _as_numpy(region).reshape(image.shape[1:]).reshape(-1, image.shape[-1]).max(axis=0) > 0.5
            from scipy import ndimage

            slice_mask = (
                ndimage.binary_dilation(touched, iterations=self.slice_margin)
                if self.slice_margin and touched.any()
                else touched
            )
        with engine.mode(engine.network), torch.no_grad():
            prob = engine.inferer(image[None], engine.network, slice_mask=slice_mask)[0]
        return {**item, "pred": MetaTensor(prob, affine=image.affine, meta=dict(image.meta))}


def score_segmentation(d: dict, pred_key: str = "pred", truth_key: str = "lungs") -> dict:
    """:func:`common.metrics.segmentation_scores` of the case's mask against its ground-truth lung field."""
    from common.metrics import segmentation_scores

    pred = _as_numpy(d[pred_key])[0] > 0
    truth = _as_numpy(d[truth_key]).reshape(pred.shape) > 0
    spacing = np.linalg.norm(first_affine(d[pred_key])[:3, :3], axis=0)
    return {"case_id": d.get("case_id"), **segmentation_scores(pred, truth, spacing)}


def lung_report(
    mask: np.ndarray, hu: np.ndarray, affine: np.ndarray, sides_ml: dict | None = None, emphysema_hu: float = -950.0
) -> dict:
    """Lung volume (mL, per side when known), mean lung HU and the share of lung below ``emphysema_hu`` (%LAA-950)."""
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    lung_hu = hu[mask]
    report = {"lung_volume_ml": {"total": round(float(mask.sum()) * voxel_ml, 1)}}
    if sides_ml:
        report["lung_volume_ml"].update({k: round(float(v), 1) for k, v in sides_ml.items() if k != "total"})
    report["mean_lung_hu"] = round(float(lung_hu.mean()), 1) if lung_hu.size else None
    report[f"percent_lung_below_{int(abs(emphysema_hu))}_hu"] = (
        round(100.0 * float((lung_hu < emphysema_hu).mean()), 2) if lung_hu.size else None
    )
    return report


class SaveSegmentationd:
    """Write one case's lung mask, probability, sides and report (``<output_dir>/<case>/<case>_*``), each
    through a temporary name; ``hu_key`` holds the HU volume for the report."""

    def __init__(
        self,
        output_dir: str | Path,
        pred_key: str = "pred",
        probability_key: str | None = "probability",
        sides_key: str = "lung_sides",
        hu_key: str = "hu",
        settings: dict | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.pred_key, self.probability_key, self.sides_key, self.hu_key = pred_key, probability_key, sides_key, hu_key
        self.settings = dict(settings or {})

    def __call__(self, d: dict) -> dict:
        case_id = str(d.get("case_id") or Path(str(d[self.pred_key].meta.get("filename_or_obj", "case"))).name)
        paths = case_paths(self.output_dir, case_id, SEGMENTATION_OUTPUTS)
        affine = first_affine(d[self.pred_key])
        mask = _as_numpy(d[self.pred_key])[0] > 0
        save_nifti_array(mask, affine, paths["mask"], dtype=np.uint8)
        if self.probability_key is not None and self.probability_key in d:
            save_nifti_array(_as_numpy(d[self.probability_key])[0], affine, paths["probability"])
        if self.sides_key in d:
            save_nifti_array(_as_numpy(d[self.sides_key])[0], affine, paths["sides"], dtype=np.uint8)
        report = {
            "case_id": case_id,
            "image": str(d[self.pred_key].meta.get("filename_or_obj", "")),
            "shape": list(mask.shape),
        }
        if self.hu_key in d:
            report.update(
                lung_report(mask, _as_numpy(d[self.hu_key]).reshape(mask.shape), affine, d.get(f"{self.sides_key}_ml"))
            )
        report["settings"] = self.settings
        write_json_atomic(paths["report"], report)
        return {**d, "report": report}


def segmentation_datalist(
    dataset_dir: str | Path,
    output_dir: str | Path,
    cases: Sequence[dict] | None = None,
    exclude: Sequence[str] = (),
    overwrite: bool = False,
) -> list[dict]:
    """Volumes to segment (``cases``, else the scans under ``dataset_dir``), less those already done."""
    from common.engines.probmap import scan_datalist

    found = list(cases) if cases is not None else scan_datalist(dataset_dir, exclude)
    todo = [
        c
        for c in found
        if overwrite or not case_paths(output_dir, c["case_id"], SEGMENTATION_OUTPUTS)["report"].is_file()
    ]
    if len(todo) < len(found):
        log.info(
            "segment: %d case(s) already done in %s (skipped; overwrite=True redoes them)",
            len(found) - len(todo),
            output_dir,
        )
    return todo
