"""QGMRN load-balancing loss."""
import pytest
import torch

from fastmod.ops import gumbel_sigmoid_gate, load_balancing_loss


def _by_hand(gates):
    total = 0.0
    B, L, M = gates.shape
    for l in range(L):
        loads = [sum(float(gates[i, l, m]) for i in range(B)) for m in range(M)]
        mean = sum(loads) / M
        var = sum((a - mean) ** 2 for a in loads) / M  # population variance
        total += var / (mean ** 2 + 1e-10)
    return total


def test_hand_computation():
    gates = torch.tensor([[[1, 0, 1], [1, 1, 1]],
                          [[1, 0, 0], [0, 1, 1]],
                          [[1, 1, 0], [1, 0, 1]]], dtype=torch.float32)  # [B=3, L=2, M=3]
    # layer 0: loads (3, 1, 1), mean 5/3, var 8/9 -> CV^2 = 0.32; layer 1: loads (2, 2, 3)
    expected = (8 / 9) / (25 / 9) + (2 / 9) / (49 / 9)
    loss = load_balancing_loss(gates)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    g = (torch.rand(5, 4, 7) > 0.4).float()
    assert load_balancing_loss(g).item() == pytest.approx(_by_hand(g), rel=1e-5)


def test_zero_when_balanced_and_finite_when_idle():
    assert load_balancing_loss(torch.ones(4, 3, 8)).item() == 0.0
    balanced = torch.eye(4).repeat(2, 1).view(8, 1, 4).repeat(1, 3, 1)  # every module used twice
    assert load_balancing_loss(balanced).item() == 0.0
    idle = torch.zeros(4, 2, 5)  # all modules off: eps keeps it finite
    assert load_balancing_loss(idle).item() == 0.0
    assert load_balancing_loss(torch.rand(6, 1, 1)).item() == 0.0  # M = 1: population std is 0


def test_gradient_matches_autograd_of_formula():
    gates = torch.rand(5, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(load_balancing_loss, (gates,))
    load_balancing_loss(gates).backward()
    g2 = gates.detach().clone().requires_grad_()
    a = g2.sum(0)
    ((a.var(-1, correction=0)) / (a.mean(-1) ** 2 + 1e-10)).sum().backward()
    torch.testing.assert_close(gates.grad, g2.grad)


def test_differentiable_through_straight_through_gates():
    logits = torch.randn(16, 3, 8, requires_grad=True)
    loss = load_balancing_loss(gumbel_sigmoid_gate(logits, 1.0, stochastic=True))
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    g = (torch.rand(64, 4, 32) > 0.3).float()
    loss = load_balancing_loss(g.to(dtype))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, load_balancing_loss(g))


def test_bad_input():
    with pytest.raises(ValueError, match="gates"):
        load_balancing_loss(torch.rand(3, 4))
    with pytest.raises(ValueError, match="gates"):
        load_balancing_loss(torch.rand(0, 2, 3))
    with pytest.raises(TypeError, match="gates"):
        load_balancing_loss(torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="eps"):
        load_balancing_loss(torch.rand(2, 3, 4), eps=-1.0)
