"""A whole routed ResNeXt bottleneck (GroupNorm closing it) in one op, for inference.

``routed_bottleneck_gn(x, gates, conv1_weight, bn1_scale, bn1_shift, conv2_weight,
bn2_scale, bn2_shift, conv3_weight, residual, num_groups, gn_weight=None,
gn_bias=None, eps=1e-5, *, backend=None)`` computes, with G = gates.shape[1]::

    y1 = relu(bn1_scale * routed_conv2d(x, conv1_weight, gates, gate_on="out") + bn1_shift)
    y2 = relu(bn2_scale * routed_conv2d(y1, conv2_weight, gates, padding=k // 2, groups=G,
                                        gate_on="group") + bn2_shift)
    out = relu(group_norm(routed_conv2d(y2, conv3_weight, gates, gate_on="in"),
                          num_groups, gn_weight, gn_bias, eps) + residual)

(scales and shifts broadcast over [N, width, H, W]): ``RoutedBottleneck`` with
stride 1 and ``norm3="gn"`` in eval mode, its BatchNorms folded into a per-channel
scale and shift (scale = weight / sqrt(running_var + eps), shift = bias -
running_mean * scale), which is how that module calls it.

Shapes: x [N, Cin, H, W]; gates [N, G]; conv1_weight [width, Cin, 1, 1];
conv2_weight [width, width / G, k, k], k odd; conv3_weight [Cout, width, 1, 1];
bn*_scale / bn*_shift [width]; residual [N, Cout, H, W]; gn_weight / gn_bias
[Cout] or None; num_groups | Cout.  Output [N, Cout, H, W] in x's dtype.

Why: a gated-off block's rows of y1 and y2 are never read (conv2's block g reads
only y1's block g and is itself off; conv3 skips off input blocks).  The fused CPU
kernel (csrc/routed_bottleneck/) neither computes nor writes them, not even as
zeros, and runs each active block's BatchNorm + ReLU on its rows while they are in
cache; the unfused ops write both activations in full.

It is an inference kernel (no backward).  When autograd needs the result (grad
mode on and any input requiring grad), and for other devices and dtypes, the call
runs the same arithmetic as separate differentiable ops (``routed_conv2d``, the
affine + ReLU in PyTorch, ``routed_conv2d_group_norm_add_relu``), each on its own
backend.  ``backend="reference"`` or ``FASTMOD_KERNELS=0`` runs the reference
(dense convs and masks).  Backends: ``"cpu"`` (fastmod._C, float32) and
``"reference"``.
"""
from __future__ import annotations

import functools

import torch

from fastmod import _checks, _extension, backends
from fastmod.ops import fused_norm
from fastmod.ops import routed_conv as _routed_conv
from fastmod.ops.routed_conv import routed_conv2d, routed_conv2d_reference
from fastmod.ops.routed_conv_gn import (_needs_grad, routed_conv2d_group_norm_add_relu,
                                        routed_conv2d_group_norm_add_relu_reference)

_OP = "routed_bottleneck_gn"


def _check(x, gates, conv1_weight, bn1_scale, bn1_shift, conv2_weight, bn2_scale, bn2_shift, conv3_weight,
           residual):
    """The checks the three convs' own ones do not make; returns conv2's kernel size."""
    named = dict(x=x, gates=gates, conv1_weight=conv1_weight, bn1_scale=bn1_scale, bn1_shift=bn1_shift,
                 conv2_weight=conv2_weight, bn2_scale=bn2_scale, bn2_shift=bn2_shift,
                 conv3_weight=conv3_weight, residual=residual)
    for name, t in named.items():
        _checks.tensor(name, t)
    for name in ("conv1_weight", "conv2_weight", "conv3_weight"):
        if named[name].dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(named[name].shape)}")
    k = conv2_weight.shape[2]
    if conv2_weight.shape[3] != k or k % 2 == 0:
        raise ValueError(f"conv2_weight must be [width, width / G, k, k] with k odd, "
                         f"got shape {tuple(conv2_weight.shape)}")
    for name in ("conv1_weight", "conv3_weight"):
        if tuple(named[name].shape[2:]) != (1, 1):
            raise ValueError(f"{name} must be a 1x1 kernel, got shape {tuple(named[name].shape)}")
    width = conv1_weight.shape[0]
    for name in ("bn1_scale", "bn1_shift", "bn2_scale", "bn2_shift"):
        if tuple(named[name].shape) != (width,):
            raise ValueError(f"{name} must be [{width}] (conv1's output channels), got {tuple(named[name].shape)}")
    _checks.same_dtype(**{n: t for n, t in named.items() if n != "gates"})
    _checks.same_device(**named)
    return k


