"""The closing conv of a routed ResNeXt bottleneck fused with its epilogue.

``routed_conv2d_group_norm_add_relu(x, weight, gates, residual, num_groups,
gn_weight=None, gn_bias=None, eps=1e-5, *, padding=0, router_grad=None, backend=None)``
    ``relu(F.group_norm(routed_conv2d(x, weight, gates, padding=padding,
    gate_on="in"), num_groups, gn_weight, gn_bias, eps) + residual)``: the
    in-gated conv (stride 1, no conv bias, "same" padding) followed by
    ``group_norm_add_relu``.  ``x`` [N, Cin, H, W]; ``weight`` [Cout, Cin, k, k]
    with k odd and padding = (k - 1) / 2; ``gates`` [N, G], G | Cin;
    ``residual`` [N, Cout, H, W]; ``gn_weight``/``gn_bias`` [Cout] or None;
    ``num_groups`` | Cout.  Output [N, Cout, H, W] in x's dtype.

Why: at low gate density the conv reads a few input channels but writes a
full-size output that the GroupNorm pass reads straight back.  The fused CPU
kernel (csrc/routed_conv_gn/) computes each (sample, norm group) block of output
rows with the routed conv's direct kernels and normalises, adds and rectifies it
while it is in cache, so that tensor never makes the round trip to memory.

It is an inference kernel (no backward): when autograd needs the result (grad
mode on and any input requiring grad), and on other devices and dtypes, the call
runs the two ops it fuses instead (``routed_conv2d`` then
``group_norm_add_relu``, each picking its own backend), which give every
gradient; ``backend="reference"`` or ``FASTMOD_KERNELS=0`` runs their references.
Backends: ``"cpu"`` (fastmod._C, float32 CPU tensors) and ``"reference"``.
"""
from __future__ import annotations

import torch

from fastmod import _checks, _extension, backends
from fastmod.ops import fused_norm
from fastmod.ops import routed_conv as _routed_conv
from fastmod.ops.fused_norm import group_norm_add_relu, group_norm_add_relu_reference
from fastmod.ops.routed_conv import routed_conv2d, routed_conv2d_reference

_OP = "routed_conv2d_gn_add_relu"


def _check(x, weight, residual, padding):
    """The constraints beyond those of the two ops it fuses; returns padding as an int."""
    _checks.tensor("x", x)
    _checks.tensor("weight", weight)
    if isinstance(padding, bool) or not isinstance(padding, int):
        raise TypeError(f"padding must be an int, got {type(padding).__name__}")
    if weight.dim() == 4:
        k = weight.shape[2]
        if weight.shape[3] != k or k % 2 == 0 or padding != (k - 1) // 2:
            raise ValueError(f"weight must be [Cout, Cin, k, k] with k odd and padding = (k - 1) / 2 "
                             f"('same' size), got shape {tuple(weight.shape)} and padding={padding}")
    _checks.tensor("residual", residual)
    return padding


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def routed_conv2d_group_norm_add_relu_reference(
        x: torch.Tensor, weight: torch.Tensor, gates: torch.Tensor, residual: torch.Tensor, num_groups: int,
        gn_weight: torch.Tensor | None = None, gn_bias: torch.Tensor | None = None, eps: float = 1e-5, *,
        padding: int = 0, router_grad: str | None = None) -> torch.Tensor:
    """Plain PyTorch: ``routed_conv2d_reference`` (gate_on="in") then
    ``group_norm_add_relu_reference``; see the module docstring."""
    padding = _check(x, weight, residual, padding)
    y = routed_conv2d_reference(x, weight, gates, padding=padding, gate_on="in", router_grad=router_grad)
    return group_norm_add_relu_reference(y, residual, num_groups, gn_weight, gn_bias, eps)


def routed_conv2d_group_norm_add_relu(
        x: torch.Tensor, weight: torch.Tensor, gates: torch.Tensor, residual: torch.Tensor, num_groups: int,
        gn_weight: torch.Tensor | None = None, gn_bias: torch.Tensor | None = None, eps: float = 1e-5, *,
        padding: int = 0, router_grad: str | None = None, backend: str | None = None) -> torch.Tensor:
    """Routed in-gated conv + GroupNorm + residual + ReLU; see the module docstring
    for shapes, dtypes and when the fused kernel runs.  ``router_grad`` is passed
    to ``routed_conv2d`` when autograd needs the result.

    Raises ValueError/TypeError naming the bad argument.
    """
    padding = _check(x, weight, residual, padding)
    chosen = backends.select(_OP, backend, x.device, ("cpu",), cpp_op=_OP)
    if backend == "reference" or not backends.kernels_enabled():
        return routed_conv2d_group_norm_add_relu_reference(x, weight, gates, residual, num_groups, gn_weight,
                                                           gn_bias, eps, padding=padding, router_grad=router_grad)
    floats = all(t is None or t.dtype == torch.float32 for t in (x, weight, residual, gn_weight, gn_bias))
    if chosen != "cpu" or not floats or _needs_grad(x, weight, gates, residual, gn_weight, gn_bias):
        # The two differentiable ops, each on its own best backend (they check every argument).
        y = routed_conv2d(x, weight, gates, padding=padding, gate_on="in", router_grad=router_grad,
                          backend=backend)
        return group_norm_add_relu(y, residual, num_groups, gn_weight, gn_bias, eps, backend=backend)
    # The fused kernel: the argument checks of the two ops it replaces.
    _routed_conv._check(x, weight, gates, None, 1, padding, 1, 1, "in", router_grad)
    probe = x.new_empty(()).expand(x.shape[0], weight.shape[0], *x.shape[2:])  # the conv output's shape
    eps = fused_norm._check_gn_add_relu(probe, residual, num_groups, gn_weight, gn_bias, eps)
    w, b = fused_norm._affine_or_default(probe, gn_weight, gn_bias)
    return torch.ops.fastmod.routed_conv2d_gn_add_relu(x, weight, gates, residual, [padding, padding],
                                                       num_groups, w, b, eps)


if _extension.has_op(_OP):

    @torch.library.register_fake("fastmod::" + _OP)
    def _fake(x, weight, gates, residual, padding, num_groups, gn_weight, gn_bias, eps):
        return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))
