"""Gradients of the Triton routed convolution (every gate mode).

Built from the forward kernel itself and the dense vendor gradients:

* grad_x, stride 1: the transposed convolution is a convolution of dy with the
  weight transposed (per group) and flipped, padding dil*(k-1) - pad, so the same
  kernels skip the off blocks: "out" gates make it an "in"-gated conv over dy's
  channels (the off output blocks are never read), "in" gates an "out"-gated conv
  (the off input channels are never computed, left zero), "group" gates a
  group-gated conv again.  Other strides (or padding larger
  than dil*(k-1)): the dense vendor grad_input of the gated dy.
* grad_weight: the dense vendor grad_weight of the gated operand (dy for "out" and
  "group", x for "in"); off blocks contribute zeros, not skipped work.  "group" can
  take ``wgrad`` instead (``routed_conv_group_wgrad_kernel``: only the active pairs,
  the gate applied as dy is read, so no gated copy of dy is made).
* grad_gates: for on blocks, from the saved output ("out"/"group": out = g * u) or from
  grad_x ("in": dx = g * dxu), divided by the gate; for off blocks,
  ``exact=True`` runs the kernel once more with the off blocks switched on (the
  "exact" router gradient's documented cost), ``exact=False`` gives zero.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.nn.grad import conv2d_input, conv2d_weight

from fastmod.ops.routed_conv import _block_scale


def _block_dot(a: torch.Tensor, b: torch.Tensor, G: int) -> torch.Tensor:
    """[N, C, H, W] x 2 -> [N, G]: <a, b> over each block of C // G channels and all
    pixels, in fp32."""
    n, c = a.shape[:2]
    return (a.float() * b.float()).sum((2, 3)).view(n, G, c // G).sum(2)


def _flipped_padding(weight, padding, dilation):
    """Padding of the stride-1 transposed conv as a conv, or None when negative."""
    pads = [dilation[i] * (weight.shape[2 + i] - 1) - padding[i] for i in range(2)]
    return pads if min(pads) >= 0 else None


def _transposed_flipped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight of the stride-1 transposed conv written as a conv: per group,
    [Cout_g, Cin_g, kh, kw] -> [Cin_g, Cout_g, kh, kw], flipped in both taps."""
    cout, cin_g, kh, kw = weight.shape
    w = weight.reshape(groups, cout // groups, cin_g, kh, kw).transpose(1, 2)
    return w.reshape(groups * cin_g, cout // groups, kh, kw).flip(2, 3)


def _on_gate_grad(sums: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """sums[n, b] = g * <dy, u> on on-blocks -> <dy, u>; 0 where g == 0."""
    g = gates.float()
    return torch.where(g != 0, sums / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(g))


def routed_conv2d_triton_backward(fwd: Callable, grad, x, weight, gates, bias, out, stride, padding, dilation,
                                  gate_on: str, exact: bool, tf32: bool, need, wgrad: Callable | None = None):
    """(gx, gw, gg, gb), each None unless asked for by ``need`` = (x, weight, gates,
    bias).  ``fwd`` is the forward op (routed_conv2d_triton's signature); ``wgrad``,
    when given, the grouped conv's active-pairs weight gradient
    (routed_conv2d_triton_group_wgrad's signature), used for gate_on="group"."""
    need_x, need_w, need_g, need_b = need
    Cout, G = weight.shape[0], gates.shape[1]
    groups = G if gate_on == "group" else 1
    one = [1, 1]
    off = (gates == 0).to(gates.dtype)  # the off blocks switched on, for "exact"
    pads = _flipped_padding(weight, padding, dilation) if list(stride) == one else None
    w_flip = _transposed_flipped(weight, groups) if pads is not None and (need_x or gate_on == "in") else None
    gx = gw = gg = gb = None
    if gate_on in ("out", "group"):  # y = g * (conv + bias) on the output blocks
        active_wgrad = wgrad is not None and gate_on == "group"
        # dy gated, exactly zero on off blocks: for the vendor gradients only
        dy_g = None if active_wgrad and (pads is not None or not need_x) else \
            grad * _block_scale(gates, Cout, grad.dtype)
        if need_b:
            gb = dy_g.sum((0, 2, 3)) if dy_g is not None else \
                (grad.sum((2, 3), keepdim=True, dtype=torch.float32) *
                 _block_scale(gates, Cout, torch.float32)).sum((0, 2, 3)).to(grad.dtype)
        if need_w and active_wgrad:
            gw = wgrad(x, grad, gates, list(weight.shape), list(stride), list(padding), list(dilation), tf32)
        elif need_w:
            gw = conv2d_weight(x, weight.shape, dy_g, stride, padding, dilation, groups)
        if need_x and pads is not None:
            # "out": an "in"-gated conv over dy's channels; "group": the same groups, gated
            gx = fwd(grad, w_flip, gates, None, one, pads, list(dilation), "in" if groups == 1 else "group", True,
                     tf32)
        elif need_x:
            gx = conv2d_input(x.shape, weight, dy_g, stride, padding, dilation, groups)
        if need_g:
            gg = _on_gate_grad(_block_dot(grad, out, G), gates)
            if exact:
                u_off = fwd(x, weight, off, bias, list(stride), list(padding), list(dilation), gate_on, True, tf32)
                gg = gg + _block_dot(grad, u_off, G)
    else:  # "in": y = conv(x * g, W) + bias
        Cin = x.shape[1]
        if need_b:
            gb = grad.sum((0, 2, 3))
        if need_w:
            gw = conv2d_weight(x * _block_scale(gates, Cin, x.dtype), weight.shape, grad, stride, padding, dilation)
        if need_x or need_g:
            if pads is not None:  # dx = g * dxu on on-blocks, zero elsewhere
                gx = fwd(grad, w_flip, gates, None, one, pads, list(dilation), "out", True, tf32)
                dxu_off = fwd(grad, w_flip, off, None, one, pads, list(dilation), "out", True, tf32) \
                    if need_g and exact else None
            else:
                dxu = conv2d_input(x.shape, weight, grad, stride, padding, dilation)
                gx = dxu * _block_scale(gates, Cin, dxu.dtype)
                dxu_off = dxu * _block_scale(off, Cin, dxu.dtype) if need_g and exact else None
            if need_g:
                gg = _on_gate_grad(_block_dot(x, gx, G), gates)
                if dxu_off is not None:
                    gg = gg + _block_dot(x, dxu_off, G)
    if gg is not None:
        gg = gg.to(gates.dtype)
    return gx if need_x else None, gw, gg, gb  # ("in" computes gx for the gates' gradient too)
