"""Eager calls of the Triton ops launch their kernels directly, not through
wrap_triton's higher-order op (fastmod.ops._eager): that costs host time per launch
and leaves one entry per launch in torch's kernel side table for good."""
import pytest
import torch
from torch._library.triton import is_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import requires_cuda
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
