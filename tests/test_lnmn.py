"""LNMN (fastmod.models.lnmn): the stack, the generic modules, the losses, the
kernel path against the reference path, the optimiser scheme and the registry."""
import pytest
import torch

from _train_helpers import output_and_grads, padded_questions
from fastmod.models.lnmn import LNMN, lnmn_scheme, ptr_pop, ptr_push, stack_read
from fastmod.nn import MixedNode
from fastmod.train import registry
from fastmod.train.config import BASE, merge


def _tiny(**kw):
    args = dict(modules=(2, 1, 1, 1), steps=3, stack_len=4, map_dim=8, lstm_dim=16, wordvec_dim=8,
                stem_channels=(8,), fc_dims=(16,), entropy_schedule=(10, 5))
    args.update(kw)
    return LNMN(30, 11, (3, 16, 16), True, **args)


def _batch():
    lens = torch.tensor([7, 5, 3, 1])
    return padded_questions(lens, 30), lens, torch.randn(4, 3, 16, 16)


def test_stack_pointer_moves_and_stops_at_the_ends():
    p = torch.eye(4)  # pointer at each of the 4 slots
    torch.testing.assert_close(ptr_push(p), torch.eye(4)[[1, 2, 3, 3]])
    torch.testing.assert_close(ptr_pop(p), torch.eye(4)[[0, 0, 1, 2]])
    soft = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert torch.allclose(ptr_push(soft).sum(), torch.tensor(1.0))
    assert torch.allclose(ptr_pop(soft).sum(), torch.tensor(1.0))
    att = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    assert torch.equal(stack_read(att, torch.eye(4)[[2]]), torch.full((1, 1, 2, 2), 2.0))


def test_step_moves_the_stack_like_stack_nmn():
    """One step with all weight on one module: an attention 3-in module at the bottom
    writes its map above the initial one (pop stays at the bottom, push moves up);
    a 4-in module pops two maps and writes one; NoOp leaves everything as it was."""
    m = _tiny().eval()
    B, L = 2, m.L
    img = torch.randn(B, m.D, 4, 4)
    att = torch.zeros(B, L, 4, 4)
    att[:, 0] = 1.0
    ptr = torch.eye(L)[[0, 0]]
    mem, c = torch.randn(B, m.D), torch.randn(B, 16)

    def only(i):
        w = torch.zeros(B, m.num_modules)
        w[:, i] = 1.0
        return w
    with torch.no_grad():
        a1, p1, mem1 = m._step(img, att, ptr, mem, c, only(0))             # attention 3-in
        assert p1.argmax(1).tolist() == [1, 1] and torch.equal(a1[:, 0], att[:, 0])
        torch.testing.assert_close(a1[:, 1:2], m.groups["att3"](img, (att[:, :1],), c, mem)[:, :1])
        torch.testing.assert_close(mem1, mem)                               # carried through
        ptr2 = torch.eye(L)[[1, 1]]  # a sharp pointer at slot 1
        a2, p2, _ = m._step(img, a1, ptr2, mem, c, only(2))                # attention 4-in: pops 2, pushes 1
        assert p2.argmax(1).tolist() == [1, 1]
        a3, p3, mem3 = m._step(img, a1, ptr2, mem, c, only(m.num_modules - 1))  # NoOp
        assert torch.equal(a3, a1) and torch.equal(mem3, mem) and p3.argmax(1).tolist() == [1, 1]


def test_train_output_aux_and_every_parameter_learns():
    m = _tiny()
    out, aux = m(*_batch())
    assert out.shape == (4, 11) and aux.dim() == 0
    w = m.last_module_weights
    assert w.shape == (4, 3, 6) and torch.allclose(w.sum(2), torch.ones(4, 3))
    # aux = -lambda_w / T * sum_t H(w_t) - lambda_op * sum ||softmax(alpha)||_2 (lambda_w = 1 at step 0)
    entropy = -(w * w.log()).sum(2).mean(0).sum()
    ratio = sum(torch.softmax(n.alpha, -1).norm(dim=-1).sum() for n in m.mixed_nodes())
    torch.testing.assert_close(aux, -entropy / 3 - ratio, rtol=1e-4, atol=1e-5)
    (out.sum() + aux).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    assert all(n.alpha.grad.abs().sum() > 0 for n in m.mixed_nodes())


def test_entropy_coefficient_schedule():
    m = _tiny(entropy_schedule=(10, 5))
    got = []
    for s in (0, 5, 10, 12, 15, 40):
        m.train_steps.fill_(s)
        got.append(m.entropy_coefficient())
    assert got == pytest.approx([1.0, 0.5, 0.0, -0.4, -1.0, -1.0])
    m.train()
    m.train_steps.zero_()
    m(*_batch())
    assert int(m.train_steps) == 1  # counted per training forward, checkpointed as a buffer
    assert "train_steps" in m.state_dict()


