"""routed_conv2d's CUDA kernels (csrc/routed_conv/routed_conv_cuda.cu): no host
synchronisation, CUDA-graph capture, shapes at the tile edges, every dtype against
the reference, opcheck.  Skipped without a GPU (the generic backend-vs-reference
tests in test_routed_conv.py also cover backend="cuda")."""
import pytest
import torch

from conftest import HAS_CUDA
from fastmod import _extension
from fastmod.ops import routed_conv2d, routed_conv2d_reference
from test_routed_conv import assert_close, make_gates, run_both

pytestmark = [
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"),
    pytest.mark.skipif(not _extension.has_op("routed_conv2d", "CUDA"),
                       reason="fastmod._C built without CUDA"),
]
MODES = ["group", "out", "in"]
KINDS = ["random", "on", "off", "nonbinary"]


def make(mode, *, n=3, cin=8, cout=8, hw=(7, 7), k=3, blocks=4, stride=1, padding=None,
         dilation=1, bias=True, dtype=torch.float32):
    """CUDA inputs and keyword arguments for one problem."""
    groups = blocks if mode == "group" else 1
    if padding is None:
        padding = dilation * (k - 1) // 2
    x = torch.randn(n, cin, *hw, dtype=dtype, device="cuda")
    w = torch.randn(cout, cin // groups, k, k, dtype=dtype, device="cuda") / (cin // groups * k * k) ** 0.5
    b = torch.randn(cout, dtype=dtype, device="cuda") if bias else None
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, gate_on=mode)
    return x, w, b, kw


def check(x, w, gates, b, kw, dtype, router_grads=("exact", "active")):
    for rg in router_grads:
        (y, grads), (yr, gr) = run_both(x, w, gates, b, kw, "cuda", router_grad=rg,
                                        upcast=dtype in (torch.float16, torch.bfloat16))
        assert y.dtype == dtype
        assert_close(y, yr, dtype)
        assert len(grads) == len(gr)
        assert all(a.dtype == dtype for a in grads)
        for a, r in zip(grads, gr):
            assert_close(a, r, dtype)


# (mode, make() overrides): sizes that are not multiples of the tiles (TM = TN = 4
# per thread, BK = 8, up to 256 pixels x 64 channels per CTA), several pixel and
# column tiles, groups of 2/4/8/64 channels, one channel per block.
SHAPES = [
    ("group", dict(cin=8, cout=8, blocks=4, hw=(13, 11))),            # 2 channels per group
    ("group", dict(cin=16, cout=16, blocks=4, hw=(5, 9))),            # 4
    ("group", dict(cin=32, cout=24, blocks=4, hw=(6, 6), stride=2)),  # 8 in, 6 out
    ("group", dict(cin=128, cout=128, blocks=2, hw=(9, 9), n=2)),     # 64
    ("group", dict(cin=6, cout=3, blocks=3, hw=(20, 17))),            # 340 pixels, 1 out channel
    ("out", dict(cin=5, cout=67, blocks=67, hw=(10, 9))),             # G = Cout, 2 column tiles
    ("out", dict(cin=13, cout=12, blocks=4, hw=(7, 5), k=1)),
    ("out", dict(cin=9, cout=130, blocks=10, hw=(4, 4), stride=2)),
    ("in", dict(cin=7, cout=9, blocks=7, hw=(11, 10))),               # one input channel per block
    ("in", dict(cin=12, cout=70, blocks=3, hw=(8, 8), k=1, stride=2)),
    ("in", dict(cin=20, cout=5, blocks=4, hw=(17, 19), n=2)),
    ("group", dict(cin=8, cout=8, blocks=4, hw=(9, 9), dilation=2)),
    ("out", dict(cin=6, cout=8, blocks=4, hw=(9, 10), dilation=2, stride=2)),
    ("in", dict(cin=8, cout=6, blocks=2, hw=(10, 9), dilation=2, padding=1)),
    ("in", dict(cin=8, cout=8, blocks=4, hw=(6, 6), stride=2, padding=0, bias=False)),
    ("group", dict(cin=8, cout=16, blocks=4, hw=(8, 7), k=2, stride=(2, 1), padding=(1, 0), bias=False)),
]


