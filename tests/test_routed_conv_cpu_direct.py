"""The CPU fp32 direct kernels of routed_conv2d (csrc/routed_conv/routed_conv_cpu_direct*).

They run for "same"-padded convolutions at any stride in float32 on CPUs with AVX-512
or AVX2 (other cases use the ATen path, which test_routed_conv.py covers too); strided
ones read a polyphase copy of x.  These shapes aim at the kernels' edges: more than 12
rows per job (row tails), pixel counts around the 16/32-lane tiles, tall and wide
images (tap masks at the borders), odd sizes at strides 2 and 3 (phase images past the
input), dilation, a 5x5 kernel (runtime tap count), non-binary gates, samples with every
block off.
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmod import _extension
from fastmod.ops import routed_conv2d, routed_conv2d_reference

from _routed_helpers import assert_weight_grad_matches, run_with_direct_setting

pytestmark = pytest.mark.skipif(not _extension.has_op("routed_conv2d"), reason="fastmod._C not built")

SHAPES = [(1, 1), (4, 4), (5, 7), (7, 7), (3, 11), (17, 2), (6, 6), (9, 13)]


def _gates(n, g, kind, gen):
    gates = (torch.rand(n, g, generator=gen) < 0.5).float()
    gates[0] = 0.0  # a sample with every block off
    if n > 1:
        gates[1] = 1.0
    if kind == "soft":
        gates = gates * torch.rand(n, g, generator=gen)
    return gates


@pytest.mark.parametrize("mode", ["group", "out", "in"])
@pytest.mark.parametrize("k,dil", [(1, 1), (3, 1), (3, 2), (5, 1)])
@pytest.mark.parametrize("kind", ["binary", "soft"])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_forward_matches_reference(mode, k, dil, kind, stride):
    gen = torch.Generator().manual_seed(k * 10 + dil + stride)
    for (h, w) in SHAPES:
        blocks = 2 if mode == "group" else 3
        cin, cout = (24, 24) if mode == "group" else (12, 27) if mode == "out" else (27, 11)
        if mode == "in":
            cin = 3 * blocks * 3
        groups = blocks if mode == "group" else 1
        x = torch.randn(4, cin, h, w, generator=gen)
        wt = torch.randn(cout, cin // groups, k, k, generator=gen)
        b = torch.randn(cout, generator=gen)
        g = _gates(4, blocks, kind, gen)
        kw = dict(stride=stride, padding=dil * (k // 2), dilation=dil, groups=groups, gate_on=mode)
        got = routed_conv2d(x, wt, g, b, backend="cpu", **kw)
        want = routed_conv2d_reference(x.double(), wt.double(), g.double(), b.double(), **kw)
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["group", "out", "in"])
@pytest.mark.parametrize("k,dil", [(1, 1), (3, 1), (3, 2), (5, 1)])
@pytest.mark.parametrize("kind", ["binary", "soft"])
@pytest.mark.parametrize("router_grad", ["exact", "active"])
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_gradients_match_reference(mode, k, dil, kind, router_grad, wide, stride):
    # wide: 64 input channels, which stride-1 "out" 3x3/5x5 convs route to the
    # channels-last grad_weight kernel (whole 32-channel chunks).  Stride 2: grad_x
    # one phase at a time (1x1: three phases with no tap, zero gradient).
    gen = torch.Generator().manual_seed(k * 10 + dil + 7 + stride)
    for (h, w) in [(1, 1), (5, 7), (6, 6), (9, 13)]:
        blocks = 2 if mode == "group" else 3
        cin, cout = (24, 20) if mode == "group" else (19, 27) if mode == "out" else (27, 11)
        if wide:
            cin = 64 if mode != "in" else 66
        groups = blocks if mode == "group" else 1
        x = torch.randn(4, cin, h, w, generator=gen, dtype=torch.float64)
        wt = torch.randn(cout, cin // groups, k, k, generator=gen, dtype=torch.float64)
        b = torch.randn(cout, generator=gen, dtype=torch.float64)
        g = _gates(4, blocks, kind, gen).double()
        ho, wo = -(-h // stride), -(-w // stride)
        dy = torch.randn(4, cout, ho, wo, generator=gen, dtype=torch.float64)
        kw = dict(stride=stride, padding=dil * (k // 2), dilation=dil, groups=groups, gate_on=mode,
                  router_grad=router_grad)
        grads = []
        for fn, dt, extra in ((routed_conv2d, torch.float32, dict(backend="cpu")),
                              (routed_conv2d_reference, torch.float64, {})):
            leaves = [t.detach().to(dt).requires_grad_() for t in (x, wt, g, b)]
            y = fn(*leaves, **kw, **extra)
            grads.append(torch.autograd.grad(y, leaves, dy.to(dt)))
        for name, got, want in zip(("x", "weight", "gates", "bias"), *grads):
            torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=2e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["group", "in", "out"])
@pytest.mark.parametrize("soft", [False, True])
def test_all_on_matches_reference(mode, soft):
    # With every gate on, "group" and "in" convs stay on the direct kernels and "out"
    # ones run the dense oneDNN conv: all three against the reference.
    gen = torch.Generator().manual_seed(5)
    cout = 16 if mode != "in" else 12
    x = torch.randn(3, 32, 9, 10, generator=gen, dtype=torch.float64)
    wt = torch.randn(cout, 8 if mode == "group" else 32, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64)
    g = torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.5 if soft else torch.ones(3, 4, dtype=torch.float64)
    dy = torch.randn(3, cout, 9, 10, generator=gen, dtype=torch.float64)
    kw = dict(padding=1, groups=4 if mode == "group" else 1, gate_on=mode)
    grads = []
    for fn, dt, extra in ((routed_conv2d, torch.float32, dict(backend="cpu")), (routed_conv2d_reference, torch.float64, {})):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, wt, g, b)]
        y = fn(*leaves, **kw, **extra)
        grads.append((y,) + torch.autograd.grad(y, leaves, dy.to(dt)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("direct", ["0", "avx2"])
def test_other_cpu_paths_match_reference(direct):
    # FASTMOD_ROUTED_CONV_DIRECT is read once per process: "0" sends float32 to the
    # ATen path (CPUs without AVX2), "avx2" forces the AVX2 build of the direct
    # kernels (CPUs without AVX-512).  Each is checked in a fresh process.
    script = """
