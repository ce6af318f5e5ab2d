"""RoutedConv2d / RoutedBottleneck / RoutedBasicBlock: kernel path == reference path."""
import copy

import pytest
import torch
from torch import nn

from fastmod import _extension
from fastmod.nn import RoutedBasicBlock, RoutedBottleneck, RoutedConv2d

needs_ext = pytest.mark.skipif(not _extension.has_op("routed_conv2d"), reason="fastmod._C not built")


def gates_for(n, g, kind="random"):
    if kind == "nonbinary":
        return torch.rand(n, g) * (torch.rand(n, g) < 0.6)
    gates = (torch.rand(n, g) < 0.5).float()
    gates[0] = 1.0
    gates[-1, : g // 2] = 0.0
    return gates


def compare(fast, x, gates, train):
    ref = copy.deepcopy(fast)
    ref.use_kernels = False
    assert fast.state_dict().keys() == ref.state_dict().keys()
    fast.train(train), ref.train(train)
    outs = []
    for m in (fast, ref):
        xx, gg = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
        y = m(xx, gg)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device))
        outs.append((y.detach(), xx.grad, gg.grad, {k: p.grad for k, p in m.named_parameters()}))
    (y, gx, gg, gp), (yr, gxr, ggr, gpr) = outs
    def close(a, b, what):  # float32 rounding grows with the tensor's magnitude
        atol = 2e-4 * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=atol, rtol=2e-4, msg=lambda m: f"{what}: {m}")
    close(y, yr, "output")
    close(gx, gxr, "grad x")
    close(gg, ggr, "grad gates")
    for k in gpr:
        close(gp[k], gpr[k], k)
    # running statistics were updated the same way
    for (k, b), br in zip(fast.named_buffers(), ref.buffers()):
        close(b, br, k)