def _composed(x, gates, conv1_weight, bn1_scale, bn1_shift, conv2_weight, bn2_scale, bn2_shift, conv3_weight,
              residual, num_groups, gn_weight, gn_bias, eps, conv, closing):
    """The op as separate ops: ``conv`` for conv1 and conv2, ``closing`` for conv3 + GN."""
    G, k = gates.shape[1], conv2_weight.shape[2]

    def bn_relu(y, scale, shift):
        return torch.relu(y * scale[:, None, None] + shift[:, None, None])

    y = bn_relu(conv(x, conv1_weight, gates, gate_on="out"), bn1_scale, bn1_shift)
    y = bn_relu(conv(y, conv2_weight, gates, padding=k // 2, groups=G, gate_on="group"), bn2_scale, bn2_shift)
    return closing(y, conv3_weight, gates, residual, num_groups, gn_weight, gn_bias, eps)


def routed_bottleneck_gn_reference(
        x: torch.Tensor, gates: torch.Tensor, conv1_weight: torch.Tensor, bn1_scale: torch.Tensor,
        bn1_shift: torch.Tensor, conv2_weight: torch.Tensor, bn2_scale: torch.Tensor, bn2_shift: torch.Tensor,
        conv3_weight: torch.Tensor, residual: torch.Tensor, num_groups: int, gn_weight: torch.Tensor | None = None,
        gn_bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch (dense convs and masks); see the module docstring."""
    _check(x, gates, conv1_weight, bn1_scale, bn1_shift, conv2_weight, bn2_scale, bn2_shift, conv3_weight, residual)
    return _composed(x, gates, conv1_weight, bn1_scale, bn1_shift, conv2_weight, bn2_scale, bn2_shift,
                     conv3_weight, residual, num_groups, gn_weight, gn_bias, eps, routed_conv2d_reference,
                     routed_conv2d_group_norm_add_relu_reference)


def routed_bottleneck_gn(
        x: torch.Tensor, gates: torch.Tensor, conv1_weight: torch.Tensor, bn1_scale: torch.Tensor,
        bn1_shift: torch.Tensor, conv2_weight: torch.Tensor, bn2_scale: torch.Tensor, bn2_shift: torch.Tensor,
        conv3_weight: torch.Tensor, residual: torch.Tensor, num_groups: int, gn_weight: torch.Tensor | None = None,
        gn_bias: torch.Tensor | None = None, eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """The routed bottleneck's inference forward in one op; see the module docstring
    for the formula, shapes, dtypes and when the fused kernel runs.

    Raises ValueError/TypeError naming the bad argument.
    """
    tensors = (x, gates, conv1_weight, bn1_scale, bn1_shift, conv2_weight, bn2_scale, bn2_shift, conv3_weight,
               residual)
    k = _check(*tensors)
    args = tensors + (num_groups, gn_weight, gn_bias, eps)
    chosen = backends.select(_OP, backend, x.device, ("cpu",), cpp_op=_OP)
    if backend == "reference" or not backends.kernels_enabled():
        return routed_bottleneck_gn_reference(*args)
    floats = all(t is None or t.dtype == torch.float32 for t in (x, *tensors[2:], gn_weight, gn_bias))
    if chosen != "cpu" or not floats or _needs_grad(*tensors, gn_weight, gn_bias):
        return _composed(*args, functools.partial(routed_conv2d, backend=backend),
                         functools.partial(routed_conv2d_group_norm_add_relu, backend=backend))
    # The fused kernel: the argument checks of the ops it replaces, on shape-only probes
    # of the inner activations.
    N, _, H, W = x.shape
    width, G = conv1_weight.shape[0], gates.shape[1]
    inner = x.new_empty(()).expand(N, width, H, W)
    for name, (inp, weight, pad, groups, mode) in {
            "conv1_weight": (x, conv1_weight, 0, 1, "out"),
            "conv2_weight": (inner, conv2_weight, k // 2, G, "group"),
            "conv3_weight": (inner, conv3_weight, 0, 1, "in")}.items():
        try:
            _routed_conv._check(inp, weight, gates, None, 1, pad, 1, groups, mode, None)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None
    probe = x.new_empty(()).expand(N, conv3_weight.shape[0], H, W)
    eps = fused_norm._check_gn_add_relu(probe, residual, num_groups, gn_weight, gn_bias, eps)
    gw, gb = fused_norm._affine_or_default(probe, gn_weight, gn_bias)
    return torch.ops.fastmod.routed_bottleneck_gn(x, gates, conv1_weight, bn1_scale, bn1_shift, conv2_weight,
                                                  bn2_scale, bn2_shift, conv3_weight, residual, num_groups, gw,
                                                  gb, eps)


if _extension.has_op(_OP):

    @torch.library.register_fake("fastmod::" + _OP)
    def _fake(x, gates, conv1_weight, bn1_scale, bn1_shift, conv2_weight, bn2_scale, bn2_shift, conv3_weight,
              residual, num_groups, gn_weight, gn_bias, eps):
        return x.new_empty((x.shape[0], conv3_weight.shape[0], x.shape[2], x.shape[3]))
