"""The baselines (lstm, cnn-lstm) and optimiser schemes."""
import pytest
import torch

from _train_helpers import padded_questions
from fastmod.models.baselines import CnnLstmModel, LstmEncoder, LstmModel
from fastmod.train import registry
from fastmod.train.config import BASE, merge
from fastmod.train.optim import OptimScheme, adam_scheme


def test_encoder_takes_the_last_real_token():
    enc = LstmEncoder(20, wordvec_dim=6, rnn_dim=5, rnn_num_layers=2)
    lens = torch.tensor([7, 3, 1, 5])
    q = padded_questions(lens, 20)
    got = enc(q, lens)
    packed = torch.nn.utils.rnn.pack_padded_sequence(enc.embed(q), lens, batch_first=True, enforce_sorted=False)
    _, (h, _) = enc.rnn(packed)
    torch.testing.assert_close(got, h[-1])
    # Padding after the question does not change the encoding.
    longer = torch.cat([q, torch.zeros(4, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(enc(longer, lens), got)


def test_lstm_is_blind():
    m = LstmModel(30, 11, wordvec_dim=8, rnn_dim=8, fc_dims=(16,))
    q, lens = torch.randint(1, 30, (3, 5)), torch.tensor([5, 4, 2])
    out = m(q, lens, torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 11)
    torch.testing.assert_close(out, m(q, lens, torch.randn(3, 3, 8, 8)))


@pytest.mark.parametrize("shape, pixels", [((3, 32, 32), True), ((16, 6, 6), False)])
def test_cnn_lstm_shapes_and_gradients(shape, pixels):
    m = CnnLstmModel(30, 11, shape, pixels, wordvec_dim=8, rnn_dim=8, rnn_num_layers=1, stem_channels=(4, 8),
                     cnn_proj_dim=6, cnn_pooling="maxpool2", fc_dims=(16,))
    vis = torch.randn(2, *shape, requires_grad=True)
    out = m(torch.randint(1, 30, (2, 4)), torch.tensor([4, 2]), vis)
    assert out.shape == (2, 11)
    out.sum().backward()
    assert vis.grad is not None and vis.grad.abs().sum() > 0  # the image matters
    assert all(p.grad is not None for p in m.parameters())


def test_paper_config_matches_clevr_iep():
    """clevr-iep's CNN+LSTM on ResNet-101 conv4 features: 1x1 conv to 512, 2x2 max-pool,
    concat with the 256-d LSTM state, MLP with one hidden layer of 1024."""
    spec = registry.get("cnn-lstm")
    cfg = merge(BASE, spec.defaults, "test")
    ctx = registry.ModelContext(num_tokens=90, num_answers=28, visual_shape=(1024, 14, 14), is_pixels=False)
    m = spec.build(cfg["model"], ctx)
    first = m.classifier[0]
    assert first.in_features == 512 * 7 * 7 + 256 and first.out_features == 1024
    assert m.rnn.rnn.num_layers == 2 and m.rnn.embed.embedding_dim == 300


def test_optim_scheme_alternation_and_state():
    m = torch.nn.Linear(3, 2)
    a = torch.optim.SGD([m.weight], lr=0.1)
    b = torch.optim.SGD([m.bias], lr=0.1)
    scheme = OptimScheme({"w": a, "b": b}, active=lambda s: ("w",) if s % 2 == 0 else ("b",))
    assert scheme.active(0) == ("w",) and scheme.active(1) == ("b",)
    assert [p is m.bias for p in scheme.params(["b"])] == [True]
    with pytest.raises(ValueError, match="optimisers"):
        OptimScheme({"w": a}).load_state_dict(scheme.state_dict())
    with pytest.raises(KeyError):
        OptimScheme({"w": a}, active=lambda s: ("x",)).active(0)


def test_adam_warmup():
    m = torch.nn.Linear(3, 2)
    cfg = dict(BASE["optim"], lr=3e-4, warmup_steps=4, warmup_start_lr=3e-6)
    scheme = adam_scheme(m, cfg)
    lrs = []
    for _ in range(6):
        lrs.append(scheme.lrs()["main"])
        m(torch.randn(1, 3)).sum().backward()
        scheme.optimizers["main"].step()
        scheme.step_schedulers(["main"])
        scheme.zero_grad()
    assert lrs[0] == pytest.approx(3e-6) and lrs[4] == pytest.approx(3e-4) and lrs[5] == pytest.approx(3e-4)
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] < lrs[4]
