"""One checkpoint protocol for every network the bundles train, save and load.

A checkpoint is a ``torch.save`` dict with a ``format`` tag, written atomically. A network type that describes
itself in its checkpoint (:class:`~common.networks.LungCLIP`, :class:`~common.networks.hsam.HSam`) registers its
format with :func:`checkpoint_format` and implements three methods:

- ``checkpoint(release=False) -> dict``: what the file holds (``release``: the trained tensors a bundle ships,
  in float16, without what a registry package already provides);
- ``restore(checkpoint, source) -> self``: load a checkpoint's weights onto this network, a clear error naming
  ``source`` when they do not fit;
- ``from_checkpoint(checkpoint, source, **options)`` (a classmethod): build the network the checkpoint
  describes and restore it.

Any other ``nn.Module`` (MONAI's UNet and UNETR baselines) saves its whole state dict (format ``state_dict``)
and is restored onto a network of the same class built by its config. Besides the weights, every checkpoint
may carry ``preprocessing`` (how training prepared its inputs: slice size, HU window, ...) and ``extra``
(where training stood: epoch, the key metric).

:func:`save_network` and :func:`load_network` are the only ways in and out; :class:`SaveBestCheckpoint`
(``common.engines``) is the one save-best handler, :func:`release_checkpoint` makes a bundle's ``model.pt``.
"""

from __future__ import annotations

from pathlib import Path

import torch

STATE_DICT_FORMAT = "state_dict"
FORMATS: dict[str, type] = {}  # format tag -> the network class that reads it (filled by @checkpoint_format)


def checkpoint_format(tag: str):
    """Class decorator: ``tag`` is this network type's checkpoint format (see the module docstring)."""

    def register(cls: type) -> type:
        if FORMATS.get(tag, cls) is not cls:
            raise ValueError(f"checkpoint format {tag!r} is already {FORMATS[tag].__name__}'s")
        FORMATS[tag] = cls
        cls.checkpoint_format = tag
        return cls

    return register


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return network.module if isinstance(network, wrappers) else network


def half_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors in float16 (a release checkpoint), the others as they are; all on the CPU."""
    return {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()) for k, v in state.items()}


def network_checkpoint(network: torch.nn.Module, release: bool = False) -> dict:
    """What :func:`save_network` writes for ``network``: its own ``checkpoint()``, else its state dict."""
    model = unwrap(network)
    if hasattr(model, "checkpoint_format"):
        return model.checkpoint(release=release)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {
        "format": STATE_DICT_FORMAT,
        "network": type(model).__name__,
        "state_dict": half_tensors(state) if release else state,
        **({"dtype": "float16"} if release else {}),
    }


def save_network(
    network: torch.nn.Module,
    path: str | Path,
    preprocessing: dict | None = None,
    extra: dict | None = None,
    release: bool = False,
) -> Path:
    """Write ``network``'s checkpoint to ``path`` (atomic: a temporary name, then a rename). ``preprocessing`` is
    merged over the network's own; ``extra`` records where training stood."""
    from common.io.atomic import atomic_path

    ckpt = network_checkpoint(network, release=release)
    if preprocessing:
        ckpt["preprocessing"] = {**(ckpt.get("preprocessing") or {}), **dict(preprocessing)}
    if extra is not None:
        ckpt["extra"] = dict(extra)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)


