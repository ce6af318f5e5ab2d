"""The canonical 4-D form shared by every mixed-node kernel backend.

An operand of a node is viewed as ``[K|1, B|1, C|1, S|1]``: node, batch,
channel (the dim ``normalize`` reduces over) and flattened spatial, with size 1
on the dims it is broadcast over.  Kernels read size-1 dims with stride 0, so
broadcast operands are never materialised.
"""
from __future__ import annotations

import math

import torch


def canonical(x: torch.Tensor, node_shape) -> torch.Tensor:
    """View operand x (of a node whose full shape is ``node_shape``) in 4-D.

    Spatial dims are flattened into S; an operand broadcast over only some
    spatial dims cannot be expressed with one stride and is materialised.
    One reshape: this runs on every call, where each op costs microseconds.
    """
    n = len(node_shape)
    shape = (1,) * (n + 1 - x.dim()) + tuple(x.shape)
    k, node = shape[0], shape[1:]
    if n == 0:
        return x.reshape(k, 1, 1, 1)
    if n == 1:  # a vector per node: let the long dim be the contiguous S
        return x.reshape(k, 1, 1, node[0])
    sp, full_sp = node[2:], tuple(node_shape[2:])
    if sp != full_sp and any(d != 1 for d in sp):
        x = x.reshape(shape).expand(k, node[0], node[1], *full_sp)
        sp = full_sp
    return x.reshape(k, node[0], node[1], math.prod(sp))


def full4(x1: torch.Tensor, x2: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int, int]:
    """The output shape ``(K, B, C, S)`` of canonical operands and weights ``[K, 6]``."""
    # Broadcasting, not max(): a size-1 dim against a size-0 dim gives 0.
    dims = [x2.shape[d] if x1.shape[d] == 1 else x1.shape[d] for d in (1, 2, 3)]
    return (w.shape[0], *dims)