import torch
from fastmod.ops import routed_conv2d, routed_conv2d_reference
torch.manual_seed(0)
cases = [("group", 16, 16, 4, 3), ("out", 12, 16, 1, 3), ("in", 16, 12, 1, 3), ("out", 64, 8, 1, 3),
         ("out", 20, 16, 1, 1), ("in", 16, 20, 1, 1), ("group", 8, 8, 4, 5)]
for (mode, cin, cout, groups, k), stride in [(c, 1) for c in cases] + [(c, 2) for c in cases[:3]]:
    for h, w in ((6, 7), (1, 1), (9, 13)):
        x = torch.randn(3, cin, h, w, dtype=torch.float64)
        wt = torch.randn(cout, cin // groups, k, k, dtype=torch.float64)
        b = torch.randn(cout, dtype=torch.float64)
        g = (torch.rand(3, 4) < 0.5).double() * (torch.rand(3, 4) + 0.5)
        g[0] = 0.0
        kw = dict(stride=stride, padding=k // 2, groups=groups, gate_on=mode)
        outs = []
        for fn, dt, extra in ((routed_conv2d, torch.float32, dict(backend="cpu")),
                              (routed_conv2d_reference, torch.float64, {})):
            leaves = [t.to(dt).requires_grad_() for t in (x, wt, g, b)]
            y = fn(*leaves, **kw, **extra)
            outs.append((y,) + torch.autograd.grad(y, leaves, torch.ones_like(y)))
        for got, want in zip(*outs):
            torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=2e-3)
print("ok")
"""
    run_with_direct_setting(script, direct)


@settings(max_examples=150, deadline=None)
@given(mode=st.sampled_from(["group", "out", "in"]), n=st.integers(1, 4), blocks=st.sampled_from([1, 2, 3, 5]),
       per_in=st.integers(1, 9), per_out=st.integers(1, 15), h=st.integers(1, 20), w=st.integers(1, 20),
       k=st.sampled_from([1, 3, 5]), dil=st.integers(1, 2), density=st.sampled_from([0.0, 0.4, 0.8, 1.0]),
       soft=st.booleans(), bias=st.booleans(), exact=st.booleans(), seed=st.integers(0, 2**16),
       stride=st.integers(1, 3))
def test_hypothesis_direct_shapes(mode, n, blocks, per_in, per_out, h, w, k, dil, density, soft, bias, exact, seed,
                                  stride):
    # float32 "same"-padded convs at strides 1-3: the geometry the direct kernels take.
    gen = torch.Generator().manual_seed(seed)
    groups = blocks if mode == "group" else 1
    cin = blocks * per_in
    cout = blocks * per_out if mode != "in" else per_out
    x = torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64)
    wt = torch.randn(cout, cin // groups, k, k, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
    g = (torch.rand(n, blocks, generator=gen) < density).double()
    if soft:
        g = g * (torch.rand(n, blocks, generator=gen, dtype=torch.float64) + 0.25)
    dy = torch.randn(n, cout, -(-h // stride), -(-w // stride), generator=gen, dtype=torch.float64)
    kw = dict(stride=stride, padding=dil * (k // 2), dilation=dil, groups=groups, gate_on=mode,
              router_grad="exact" if exact else "active")
    results = []
    for fn, dt, extra in ((routed_conv2d, torch.float32, dict(backend="cpu")), (routed_conv2d_reference, torch.float64, {})):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, wt, g) + ((b,) if bias else ())]
        y = fn(leaves[0], leaves[1], leaves[2], leaves[3] if bias else None, **kw, **extra)
        results.append((y,) + torch.autograd.grad(y, leaves, dy.to(dt)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=3e-3)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("kind", ["binary", "runs"])
def test_in_mode_weight_gradient_channel_lists(k, kind):
    # "in" grad_weight: buckets of 16 output rows (40 rows: three buckets, one partial),
    # one job per sample over its scattered active channels (4-channel blocks: the half
    # tile), split where the gate value changes ("runs": equal values across off blocks
    # merge, different ones split).
    gen = torch.Generator().manual_seed(k)
    n, blocks, per_in, cout = 3, 8, 4, 40
    x = torch.randn(n, blocks * per_in, 6, 7, generator=gen)
    wt = torch.randn(cout, blocks * per_in, k, k, generator=gen)
    if kind == "binary":
        g = (torch.rand(n, blocks, generator=gen) < 0.5).float()
    else:
        g = torch.tensor([[0.5, 0.5, 0.0, 0.5, 1.0, 1.0, 0.0, 0.25],
                          [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]])
    dy = torch.randn(n, cout, 6, 7, generator=gen)
    assert_weight_grad_matches(x, wt, g, dy, 1e-3, padding=k // 2, gate_on="in")


@pytest.mark.parametrize("mode", ["group", "out"])
def test_large_off_blocks_streamed_zeros(mode):
    # Over 1 MiB of off blocks in the output (and in grad_x for "group"): those
    # zeros are written with streaming stores; they must be exact zeros and the
    # active blocks must still match.
    gen = torch.Generator().manual_seed(11)
    G, c = 8, 64
    x = torch.randn(8, c, 32, 32, generator=gen, requires_grad=True)
    wt = torch.randn(c, c // G if mode == "group" else c, 3, 3, generator=gen) / 24
    g = (torch.rand(8, G, generator=gen) < 0.25).float()
    g[:, 0] = 1.0  # an active block per sample, so the direct kernels run
    kw = dict(padding=1, groups=G if mode == "group" else 1, gate_on=mode, router_grad="active")
    out = routed_conv2d(x, wt, g, backend="cpu", **kw)
    off = (g == 0).repeat_interleave(c // G, dim=1)  # [N, C]: output rows of off blocks
    assert off.sum() * 32 * 32 * 4 > 1 << 20
    assert torch.equal(out[off], torch.zeros_like(out[off]))
    dy = torch.randn(out.shape, generator=gen)
    (gx,) = torch.autograd.grad(out, x, dy)
    xd = x.detach().double().requires_grad_(True)
    want = routed_conv2d_reference(xd, wt.double(), g.double(), **kw)
    (gxd,) = torch.autograd.grad(want, xd, dy.double())
    torch.testing.assert_close(out, want.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gxd.float(), rtol=1e-4, atol=1e-4)
    if mode == "group":
        assert torch.equal(gx[off], torch.zeros_like(gx[off]))


_LANES_SCRIPT = """
import sys
import torch
sys.path.insert(0, %r)
from _routed_helpers import assert_weight_grad_matches
gen = torch.Generator().manual_seed(3)
# 1x1 convs on small images (<= 256 pixels): grad_weight with the lanes over the dense
# side's channels.  200 of them: three 64-column tiles and a partial one, split over
# threads; a 72-channel gated side: 6-row tiles and the rows left; 1, 49 and 256 pixels.
for mode, cin, cout in (("in", 72, 200), ("out", 200, 72)):
    for h, w in ((1, 1), (7, 7), (16, 16)):
        for soft in (False, True):
            x = torch.randn(5, cin, h, w, generator=gen, dtype=torch.float64)
            wt = torch.randn(cout, cin, 1, 1, generator=gen, dtype=torch.float64)
            g = (torch.rand(5, 6, generator=gen) < 0.5).double()
            g[0], g[1] = 0.0, 1.0
            if soft:
                g = g * (torch.rand(5, 6, generator=gen, dtype=torch.float64) + 0.5)
            dy = torch.randn(5, cout, h, w, generator=gen, dtype=torch.float64)
            assert_weight_grad_matches(x, wt, g, dy, 2e-3, gate_on=mode, router_grad="active")
# Grouped convs with at least 16 output rows per block: lanes over the rows (16 rows:
# one AVX-512 vector; 24: a vector and a half; 32: two), one accumulator per
# (channel, tap) pair (3 x 9 = 27 or 5 x 25: tiles of 12 / 8 pairs and the rest);
# 3x3, dilated 3x3 and 5x5 with their zero borders; 1x1 images; soft gates.
for blocks, per_in, per_out, k, dil in ((4, 3, 16, 3, 1), (3, 5, 24, 5, 1), (2, 3, 32, 3, 2), (2, 2, 16, 1, 1)):
    for h, w in ((1, 1), (7, 7), (5, 12)):
        for soft in (False, True):
            x = torch.randn(5, blocks * per_in, h, w, generator=gen, dtype=torch.float64)
            wt = torch.randn(blocks * per_out, per_in, k, k, generator=gen, dtype=torch.float64)
            g = (torch.rand(5, blocks, generator=gen) < 0.5).double()
            g[0], g[1] = 0.0, 1.0
            if soft:
                g = g * (torch.rand(5, blocks, generator=gen, dtype=torch.float64) + 0.5)
            dy = torch.randn(5, blocks * per_out, h, w, generator=gen, dtype=torch.float64)
            assert_weight_grad_matches(x, wt, g, dy, 2e-3, padding=dil * (k // 2), dilation=dil, groups=blocks,
                                       gate_on="group", router_grad="active")
print("ok")
"""


@pytest.mark.parametrize("direct", ["1", "avx2"])
def test_weight_gradient_lanes_kernels(direct):
    # Both builds of the small-image weight-gradient kernels with lanes over channels
    # or rows (AVX-512 and AVX2 tile sizes differ), each in a fresh process since the
    # choice is read once.
    run_with_direct_setting(_LANES_SCRIPT % os.path.dirname(os.path.abspath(__file__)), direct)
