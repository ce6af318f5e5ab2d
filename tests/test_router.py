"""GumbelSigmoidRouter."""
import math

import pytest
import torch

from fastmod.nn import GumbelSigmoidRouter


def test_init_and_shapes():
    r = GumbelSigmoidRouter(32, 4, 8)
    torch.testing.assert_close(torch.sigmoid(r.fc.bias), torch.full((32,), 0.7))
    assert r.fc.bias[0].item() == pytest.approx(math.log(0.7 / 0.3))
    q = torch.randn(5, 32)
    gates = r(q)
    assert gates.shape == (5, 4, 8) and gates.dtype == torch.float32
    assert set(gates.unique().tolist()) <= {0.0, 1.0}
    assert r.last_logits.shape == (5, 4, 8) and not r.last_logits.requires_grad
    assert r.last_execution_ratio.shape == (4,)
    torch.testing.assert_close(r.last_execution_ratio, gates.mean(dim=(0, 2)))
    torch.testing.assert_close(r.last_logits, r.fc(q).view(5, 4, 8))
    assert list(r.state_dict()) == ["fc.weight", "fc.bias"]


def test_initial_execution_probability():
    r = GumbelSigmoidRouter(16, 3, 64, init_prob=0.7)
    torch.nn.init.zeros_(r.fc.weight)
    r.train()
    r(torch.randn(512, 16))
    n = 512 * 64
    assert (r.last_execution_ratio - 0.7).abs().max() < 5 * math.sqrt(0.21 / n)


def test_train_is_stochastic_eval_is_deterministic():
    r = GumbelSigmoidRouter(8, 2, 16)
    q = torch.randn(64, 8)
    r.train()
    assert not torch.equal(r(q), r(q))
    r.eval()
    a, b = r(q), r(q)
    assert torch.equal(a, b) and torch.equal(a, (r.last_logits > 0).float())


def test_gradients_reach_the_linear_layer():
    r = GumbelSigmoidRouter(8, 2, 4)
    q = torch.randn(10, 8, requires_grad=True)
    (r(q) * torch.randn(10, 2, 4)).sum().backward()
    assert r.fc.weight.grad.abs().sum() > 0 and q.grad.abs().sum() > 0


def test_tau_annealing_and_validation():
    r = GumbelSigmoidRouter(4, 1, 3, tau=2.0)
    assert r.tau == 2.0
    r.tau = 0.5
    assert r.tau == 0.5
    with pytest.raises(ValueError, match="tau"):
        r.tau = 0.0
    with pytest.raises(ValueError, match="tau"):
        GumbelSigmoidRouter(4, 1, 3, tau=-1.0)
    with pytest.raises(ValueError, match="init_prob"):
        GumbelSigmoidRouter(4, 1, 3, init_prob=1.0)
    with pytest.raises(ValueError, match="num_modules"):
        GumbelSigmoidRouter(4, 1, 0)
    with pytest.raises(ValueError, match="q"):
        r(torch.randn(3, 5))


def test_kernel_switch_same_state_and_eval_output():
    torch.manual_seed(1)
    a = GumbelSigmoidRouter(8, 3, 5).eval()
    b = GumbelSigmoidRouter(8, 3, 5).eval()
    b.load_state_dict(a.state_dict())
    b.use_kernels = False
    assert b.backend == "reference"
    assert a.state_dict().keys() == b.state_dict().keys()
    q = torch.randn(7, 8)
    assert torch.equal(a(q), b(q))
    b.train()
    assert b(q).shape == (7, 3, 5)


def test_torch_compile_router():
    torch._dynamo.reset()
    r = GumbelSigmoidRouter(8, 2, 4)
    cr = torch.compile(r, fullgraph=True)
    q = torch.randn(6, 8)
    out = cr(q)
    assert out.shape == (6, 2, 4) and set(out.unique().tolist()) <= {0.0, 1.0}
    r.eval()
    assert torch.equal(cr(q), (r.fc(q).view(6, 2, 4) > 0).float())
