"""The functional arguments of an ``nn.BatchNorm2d`` call, for the fused norm ops.

Mirrors ``nn.modules.batchnorm._BatchNorm.forward`` (``num_batches_tracked``,
cumulative averaging when ``momentum is None``, batch statistics in eval mode
without running statistics), so a module that swaps ``torch.relu(bn(x))`` for
``fastmod.ops.routed_batch_norm_relu`` keeps the same state-dict updates.
"""
from __future__ import annotations

import torch
from torch import nn


def batch_norm_args(bn: nn.BatchNorm2d) -> dict:
    """Keyword arguments of ``routed_batch_norm_relu`` that ``bn(x)`` would use; counts
    the batch in ``bn.num_batches_tracked`` as ``bn(x)`` does (call once per forward)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return dict(running_mean=bn.running_mean if keep else None, running_var=bn.running_var if keep else None,
                weight=bn.weight, bias=bn.bias, training=use_batch_stats, momentum=momentum, eps=bn.eps)


def folded_batch_norm(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) with ``bn(y) == y * scale + shift`` per channel, when ``bn`` uses
    its running statistics (eval mode); None when it would use batch statistics."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift
