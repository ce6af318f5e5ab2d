"""Eager calls of the Triton ops launch their kernels directly, not through
wrap_triton's higher-order op (fastmod.ops._eager): that costs host time per launch
and leaves one entry per launch in torch's kernel side table for good.  Eager calls
of the C++ fused norms skip their torch.library autograd the same way."""
import pytest
import torch
from torch._library.triton import is_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import requires_cuda
from fastmod import _extension
from fastmod.ops import _eager


def _recording():
    seen = []

    def forward(x):
        seen.append(is_wrap_triton_enabled())
        return x * 2

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, grad):
        seen.append(is_wrap_triton_enabled())
        return grad * 2

    return seen, _eager.eager_function("Recording", forward, setup_context, backward)


def test_eager_function_launches_directly_both_ways():
    seen, fn = _recording()
    x = torch.ones(3, requires_grad=True)
    fn.apply(x).sum().backward()
    assert seen == [False, False]
    assert is_wrap_triton_enabled()  # restored afterwards
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_the_hop_stays_on_under_a_dispatch_mode():
    # FakeTensorMode / make_fx / export trace the kernel through the HOP
    seen, fn = _recording()
    with FakeTensorMode():
        fn.apply(torch.ones(3))
    assert seen == [True]


def test_flag_restored_when_the_forward_raises():
    def forward(x):
        raise ValueError("x: bad")
    fn = _eager.eager_function("Raising", forward, lambda ctx, i, o: None, lambda ctx, g: g)
    with pytest.raises(ValueError, match="x: bad"):
        fn.apply(torch.ones(1))
    assert is_wrap_triton_enabled()


@requires_cuda
def test_no_side_table_growth_on_the_gpu():
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from fastmod.ops import gumbel_sigmoid_gate, group_norm_add_relu, mixed_node, routed_batch_norm_relu, routed_conv2d

    def calls():
        logits = torch.randn(4, 8, device="cuda", requires_grad=True)
        gumbel_sigmoid_gate(logits, stochastic=True).sum().backward()
        a = torch.randn(2, 16, 4, 4, device="cuda", requires_grad=True)
        mixed_node(a, a.detach() + 1, torch.zeros(6, device="cuda")).sum().backward()
        x = torch.randn(2, 16, 6, 6, device="cuda", requires_grad=True)
        w = torch.randn(16, 4, 3, 3, device="cuda", requires_grad=True)
        g = torch.ones(2, 4, device="cuda")
        routed_conv2d(x, w, g, padding=1, groups=4, gate_on="group", backend="triton").sum().backward()
        routed_batch_norm_relu(x, g, None, None, training=True, backend="triton").sum().backward()
        group_norm_add_relu(x, x.detach(), 4, backend="triton").sum().backward()
        torch.cuda.synchronize()

    calls()  # compiles
    before = len(kernel_side_table.constant_args)
    for _ in range(3):
        calls()
    assert len(kernel_side_table.constant_args) == before


@pytest.mark.skipif(not _extension.has_op("routed_batch_norm_relu", "CPU"), reason="fastmod._C not built")
def test_cpu_fused_norms_skip_the_registered_autograd():
    # Eager CPU calls run the C++ ops below their torch.library autograd, inside
    # fastmod's own Function: the graph node says so, and outputs and gradients are
    # those of the registered op (which torch.compile still uses).
    from fastmod.ops import fused_norm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 4, 5, generator=gen)
    gates = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    w, b = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    dy = torch.randn(3, 8, 4, 5, generator=gen)
    results = []
    for eager in (True, False):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = torch.zeros(8), torch.ones(8)
        args = (xs, gates, ws, bs, rm, rv, True, 1e-5)
        out = (fused_norm._call("cpu", "routed_batch_norm_relu", False, *args) if eager
               else torch.ops.fastmod.routed_batch_norm_relu(*args))[0]
        assert (type(out.grad_fn).__name__ == "RoutedBatchNormReluCpuBackward") == eager
        results.append((out,) + torch.autograd.grad(out, (xs, ws, bs), dy))
        res = torch.randn(3, 8, 4, 5, generator=gen)
        gn = (fused_norm._call("cpu", "group_norm_add_relu", False, xs, res, ws, bs, 2, 1e-5) if eager
              else torch.ops.fastmod.group_norm_add_relu(xs, res, ws, bs, 2, 1e-5))[0]
        assert (type(gn.grad_fn).__name__ == "GroupNormAddReluCpuBackward") == eager
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    # The in-place inference op still bumps x's version, as the dispatcher does.
    xi = x.clone()
    v = xi._version
    fused_norm._call("cpu", "routed_batch_norm_relu", True, xi, gates, w, b, torch.zeros(8), torch.ones(8),
                     False, 1e-5)
    assert xi._version > v


@pytest.mark.skipif(not _extension.has_op("routed_conv2d", "CPU"), reason="fastmod._C not built")
def test_cpu_ops_record_fastmods_own_graph_node():
    # Eager CPU calls of the routed conv and the mixed node: fastmod's Function, not
    # torch.library's generated one (which traced code keeps using).
    from fastmod.ops import mixed_node, routed_conv2d

    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    y = routed_conv2d(x, torch.randn(4, 8, 1, 1), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), gate_on="in",
                      backend="cpu")
    assert type(y.grad_fn).__name__ == "RoutedConvCppBackward"
    z = mixed_node(x, torch.randn(2, 8, 1, 1), torch.zeros(6, requires_grad=True), backend="cpu")
    assert z.grad_fn.name() == "ViewBackward0"  # the op's canonical [K, B, C, S] output, viewed back
    assert z.grad_fn.next_functions[0][0].name() == "_MixedNodeCppBackward"
