"""SA-1 ignite engines: the dual-loss trainer (Eq. 3) and the zero-shot / retrieval / distillation evaluator.

Both are MONAI workflows (``SupervisedTrainer`` / ``SupervisedEvaluator``) with their own iteration,
so bundle configs wire them like any MONAI trainer: handlers, metrics, ``--tracking mlflow``.

A batch (from :mod:`common.data`) holds ``image`` (B, 1, H, W) in [0, 1], ``text`` ('' = none),
``kind`` ("slice" or "patch"), ``label`` (class index of a patch, -1 otherwise), ``sample_id``,
``slice_index``, ``view_id`` (which augmented view; 0 = clean) and ``skipped``.

An iteration's output is a one-element list holding the batch's record (a dict), the layout of
MONAI's decollated outputs, so that MONAI's stock transforms such as
``from_engine(['loss'], first=True)`` (StatsHandler, ``--tracking mlflow``) read it unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from common.data.dataset import SKIPPED_KEY
from common.networks.checkpoint import unwrap
from common.networks.teacher import cache_key


def plain_tensor(x) -> torch.Tensor:
    """A batch's images without MONAI metadata: MetaTensor's per-op bookkeeping makes every layer of the
    student and the teacher several times slower, and nothing downstream needs the affine."""
    from monai.utils import convert_to_tensor

    return convert_to_tensor(x, track_meta=False)


def sync_buffers(network: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics) of a DistributedDataParallel ``network``.

    DDP broadcasts buffers at the start of each training forward only, so after an epoch's last step
    each rank holds the running statistics of its own last batch. A collective: every rank must call it.
    """
    import torch.distributed as dist

    if not isinstance(network, torch.nn.parallel.DistributedDataParallel) or not (
        dist.is_available() and dist.is_initialized()
    ):
        return
    with torch.no_grad():
        for buf in network.module.buffers():
            dist.broadcast(buf, src=src)


def teacher_embeddings(teacher, keys: list[str], images: torch.Tensor) -> torch.Tensor:
    """Teacher embeddings of ``images`` (B, 1, H, W): through the on-disk cache when ``teacher`` is a TeacherCache."""
    if hasattr(teacher, "get"):
        return teacher.get(keys, images.detach().cpu())
    return teacher(images)


def view_keys(
    batch: dict, mask: torch.Tensor, image_hw: Sequence[int], view_tag: str, clean: bool = False
) -> list[str]:
    """Teacher cache keys of the masked samples: sample, input size, augmentation settings and view."""
    idx = torch.nonzero(mask).flatten().tolist()
    views = batch.get("view_id")
    size = f"{int(image_hw[0])}x{int(image_hw[1])}"
    return [
        cache_key(
            f"{batch['sample_id'][i]}|{size}|{view_tag}",
            int(batch["slice_index"][i]),
            0 if clean or views is None else int(views[i]),
        )
        for i in idx
    ]


def _texts(batch: dict) -> tuple[list[str], list[int], torch.Tensor]:
    """Unique texts of a batch, the index of each text-bearing sample into them, and the has-text mask."""
    texts = [str(t) for t in batch.get("text", [""] * len(batch["image"]))]
    unique = list(dict.fromkeys(t for t in texts if t))
    index = [unique.index(t) for t in texts if t]
    return unique, index, torch.tensor([bool(t) for t in texts], dtype=torch.bool)


def positive_groups(batch: dict, class_positives: bool) -> list[int]:
    """InfoNCE positive group of each text-bearing sample: its text, or with ``class_positives`` the class
    of a labelled patch (``label`` >= 0), so that captions of the same class ("aorta", "pulmonary
    artery") are not pushed apart as negatives (UniCL-style image-text-label contrast)."""
    texts = [str(t) for t in batch["text"]]
    labels = [int(v) for v in batch.get("label", [-1] * len(texts))]
    keys = [f"class:{lab}" if class_positives and lab >= 0 else f"text:{t}" for t, lab in zip(texts, labels) if t]
    order = list(dict.fromkeys(keys))
    return [order.index(k) for k in keys]