@pytest.mark.parametrize("mode,over", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_fp32(mode, over, kind):
    x, w, b, kw = make(mode, **over)
    gates = make_gates(kind, x.shape[0], over["blocks"], device="cuda")
    check(x, w, gates, b, kw, torch.float32)


@pytest.mark.parametrize("mode,over", SHAPES[::3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_shapes_dtypes(mode, over, dtype):
    x, w, b, kw = make(mode, dtype=dtype, **over)
    gates = make_gates("nonbinary", x.shape[0], over["blocks"], dtype=dtype, device="cuda")
    check(x, w, gates, b, kw, dtype)


# fp16/bf16 (and fp32 when TF32 is allowed) use tensor cores (WMMA) for tiles >= 32
# wide: forward, grad_x, grad_weight; FASTMOD_ROUTED_CONV_TC=0 forces the SIMT kernels.
TC_SHAPES = [
    ("group", dict(cin=64, cout=96, blocks=2, hw=(9, 11))),   # 48 out / 32 in channels per group
    ("out", dict(cin=40, cout=96, blocks=8, hw=(9, 9))),      # 96 listed out / 40 grad_x columns
    ("out", dict(cin=33, cout=70, blocks=70, hw=(13, 7), stride=2)),
    ("in", dict(cin=48, cout=40, blocks=6, hw=(10, 10), stride=2)),
    ("in", dict(cin=64, cout=65, blocks=64, hw=(9, 8), k=1, bias=False)),
]


@pytest.mark.parametrize("mode,over", TC_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tc", ["1", "0"])
@pytest.mark.parametrize("kind", ["random", "nonbinary", "on"])
def test_tensor_core_path(mode, over, dtype, tc, kind, monkeypatch):
    monkeypatch.setenv("FASTMOD_ROUTED_CONV_TC", tc)
    x, w, b, kw = make(mode, dtype=dtype, **over)
    gates = make_gates(kind, x.shape[0], over["blocks"], dtype=dtype, device="cuda")
    check(x, w, gates, b, kw, dtype)


@pytest.mark.parametrize("mode,over", TC_SHAPES[:4])
@pytest.mark.parametrize("tf32", [True, False])
def test_fp32_tf32_only_when_allowed(mode, over, tf32):
    """fp32 runs as TF32 on tensor cores only when torch.backends.cudnn.allow_tf32 says
    so; compared with the float64 reference (TF32 loosely, plain fp32 tightly)."""
    torch.backends.cudnn.allow_tf32 = tf32  # conftest's autouse fixture restores it
    x, w, b, kw = make(mode, **over)
    gates = make_gates("nonbinary", x.shape[0], over["blocks"], device="cuda")
    ins = [t.clone().requires_grad_(True) for t in (x, w, gates, b)]
    refs = [t.double().requires_grad_(True) for t in (x, w, gates, b)]
    y = routed_conv2d(*ins, backend="cuda", **kw)
    yr = routed_conv2d_reference(*refs, **kw)
    dy = torch.randn_like(yr)
    y.backward(dy.float())
    yr.backward(dy)
    tol = 1e-2 if tf32 else 1e-4
    for a, r in zip([y.detach()] + [t.grad for t in ins], [yr.detach()] + [t.grad for t in refs]):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a.double(), r, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("mode", MODES)
def test_gates_in_another_dtype(mode):
    x, w, b, kw = make(mode, dtype=torch.float32)
    gates = make_gates("nonbinary", x.shape[0], 4, dtype=torch.float64, device="cuda")
    (y, grads), (yr, gr) = run_both(x, w, gates, b, kw, "cuda")
    assert grads[2].dtype == torch.float64
    assert_close(y, yr, torch.float32)
    for a, r in zip(grads, gr):
        assert_close(a.float(), r.float(), torch.float32)


@pytest.mark.parametrize("mode", ["group", "out"])
@pytest.mark.parametrize("kind", ["random", "nonbinary"])
def test_off_blocks_exactly_zero(mode, kind):
    x, w, b, kw = make(mode, n=4)
    gates = make_gates(kind, 4, 4, device="cuda")
    y = routed_conv2d(x, w, gates, b, backend="cuda", **kw)
    blocks = y.view(4, 4, -1)
    assert (blocks[gates == 0] == 0).all()
    assert (blocks[gates != 0] != 0).any()


@pytest.mark.parametrize("mode", MODES)
def test_all_off_in_mode_is_bias(mode):
    x, w, b, kw = make(mode)
    y = routed_conv2d(x, w, torch.zeros(3, 4, device="cuda"), b, backend="cuda", **kw)
    expected = b.view(1, -1, 1, 1).expand_as(y) if mode == "in" else torch.zeros_like(y)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(mode):
    x, w, b, kw = make(mode, n=0)
    w.requires_grad_(True)
    gates = torch.zeros(0, 4, device="cuda", requires_grad=True)
    y = routed_conv2d(x, w, gates, b, backend="cuda", **kw)
    assert y.shape == (0, 8, 7, 7)
    y.sum().backward()
    assert w.grad.abs().sum() == 0 and gates.grad.shape == (0, 4)


@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
def test_layouts(layout, mode):
    x, w, b, kw = make(mode)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        w = w.to(memory_format=torch.channels_last)
    else:
        x = torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3], device="cuda")[..., ::2]
    gates = make_gates("random", x.shape[0], 4, device="cuda")
    (y, grads), (yr, gr) = run_both(x, w, gates, b, kw, "cuda")
    assert y.is_contiguous()
    assert_close(y, yr, torch.float32)
    for a, r in zip(grads, gr):
        assert_close(a, r, torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("router_grad", ["exact", "active"])
def test_no_host_sync(mode, router_grad):
    x, w, b, kw = make(mode, n=4)
    gates = make_gates("nonbinary", 4, 4, device="cuda")
    ins = [t.clone().requires_grad_(True) for t in (x, w, gates, b)]
    y0 = routed_conv2d(*ins, backend="cuda", router_grad=router_grad, **kw)  # warm-up: lazy init
    dy = torch.randn_like(y0)
    y0.backward(dy)
    for t in ins:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = routed_conv2d(*ins, backend="cuda", router_grad=router_grad, **kw)
        y.backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(t.grad is not None for t in ins)
    assert_close(y.detach(), routed_conv2d_reference(x, w, gates, b, **kw), torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_replay(mode):
    x, w, b, kw = make(mode, n=4)
    static_gates = make_gates("random", 4, 4, device="cuda")
    side = torch.cuda.Stream()  # warm up off the capture stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        routed_conv2d(x, w, static_gates, b, backend="cuda", **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = routed_conv2d(x, w, static_gates, b, backend="cuda", **kw)
    for kind in ("nonbinary", "off", "on", "random"):
        gates = make_gates(kind, 4, 4, device="cuda")
        gates[1] = torch.tensor([0.0, 0.5, 0.0, 2.0])  # a pattern the capture never saw
        static_gates.copy_(gates)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y, routed_conv2d_reference(x, w, gates, b, **kw), torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_cuda(mode):
    x, w, b, kw = make(mode)
    gates = make_gates("nonbinary", x.shape[0], 4, device="cuda")
    conv_args = ([1, 1], [1, 1], [1, 1], kw["groups"], mode)
    torch.library.opcheck(torch.ops.fastmod.routed_conv2d.default,
                          (x, w.requires_grad_(), gates.requires_grad_(), b) + conv_args + (True,))
    out = routed_conv2d(x, w, gates, b, backend="cuda", **kw).detach()
    bwd_args = (torch.randn_like(out), x, w.detach(), gates.detach(), b, out) + conv_args
    torch.library.opcheck(torch.ops.fastmod.routed_conv2d_backward.default,
                          bwd_args + ([True, True, True, True], True))
