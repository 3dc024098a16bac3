"""Batch norms folded into the convolutions before them, for inference: the same outputs to float rounding, one pass
over the activations instead of two (``torch.nn.utils.fusion.fuse_conv_bn_eval``). Training keeps them apart."""

from __future__ import annotations

import torch
import torch.nn as nn


def fold_batch_norm(parent: nn.Module, conv_name: str, bn_name: str) -> None:
    """Replace ``parent.<conv_name>`` by the eval-mode fusion of it and ``parent.<bn_name>``, and the batch norm by
    ``nn.Identity``; the convolution keeps its weights' memory layout (channels last stays channels last)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    channels_last = conv.weight.ndim == 4 and conv.weight.is_contiguous(memory_format=torch.channels_last)
    fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
    if channels_last:
        fused.weight.data = fused.weight.data.contiguous(memory_format=torch.channels_last)
    setattr(parent, conv_name, fused)
    setattr(parent, bn_name, nn.Identity())


def fold_sequential_batch_norms(module: nn.Module) -> int:
    """Fold every ``BatchNorm2d`` (with running statistics) that directly follows a ``Conv2d`` inside an
    ``nn.Sequential`` of ``module`` (TinyViT's ``Conv2d_BN``: 27 in LiteMedSAM's encoder); returns how many."""
    folded = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = seq._modules[conv_name], seq._modules[bn_name]
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                fold_batch_norm(seq, conv_name, bn_name)
                folded += 1
    return folded