@needs_ext
@pytest.mark.parametrize("gate_on,groups,blocks", [("group", 4, 4), ("out", 1, 8), ("in", 1, 2)])
def test_routed_conv2d_module(gate_on, groups, blocks):
    m = RoutedConv2d(8, 8, 3, stride=2, padding=1, groups=groups, gate_on=gate_on, num_blocks=blocks)
    plain = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=groups)
    assert m.state_dict().keys() == plain.state_dict().keys()
    m.load_state_dict(plain.state_dict())
    x = torch.randn(3, 8, 9, 9)
    compare(m, x, gates_for(3, blocks, "nonbinary"), train=True)
    # all gates on with value 1: exactly the plain conv
    torch.testing.assert_close(m(x, torch.ones(3, blocks)), plain(x), atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("norm3,stride,in_ch", [("gn", 1, 32), ("bn", 2, 16)])
def test_bottleneck(train, norm3, stride, in_ch):
    torch.manual_seed(0)
    block = RoutedBottleneck(in_ch, 16, 32, cardinality=4, stride=stride, norm3=norm3)
    for p in block.parameters():  # non-trivial affine norms
        if p.dim() == 1:
            nn.init.uniform_(p, 0.5, 1.5)
    if not train:  # non-trivial running statistics
        block.train()
        with torch.no_grad():
            block(torch.randn(4, in_ch, 8, 8), torch.ones(4, 4))
    compare(block, torch.randn(4, in_ch, 8, 8), gates_for(4, 4), train)


@needs_ext
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("stride,in_ch", [(1, 8), (2, 4)])
def test_basic_block(train, stride, in_ch):
    block = RoutedBasicBlock(in_ch, 8, stride=stride)
    compare(block, torch.randn(3, in_ch, 8, 8), gates_for(3, 8), train)


def test_use_kernels_propagates_and_state_dict():
    block = RoutedBottleneck(16, 16, 16, cardinality=4)
    sd = {k: v.clone() for k, v in block.state_dict().items()}
    block.use_kernels = False
    assert all(not c.use_kernels for c in (block.conv1, block.conv2, block.conv3))
    assert block.backend == "reference" and block.conv2.backend == "reference"
    assert sd.keys() == block.state_dict().keys()


def test_off_branch_contributes_nothing():
    torch.manual_seed(0)
    block = RoutedBottleneck(16, 16, 16, cardinality=4, use_kernels=False).eval()
    x = torch.randn(2, 16, 6, 6)
    g = torch.tensor([[1.0, 0, 1, 0], [1.0, 0, 1, 0]])
    y1 = block(x, g)
    with torch.no_grad():  # scrambling an off branch's weights changes nothing
        block.conv2.weight[4:8].normal_()
        block.conv3.weight[:, 4:8].normal_()
    torch.testing.assert_close(block(x, g), y1)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(gate_on="group", groups=2, num_blocks=4), ValueError, "num_blocks"),
    (dict(gate_on="out", groups=2), ValueError, "groups=1"),
    (dict(gate_on="out", num_blocks=3), ValueError, "num_blocks"),
    (dict(gate_on="sideways"), ValueError, "gate_on"),
    (dict(padding_mode="reflect"), ValueError, "padding_mode"),
    (dict(padding="same"), TypeError, "padding"),
])
def test_bad_module_args(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        RoutedConv2d(8, 8, 3, **kwargs)


@needs_ext
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("norm3,momentum", [("gn", 0.1), ("bn", None)])
def test_bottleneck_fused_norms(monkeypatch, train, norm3, momentum):
    """router_grad="active": the kernel path fuses BN+ReLU over the active branches
    (and GN + shortcut + ReLU) and still equals the reference path everywhere."""
    from fastmod.ops import fused_norm
    calls = {"bn": 0, "gn": 0}
    for name, key in (("routed_batch_norm_relu", "bn"), ("group_norm_add_relu", "gn")):
        real = getattr(fused_norm, name)

        def counted(*a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)
        monkeypatch.setattr(fused_norm, name, counted)
    # Passes without autograd take conv3 and its GN epilogue in one fused op.
    from fastmod.nn import routed_conv as nn_routed
    real_conv_gn = nn_routed.routed_conv2d_group_norm_add_relu

    def counted_conv_gn(*a, **k):
        calls["gn"] += 1
        return real_conv_gn(*a, **k)
    monkeypatch.setattr(nn_routed, "routed_conv2d_group_norm_add_relu", counted_conv_gn)
    torch.manual_seed(1)
    block = RoutedBottleneck(32, 16, 32, cardinality=4, norm3=norm3, router_grad="active")
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    for p in block.parameters():
        if p.dim() == 1:
            nn.init.uniform_(p, 0.5, 1.5)
    if not train:
        block.train()
        with torch.no_grad():
            block(torch.randn(4, 32, 8, 8), torch.ones(4, 4))
    compare(block, torch.randn(4, 32, 8, 8), gates_for(4, 4, "nonbinary"), train)
    assert calls["bn"] == 2 * (1 + (not train))  # the warm-up pass above also ran fused
    assert calls["gn"] == (norm3 == "gn") * (1 + (not train))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("norm3", ["gn", "bn"])
def test_bottleneck_cuda_fused_norms(train, norm3):
    """On CUDA the fused epilogues are Triton kernels; same check as above."""
    from fastmod.ops import fused_norm
    torch.manual_seed(1)
    block = RoutedBottleneck(32, 16, 32, cardinality=4, norm3=norm3, router_grad="active").cuda()
    x = torch.randn(4, 32, 8, 8, device="cuda")
    assert fused_norm.has_kernel(x)
    compare(block, x, gates_for(4, 4, "nonbinary").cuda(), train)


@needs_ext
def test_bottleneck_exact_router_grad_keeps_plain_bn(monkeypatch):
    """With exact router gradients the off branches' BN outputs matter: no routed BN."""
    from fastmod.ops import fused_norm
    monkeypatch.setattr(fused_norm, "routed_batch_norm_relu", lambda *a, **k: pytest.fail("routed BN used"))
    block = RoutedBottleneck(16, 16, 16, cardinality=4)
    x, g = torch.randn(2, 16, 6, 6), gates_for(2, 4).requires_grad_(True)
    block(x, g).sum().backward()
    assert g.grad is not None
    with torch.no_grad():  # no autograd: the routed BN is fine again
        monkeypatch.undo()
        block(x, g)


@needs_ext
def test_bottleneck_compiles_fullgraph():
    """The fused-norm kernel path (running-stat updates included) traces with no graph break."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = RoutedBottleneck(32, 16, 32, cardinality=4, router_grad="active")
    ref = copy.deepcopy(block)
    x, g = torch.randn(4, 32, 8, 8), gates_for(4, 4)
    xs = x.clone().requires_grad_(True)
    y = torch.compile(block, fullgraph=True)(xs, g)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), ref(x, g), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block.bn1.running_var, ref.bn1.running_var)
    assert xs.grad is not None and block.bn1.weight.grad is not None


@needs_ext
def test_bottleneck_inference_compiles_fullgraph():
    """Eval without autograd (the whole-block op routed_bottleneck_gn) traces too."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = RoutedBottleneck(32, 16, 32, cardinality=4).eval()
    x, g = torch.randn(4, 32, 8, 8), gates_for(4, 4)
    with torch.no_grad():
        y = torch.compile(block, fullgraph=True)(x, g)
        block.use_kernels = False
        torch.testing.assert_close(y, block(x, g), atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("train", [True, False])
def test_bottleneck_no_grad_in_place_epilogues(train):
    """Under no_grad the fused epilogues overwrite the conv outputs: same result."""
    torch.manual_seed(2)
    block = RoutedBottleneck(32, 16, 32, cardinality=4).train(train)
    ref = copy.deepcopy(block)
    ref.use_kernels = False
    x, g = torch.randn(4, 32, 8, 8), gates_for(4, 4)
    x0 = x.clone()
    with torch.no_grad():
        y, yr = block(x, g), ref(x, g)
    torch.testing.assert_close(y, yr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x, x0, rtol=0, atol=0)  # the block's input is untouched
    for (k, b), br in zip(block.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, br, atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