def read_checkpoint(path: str | Path, what: str = "network") -> dict:
    """The checkpoint dict in ``path``; a missing file, a file torch cannot read or one without a ``format``
    tag (a bare state dict, another tool's file) is a clear error naming it and ``what`` was wanted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} checkpoint not found (train the bundle first, or pass its ckpt_path)")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("format"), str):
        known = ", ".join(sorted([*FORMATS, STATE_DICT_FORMAT]))
        raise ValueError(
            f"{path}: not a {what} checkpoint of this project (no format tag: a bare state dict or another tool's "
            f"file?); save_network writes one of: {known}"
        )
    return ckpt


def restore_network(network: torch.nn.Module, checkpoint: dict, source: str | Path) -> torch.nn.Module:
    """Load ``checkpoint`` (a dict from :func:`read_checkpoint`) onto ``network``; a checkpoint of another
    network type is a clear error naming ``source``."""
    model = unwrap(network)
    fmt = checkpoint.get("format")
    own = getattr(model, "checkpoint_format", STATE_DICT_FORMAT)
    holds = checkpoint.get("network", FORMATS[fmt].__name__ if fmt in FORMATS else fmt)
    if fmt != own or (fmt == STATE_DICT_FORMAT and holds != type(model).__name__):
        raise ValueError(f"{source}: not a {type(model).__name__} checkpoint (it holds {holds}, format {fmt!r})")
    if fmt == STATE_DICT_FORMAT:
        from common.networks.sam_family import load_state_dict_checked

        load_state_dict_checked(model, checkpoint["state_dict"], source, type(model).__name__)
    else:
        model.restore(checkpoint, source)
    return network


def load_network(
    path: str | Path, network: torch.nn.Module | None = None, expect: str | None = None, **options
) -> torch.nn.Module:
    """The trained network in ``path``. A checkpoint that describes its network builds it
    (``from_checkpoint(checkpoint, path, **options)``, e.g. ``text_model_dir`` for LungCLIP, ``variant`` and
    ``sam_checkpoint`` for H-SAM), and ``expect`` (a class name: ``"LungCLIP"``, ``"HSam"``) refuses a checkpoint of
    another network type; a ``network`` given (a baseline built by its config) is restored as it is, and ``expect``
    and ``options`` are not used. A bundle's ``network_def`` is this function as a ``_target_``."""
    ckpt = read_checkpoint(path, what=expect if network is None and expect else "network")
    if network is not None:
        return restore_network(network, ckpt, path)
    return _build_network(ckpt, path, expect, **options)


def _build_network(ckpt: dict, path: str | Path, expect: str | None = None, **options) -> torch.nn.Module:
    """The network a checkpoint dict describes (its registered class's ``from_checkpoint``)."""
    cls = FORMATS.get(ckpt["format"])
    holds = ckpt.get("network", cls.__name__ if cls is not None else "?")
    if expect is not None and (cls is None or cls.__name__ != expect):
        raise ValueError(f"{path}: not a {expect} checkpoint (it holds {holds}, format {ckpt['format']!r})")
    if cls is None:
        raise ValueError(
            f"{path}: a {ckpt['format']!r} checkpoint ({holds}) does not say how to build its "
            "network: give the network (its config's architecture) to load it onto"
        )
    return cls.from_checkpoint(ckpt, path, **options)


def release_checkpoint(source: str | Path, path: str | Path) -> Path:
    """A bundle's ``models/model.pt`` from a training checkpoint: the network it describes, saved with
    ``release=True`` (see the module docstring), its ``preprocessing`` and ``extra`` kept."""
    ckpt = read_checkpoint(source)
    network = _build_network(ckpt, source)  # the file is read once
    return save_network(network, path, preprocessing=ckpt.get("preprocessing"), extra=ckpt.get("extra"), release=True)


def for_inference(
    network: torch.nn.Module, device: str | torch.device = "cpu", precision: str = "float32"
) -> torch.nn.Module:
    """``network`` on ``device``, ready to infer: its own ``for_inference(precision)`` where it has one (H-SAM:
    LoRA merged, batch norms folded, encoder precision), eval mode in any case."""
    network = network.to(device)
    model = unwrap(network)
    if hasattr(model, "for_inference"):
        model.for_inference(precision)
    return network.eval()


__all__ = [
    "FORMATS",
    "STATE_DICT_FORMAT",
    "checkpoint_format",
    "for_inference",
    "half_tensors",
    "load_network",
    "network_checkpoint",
    "read_checkpoint",
    "release_checkpoint",
    "restore_network",
    "save_network",
    "unwrap",
]
