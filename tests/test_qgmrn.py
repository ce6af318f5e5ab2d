"""QGMRN (fastmod.models.qgmrn): shapes, gradients, the kernel path against the
reference path, the paper configuration and the training registry."""
import pytest
import torch

from _train_helpers import output_and_grads, padded_questions
from fastmod.models.qgmrn import QGMRN, GruEncoder
from fastmod.ops import load_balancing_loss
from fastmod.train import registry
from fastmod.train.config import BASE, UsageError, merge

TINY = {
    "brn": dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), cardinality=8),
    "frn": dict(depths=(1, 2, 1, 1), widths=(8, 16, 32, 32)),
}


def _tiny(variant, **kw):
    return QGMRN(30, 11, (3, 32, 32), variant=variant, wordvec_dim=12, rnn_dim=16, stem_channels=8,
                 classifier_proj_dim=16, fc_dims=(24,), **TINY[variant], **kw)


def _batch(n=4):
    q = torch.randint(1, 30, (n, 7))
    lens = torch.tensor([7, 5, 3, 1, 6, 2][:n])
    return q, lens, torch.randn(n, 3, 32, 32)


@pytest.mark.parametrize("variant", ["brn", "frn"])
def test_train_returns_logits_and_load_loss_and_every_parameter_learns(variant):
    m = _tiny(variant)
    logits, aux = m(*_batch())
    assert logits.shape == (4, 11) and aux.dim() == 0
    gates = m.last_gates
    if variant == "brn":
        assert gates.shape == (4, 4, 8)
        torch.testing.assert_close(aux, 0.01 * load_balancing_loss(gates))
    else:  # one row of all filters, split per layer
        assert gates.shape == (4, 1, sum(m.modules_per_layer)) and m.modules_per_layer == [8, 16, 16, 32, 32]
        parts = m.layer_gates(gates)
        torch.testing.assert_close(aux, 0.01 * sum(load_balancing_loss(g.unsqueeze(1)) for g in parts))
    (logits.sum() + aux).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    assert m.router.fc.weight.grad.abs().sum() > 0  # the straight-through gates pass gradient to the router


@pytest.mark.parametrize("variant", ["brn", "frn"])
def test_kernel_path_matches_reference_path(variant):
    """Eval mode (deterministic gates), with a router bias that switches about half of
    the modules off, so the routed kernels really skip work: outputs and gradients."""
    torch.manual_seed(1)
    m = _tiny(variant).eval()
    with torch.no_grad():
        m.router.fc.bias.normal_(0.0, 2.0)
    batch = _batch()
    out_k, grads_k = output_and_grads(m, batch, True)
    out_r, grads_r = output_and_grads(m, batch, False)
    assert 0.2 < m.last_gates.mean() < 0.8
    torch.testing.assert_close(out_k, out_r, rtol=1e-4, atol=1e-4)
    for name in grads_r:
        torch.testing.assert_close(grads_k[name], grads_r[name], rtol=1e-3, atol=1e-4, msg=name)


def test_eval_is_deterministic_and_returns_logits_only():
    m = _tiny("brn").eval()
    batch = _batch()
    with torch.no_grad():
        a, b = m(*batch), m(*batch)
    assert isinstance(a, torch.Tensor) and torch.equal(a, b)
    assert torch.equal(m.last_gates, (m.router.last_logits > 0).to(m.last_gates.dtype))


def test_gru_encoder_takes_the_last_real_token():
    enc = GruEncoder(20, wordvec_dim=6, rnn_dim=5)
    lens = torch.tensor([7, 3, 1, 5])
    q = padded_questions(lens, 20)
    got = enc(q, lens)
    packed = torch.nn.utils.rnn.pack_padded_sequence(enc.embed(q), lens, batch_first=True, enforce_sorted=False)
    _, h = enc.rnn(packed)
    torch.testing.assert_close(got, h[-1])
    w = enc.rnn.weight_hh_l0.detach()[:5]  # orthogonal init, per gate block
    torch.testing.assert_close(w @ w.T, torch.eye(5), atol=1e-5, rtol=0)


def test_paper_configurations():
    ctx = registry.ModelContext(num_tokens=90, num_answers=28, visual_shape=(3, 224, 224), is_pixels=True)
    brn = registry.get("qgmrn-brn")
    m = brn.build(merge(BASE, brn.defaults, "test")["model"], ctx)
    # ResNeXt-26: 8 routed bottlenecks (3 convs each) + the stem conv + the classifier
    assert len(m.blocks) == 8 and m.modules_per_layer == [32] * 8
    assert isinstance(m.blocks[0].bn3, torch.nn.GroupNorm)
    assert m.router.num_layers == 8 and m.router.num_modules == 32
    assert m.text.embed.embedding_dim == 200 and m.text.rnn.hidden_size == 512
    assert merge(BASE, brn.defaults, "test")["optim"]["lr"] == 3e-4
    frn = registry.get("qgmrn-frn")
    m = frn.build(merge(BASE, frn.defaults, "test")["model"], ctx)
    assert len(m.blocks) == 16  # ResNet-34's basic blocks
    assert m.modules_per_layer == [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3
    with pytest.raises(UsageError, match="raw pixels"):
        frn.build(merge(BASE, frn.defaults, "test")["model"],
                  registry.ModelContext(90, 28, (1024, 14, 14), is_pixels=False))


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        QGMRN(30, 11, (3, 32, 32), variant="mrn")
    with pytest.raises(ValueError, match="depths"):
        QGMRN(30, 11, (3, 32, 32), depths=(1, 1), widths=(16,))
    with pytest.raises(ValueError, match="cardinality"):
        QGMRN(30, 11, (3, 32, 32), widths=(12, 32, 64, 64), cardinality=8)


def test_compiles_as_one_graph():
    """No graph breaks (Dynamo's LSTM/GRU support is behind allow_rnn)."""
    m = _tiny("brn").eval()
    batch = _batch()
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True):
        want = m(*batch)
        got = torch.compile(m, fullgraph=True)(*batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
