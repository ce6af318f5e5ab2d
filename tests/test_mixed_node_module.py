"""fastmod.nn.MixedNode: kernels on/off agree, state dicts match, the switches work."""
import pytest
import torch

from fastmod import backends, nn, ops


def _pair(num_nodes):
    fast = nn.MixedNode(num_nodes, normalize=True)
    slow = nn.MixedNode(num_nodes, normalize=True)
    slow.use_kernels = False
    with torch.no_grad():
        fast.alpha.normal_()
    slow.load_state_dict(fast.state_dict())
    return fast, slow


@pytest.mark.parametrize("num_nodes", [1, 3])
def test_kernels_on_off_agree(num_nodes):
    fast, slow = _pair(num_nodes)
    assert fast.state_dict().keys() == slow.state_dict().keys() == {"alpha", "op_mask"}
    x1 = torch.randn(2, 4, 3, 3)
    x2 = torch.randn(2, 4, 1, 1) if num_nodes == 1 else torch.randn(num_nodes, 2, 4, 1, 1)
    for m in (fast, slow):
        m(x1, x2).square().sum().backward()
    torch.testing.assert_close(fast(x1, x2), slow(x1, x2))
    torch.testing.assert_close(fast.alpha.grad, slow.alpha.grad)


def test_weights_mode_mask_and_dominant_ops():
    node = nn.MixedNode(2)
    torch.testing.assert_close(node.weights(), torch.full((2, 6), 1 / 6))
    with torch.no_grad():
        node.alpha[0, 3] = 2.0
        node.alpha[1, 1] = 2.0
    assert node.dominant_ops() == ["product", "max"]
    node.mode = "hard"
    assert node.weights()[0].tolist() == [0, 0, 0, 1, 0, 0]
    node.op_mask[3] = False
    assert node.weights()[0].sum() == 0  # masked argmax: nothing left, no renormalisation
    single = nn.MixedNode()
    assert single.alpha.shape == (6,) and single.dominant_ops() == "min"


def test_env_switch_turns_kernels_off(monkeypatch):
    node = nn.MixedNode()
    assert node.backend is None
    monkeypatch.setenv("FASTMOD_KERNELS", "0")
    assert node.backend == "reference"
    assert backends.select("mixed_node", None, torch.device("cpu"), ("triton", "cpu")) == "reference"


def test_bad_num_nodes():
    with pytest.raises(ValueError, match="num_nodes"):
        nn.MixedNode(0)


def test_op_names():
    assert ops.OP_NAMES == ("min", "max", "sum", "product", "choose1", "choose2")
