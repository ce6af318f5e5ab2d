"""Routed convolution modules (QGMRN): ``RoutedConv2d`` and the two routed residual
blocks, BRN's ``RoutedBottleneck`` (ResNeXt) and FRN's ``RoutedBasicBlock`` (ResNet).

Every module has ``use_kernels`` (setting it on a block sets it on its routed convs):
True runs ``fastmod.ops.routed_conv2d`` on its kernel backend, which skips gated-off
blocks; False runs the reference (dense convs, masked).  Both compute the same
function, and the state dict does not depend on it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastmod.nn._norm_args import batch_norm_args, folded_batch_norm
from fastmod.nn._switch import KernelSwitch
from fastmod.ops import fused_norm
from fastmod.ops.routed_conv import GATE_MODES, ROUTER_GRADS, routed_conv2d
from fastmod.ops.routed_bottleneck import routed_bottleneck_gn
from fastmod.ops.routed_conv_gn import routed_conv2d_group_norm_add_relu
from fastmod import _checks


class RoutedConv2d(KernelSwitch, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` (same constructor arguments, parameters and state dict)
    whose blocks are switched per sample: ``forward(x, gates)``.

    Extra keyword arguments: ``gate_on`` ("group", "out" or "in", see
    ``fastmod.ops.routed_conv2d``), ``num_blocks`` G (default: ``groups`` for "group",
    ``out_channels`` for "out", ``in_channels`` for "in"), ``router_grad`` ("exact",
    "active" or None = exact) and ``use_kernels``.

    x [N, in_channels, H, W], gates [N, G] floating -> [N, out_channels, Ho, Wo].
    Only ``padding_mode="zeros"`` and integer padding are supported.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 gate_on: str = "group", num_blocks: int | None = None, router_grad: str | None = None,
                 use_kernels: bool = True):
        _checks.choice("gate_on", gate_on, GATE_MODES)
        _checks.choice("router_grad", router_grad, ROUTER_GRADS)
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' for RoutedConv2d, got {padding_mode!r}")
        if isinstance(padding, str):
            raise TypeError("padding must be an int or a pair of ints for RoutedConv2d (no string padding)")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        default = {"group": groups, "out": out_channels, "in": in_channels}[gate_on]
        num_blocks = default if num_blocks is None else num_blocks
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if gate_on == "group" and num_blocks != groups:
            raise ValueError(f"gate_on='group' needs num_blocks == groups, got {num_blocks} and {groups}")
        if gate_on in ("out", "in") and groups != 1:
            raise ValueError(f"gate_on={gate_on!r} needs groups=1, got groups={groups}")
        channels = out_channels if gate_on == "out" else in_channels
        if channels % num_blocks:
            raise ValueError(f"num_blocks={num_blocks} must divide the {channels} channels gated by "
                             f"gate_on={gate_on!r}")
        self.gate_on, self.num_blocks, self.router_grad = gate_on, num_blocks, router_grad
        self.use_kernels = use_kernels

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return routed_conv2d(x, self.weight, gates, self.bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, groups=self.groups, gate_on=self.gate_on,
                             router_grad=self.router_grad, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gate_on={self.gate_on!r}, num_blocks={self.num_blocks}"


class _RoutedBlock(KernelSwitch, nn.Module):
    """``use_kernels`` of a block propagates to its routed convolutions."""

    @property
    def use_kernels(self) -> bool:
        return self.__dict__.get("_use_kernels", True)

    @use_kernels.setter
    def use_kernels(self, value: bool) -> None:
        self.__dict__["_use_kernels"] = bool(value)
        for m in self.modules():
            if isinstance(m, RoutedConv2d):
                m.use_kernels = bool(value)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class RoutedBottleneck(_RoutedBlock):
    """BRN's routed ResNeXt bottleneck; one gate per branch (cardinality branches).

    1x1 conv (out-gated) -> BN -> ReLU -> 3x3 grouped conv, ``stride`` (group-gated)
    -> BN -> ReLU -> 1x1 conv (in-gated) -> GroupNorm (``norm3="gn"``, the paper's
    best BRN; min(32, ...) groups dividing out_ch) or BN (``"bn"``) -> + shortcut
    (identity, or 1x1 conv + BN when the shape changes) -> ReLU.

    ``forward(x [N, in_ch, H, W], gates [N, cardinality])`` -> [N, out_ch, H/stride, W/stride].
    A branch whose gate is 0 adds nothing to the sum (its 3x3 output is zero and the
    closing conv skips its channels); the kernel path does not compute it at all.

    Where the fused norm kernels run (``fastmod.ops.fused_norm``: C++ on the CPU
    for float32, Triton on CUDA for float32/float16/bfloat16), the kernel path
    also fuses the epilogues: BN + ReLU over the gated-on branches only
    (``routed_batch_norm_relu``) and GroupNorm + shortcut + ReLU in one pass
    (``group_norm_add_relu``, ``norm3="gn"``).  The routed BN leaves the off
    branches' activations at zero instead of relu(BN(0)), which nothing downstream
    reads except the exact router gradient of off branches, so it is used only when
    that gradient is not needed: ``router_grad="active"``, or gates that do not
    require grad, or no autograd.  Without autograd on the CPU, the closing conv
    and the GroupNorm epilogue run as one op
    (``fastmod.ops.routed_conv2d_group_norm_add_relu``), so conv3's full-size
    output is never written out and read back; with stride 1 and the BatchNorms in
    eval mode the whole block is one op (``fastmod.ops.routed_bottleneck_gn``), which
    does not write the off branches' inner activations at all.
    """

    def __init__(self, in_ch: int, width: int, out_ch: int, cardinality: int, stride: int = 1,
                 norm3: str = "gn", router_grad: str | None = None, use_kernels: bool = True):
        super().__init__()
        _checks.choice("norm3", norm3, ("gn", "bn"))
        if width % cardinality:
            raise ValueError(f"cardinality={cardinality} must divide width={width}")
        c = cardinality
        self.cardinality = c
        self.conv1 = RoutedConv2d(in_ch, width, 1, bias=False, gate_on="out", num_blocks=c,
                                  router_grad=router_grad)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = RoutedConv2d(width, width, 3, stride, 1, groups=c, bias=False, gate_on="group",
                                  router_grad=router_grad)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = RoutedConv2d(width, out_ch, 1, bias=False, gate_on="in", num_blocks=c,
                                  router_grad=router_grad)
        self.bn3 = nn.GroupNorm(math.gcd(32, out_ch), out_ch) if norm3 == "gn" else nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.use_kernels = use_kernels

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        fused = self.backend != "reference" and fused_norm.has_kernel(x)
        # short-circuits: in training x requires grad, so the parameters are not walked
        grad = torch.is_grad_enabled() and (x.requires_grad or gates.requires_grad
                                            or any(p.requires_grad for p in self.parameters()))
        exact = self.conv1.router_grad != "active" and gates.requires_grad and torch.is_grad_enabled()
        routed_bn = fused and not exact
        if fused and not grad and x.device.type == "cpu" and isinstance(self.bn3, nn.GroupNorm):
            whole = self._whole_block(x, gates)
            if whole is not None:
                return whole
        # Without autograd the epilogues overwrite the conv outputs (fresh temporaries).
        y = self._bn_relu(self.bn1, self.conv1(x, gates), gates, routed_bn, not grad)
        y = self._bn_relu(self.bn2, self.conv2(y, gates), gates, routed_bn, not grad)
        if fused and isinstance(self.bn3, nn.GroupNorm):
            gn = self.bn3
            if not grad and x.device.type == "cpu":
                # Inference: conv3 and its epilogue in one pass (conv3's output never
                # goes to memory); float32 runs the fused kernel, anything else its parts.
                return routed_conv2d_group_norm_add_relu(y, self.conv3.weight, gates, self.shortcut(x),
                                                         gn.num_groups, gn.weight, gn.bias, gn.eps,
                                                         backend=self.backend)
            return fused_norm.group_norm_add_relu(self.conv3(y, gates), self.shortcut(x), gn.num_groups,
                                                  gn.weight, gn.bias, gn.eps, inplace=not grad)
        y = self.conv3(y, gates)
        return torch.relu_(self.bn3(y) + self.shortcut(x))

    def _whole_block(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor | None:
        """Inference with stride 1 and BatchNorms on running statistics: the whole
        block as one op (``routed_bottleneck_gn``: the inner activations' off blocks
        are never written); None when those conditions do not hold."""
        bn1, bn2 = folded_batch_norm(self.bn1), folded_batch_norm(self.bn2)
        if bn1 is None or bn2 is None or self.conv2.stride != (1, 1):
            return None
        gn = self.bn3
        return routed_bottleneck_gn(x, gates, self.conv1.weight, *bn1, self.conv2.weight, *bn2, self.conv3.weight,
                                    self.shortcut(x), gn.num_groups, gn.weight, gn.bias, gn.eps,
                                    backend=self.backend)

    @staticmethod
    def _bn_relu(bn: nn.BatchNorm2d, y: torch.Tensor, gates: torch.Tensor, routed: bool,
                 inplace: bool) -> torch.Tensor:
        if routed:
            return fused_norm.routed_batch_norm_relu(y, gates, **batch_norm_args(bn), inplace=inplace)
        # ReLUs in place, as torchvision's blocks do (BN's backward does not need its output).
        return torch.relu_(bn(y))


class RoutedBasicBlock(_RoutedBlock):
    """FRN's routed ResNet basic block: 3x3 conv, ``stride`` -> BN -> ReLU -> 3x3 conv
    whose filters are gated (one gate per output channel) -> BN -> + shortcut -> ReLU.

    ``forward(x [N, in_ch, H, W], gates [N, planes])`` -> [N, planes, H/stride, W/stride].
    """

    def __init__(self, in_ch: int, planes: int, stride: int = 1, router_grad: str | None = None,
                 use_kernels: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = RoutedConv2d(planes, planes, 3, 1, 1, bias=False, gate_on="out", num_blocks=planes,
                                  router_grad=router_grad)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_ch, planes, stride)
        self.use_kernels = use_kernels

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        y = torch.relu_(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y, gates))
        return torch.relu_(y + self.shortcut(x))