@pytest.mark.parametrize("modules", [(2, 1, 1, 1), (1, 2, 2, 2)])
def test_kernel_path_matches_reference_path(modules):
    torch.manual_seed(3)
    m = _tiny(modules=modules).eval()
    with torch.no_grad():
        for n in m.mixed_nodes():
            n.alpha.normal_()
    batch = _batch()
    out_k, g_k = output_and_grads(m, batch, True)
    out_r, g_r = output_and_grads(m, batch, False)
    torch.testing.assert_close(out_k, out_r, rtol=1e-4, atol=1e-5)
    for name in g_r:
        torch.testing.assert_close(g_k[name], g_r[name], rtol=1e-3, atol=1e-5, msg=name)


def test_hard_mode_inference():
    m = _tiny().eval()
    with torch.no_grad():
        soft = m(*(b := _batch()))
        for n in m.mixed_nodes():
            n.mode = "hard"
        hard = m(*b)
    assert hard.shape == soft.shape and torch.isfinite(hard).all() and not torch.equal(hard, soft)


def test_scheme_alternates_weights_and_alphas():
    m = _tiny()
    cfg = merge(BASE, registry.get("lnmn").defaults, "test", strict=False)["optim"]
    scheme = lnmn_scheme(m, cfg)
    assert scheme.active(0) == ("weights",) and scheme.active(1) == ("arch",)
    arch = {id(p) for p in scheme.params(["arch"])}
    assert arch == {id(n.alpha) for n in m.mixed_nodes()}
    assert not arch & {id(p) for p in scheme.params(["weights"])}
    a = scheme.optimizers["arch"].param_groups[0]
    assert a["lr"] == 3e-4 and a["betas"] == (0.5, 0.999) and a["weight_decay"] == 1e-3
    assert scheme.optimizers["weights"].param_groups[0]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("name, counts", [("lnmn", (4, 2, 1, 1)), ("lnmn-11", (4, 2, 2, 2)), ("lnmn-14", (5, 4, 2, 2))])
def test_paper_configurations(name, counts):
    spec = registry.get(name)
    cfg = merge(BASE, spec.defaults, "test", strict=False)
    ctx = registry.ModelContext(num_tokens=90, num_answers=28, visual_shape=(1024, 14, 14), is_pixels=False)
    m = spec.build(cfg["model"], ctx)
    assert m.T == 5 and m.L == 5 and m.D == 384 and m.num_modules == sum(counts) + 1
    assert [g.K for g in m.groups.values()] == list(counts)
    # nodes per module: 2 with 3 inputs, 3 with 4; K-batched per depth
    assert sum(n.num_nodes for n in m.mixed_nodes()) == 2 * counts[0] + 3 * counts[1] + 2 * counts[2] + 3 * counts[3]
    assert all(isinstance(n, MixedNode) for n in m.mixed_nodes())


def test_bad_arguments():
    with pytest.raises(ValueError, match="modules"):
        _tiny(modules=(1, 1, 1))
    with pytest.raises(ValueError, match="steps"):
        _tiny(steps=0)
    with pytest.raises(ValueError, match="lstm_dim"):
        _tiny(lstm_dim=15)


def test_bilstm_encoder_matches_packed_sequences_and_ignores_padding():
    from fastmod.models.lnmn import BiLstmEncoder
    enc = BiLstmEncoder(20, 6, 10)
    lens = torch.tensor([7, 3, 1, 5])
    q = padded_questions(lens, 20)
    hs, qv, mask = enc(q, lens)
    emb = enc.embed(q)
    for b, n in enumerate(lens.tolist()):  # each question alone, no padding
        f, (hf, _) = enc.fwd(emb[b:b + 1, :n])
        r, (hr, _) = enc.bwd(emb[b:b + 1, :n].flip(1))
        torch.testing.assert_close(hs[b, :n], torch.cat([f[0], r[0].flip(0)], 1))
        torch.testing.assert_close(qv[b], torch.cat([hf[0, 0], hr[0, 0]]))
    assert mask.sum(1).tolist() == lens.tolist()
    longer = torch.cat([q, torch.zeros(4, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(enc(longer, lens)[1], qv)


def test_compiles_as_one_graph():
    """No graph breaks: the kernels are torch.library ops and the encoder needs no
    host values (Dynamo's LSTM support is behind allow_rnn)."""
    m = _tiny().eval()
    batch = _batch()
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True):
        want = m(*batch)
        got = torch.compile(m, fullgraph=True)(*batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