class CLIPTrainer(SupervisedTrainer):
    """Dual-loss trainer: ``loss_function`` is a :class:`common.losses.DualLoss`.

    Samples whose ``kind`` is in ``distill_kinds`` go to the frozen ``teacher`` (a Teacher, or a
    TeacherCache so that each (sample, view) is encoded once across epochs); samples without text
    contribute only the distillation term. Each unique text of a batch is encoded once; InfoNCE
    treats samples that share a text as positives of each other, not negatives, and with
    ``class_positives`` also labelled patches of the same class (:func:`positive_groups`).
    """

    def __init__(
        self,
        device,
        max_epochs: int,
        train_data_loader,
        network,
        optimizer,
        loss_function,
        teacher=None,
        distill_kinds: Sequence[str] = ("slice",),
        view_tag: str = "",
        class_positives: bool = False,
        **kwargs,
    ):
        kwargs.setdefault("decollate", False)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            **kwargs,
        )
        self.teacher = teacher
        self.distill_kinds = tuple(distill_kinds)
        self.view_tag = str(view_tag)
        self.class_positives = bool(class_positives)
        self.state.skipped = []

    def _iteration(self, engine, batchdata: dict[str, Any]) -> dict:
        engine.state.skipped.extend(batchdata.get(SKIPPED_KEY, []))
        if "image" not in batchdata:  # every sample of the batch failed to load
            return [{"loss": None}]
        images = plain_tensor(batchdata["image"]).to(engine.state.device, non_blocking=self.non_blocking).float()
        unique, text_index, has_text = _texts(batchdata)
        has_teacher = torch.tensor([k in self.distill_kinds for k in batchdata["kind"]], dtype=torch.bool)
        teacher = None
        if self.teacher is not None and self.loss_function.beta and bool(has_teacher.any()):
            keys = view_keys(batchdata, has_teacher, images.shape[-2:], self.view_tag)
            teacher = teacher_embeddings(self.teacher, keys, images[has_teacher.to(images.device)]).to(images.device)
        else:
            has_teacher = torch.zeros_like(has_teacher)
        self.network.train()
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        out = self.network(images, unique or None)
        text_rows = out["text_embeds"][text_index] if unique else None
        losses = self.loss_function(
            out["image_embeds"],
            text_rows,
            out["student_distill"] if teacher is not None else None,
            teacher,
            has_text=has_text.to(images.device),
            has_teacher=has_teacher.to(images.device),
            logit_scale=out["logit_scale"],
            # grouping by text is text_index itself; by class it needs the labels
            text_ids=torch.tensor(
                positive_groups(batchdata, True) if self.class_positives else text_index, device=images.device
            )
            if unique
            else None,
        )
        losses["total"].backward()
        self.optimizer.step()
        return [
            {
                "image": images,
                "loss": losses["total"].detach(),
                "loss_contrastive": losses["contrastive"].detach(),
                "loss_distill": losses["distill"].detach() if teacher is not None else None,
                "n_text": int(has_text.sum()),
                "n_teacher": int(has_teacher.sum()),
            }
        ]


class CLIPEvaluator(SupervisedEvaluator):
    """Validation outputs for the SA-1 metrics (:mod:`common.engines.metrics`).

    Each epoch starts by encoding ``class_prompts`` (one per class, Eq. 4); each iteration gives the
    image embeddings, the class prompts' embeddings, the text embeddings of text-bearing samples and,
    for ``distill_kinds`` samples, the student's distillation output and the teacher's embedding of
    the clean view (view 0).
    """

    def __init__(
        self,
        device,
        val_data_loader,
        network,
        class_prompts: Sequence[str],
        teacher=None,
        distill_kinds: Sequence[str] = ("slice",),
        view_tag: str = "",
        **kwargs,
    ):
        kwargs.setdefault("decollate", False)
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, **kwargs)
        self.class_prompts = list(class_prompts)
        self.teacher = teacher
        self.distill_kinds = tuple(distill_kinds)
        self.view_tag = str(view_tag)
        self.state.skipped = []
        # Under DDP every rank validates the whole set with the unwrapped model: same buffers, same
        # metrics, same early-stopping decision (otherwise a rank could stop while another waits).
        self.add_event_handler(Events.STARTED, lambda engine: sync_buffers(self.network))
        self.add_event_handler(Events.EPOCH_STARTED, self._encode_prompts)

    @property
    def model(self):
        # Evaluation runs the plain model on every rank (no DDP collectives in a no-grad pass).
        return unwrap(self.network)

    def _encode_prompts(self, engine) -> None:
        model = self.model
        model.eval()
        with torch.no_grad():
            engine.state.class_text_embeds = (
                model.encode_text(self.class_prompts).float().cpu() if self.class_prompts else None
            )

    def _iteration(self, engine, batchdata: dict[str, Any]) -> dict:
        engine.state.skipped.extend(batchdata.get(SKIPPED_KEY, []))
        if "image" not in batchdata:
            return [{}]
        model = self.model
        model.eval()
        images = plain_tensor(batchdata["image"]).to(engine.state.device).float()
        unique, text_index, has_text = _texts(batchdata)
        is_distill = torch.tensor([k in self.distill_kinds for k in batchdata["kind"]], dtype=torch.bool)
        with torch.no_grad():
            fmap = model.feature_map(images)
            out = {
                "image_embeds": model.project_image(fmap).float().cpu(),
                "label": torch.as_tensor(batchdata["label"]).long().cpu(),
                "class_text_embeds": engine.state.class_text_embeds,
                "text": [str(t) for t in batchdata["text"]],
                "has_text": has_text,
                "text_embeds": model.encode_text(unique)[text_index].float().cpu() if unique else None,
                "student": None,
                "teacher": None,
            }
            if self.teacher is not None and model.distill_head is not None and bool(is_distill.any()):
                keys = view_keys(batchdata, is_distill, images.shape[-2:], self.view_tag, clean=True)
                out["student"] = model.distill_head(fmap[is_distill.to(fmap.device)]).float().cpu()
                out["teacher"] = (
                    teacher_embeddings(self.teacher, keys, images[is_distill.to(images.device)]).float().cpu()
                )
        return [out]


__all__ = ["CLIPEvaluator", "CLIPTrainer", "plain_tensor", "sync_buffers", "teacher_embeddings", "unwrap", "view_keys"]
