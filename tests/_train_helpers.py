"""Shared tiny configuration for the test_train_* files: a generated dataset of
12 images (48 questions) at 32 px, cached once per session, and models of a
few thousand parameters, so a whole training run takes a second or two."""
from __future__ import annotations

import os

import pytest

TINY_MODEL = ["model.wordvec_dim=8", "model.rnn_dim=16", "model.rnn_num_layers=1", "model.fc_dims=[16]"]
TINY_CNN = ["model.stem_channels=[4,8]", "model.cnn_proj_dim=0", "model.cnn_pooling=none"]
TINY_QGMRN = ["model.wordvec_dim=8", "model.rnn_dim=16", "model.fc_dims=[16]", "model.stem_channels=4",
              "model.classifier_proj_dim=8", "model.widths=[8,8,16,16]"]
TINY_LNMN = ["model.wordvec_dim=8", "model.lstm_dim=16", "model.map_dim=8", "model.fc_dims=[16]",
             "model.stem_channels=[4]", "model.steps=2", "model.stack_len=3"]


def tiny_args(cache_dir, out, model="cnn-lstm", *extra_set, steps=None, epochs=2, tiny_model=True) -> list[str]:
    sets = ["data.generated.n_train=12", "data.generated.n_val=4", "data.generated.image_size=32",
            "data.generated.questions_per_image=4", "data.image_size=32", f"data.cache_dir={cache_dir}",
            "data.num_workers=0", "train.batch_size=8", "train.eval_batch_size=16", "train.log_every=2",
            "train.ckpt_every=4", "train.tensorboard=false", "train.threads=1"]
    if tiny_model:
        sets += TINY_QGMRN if model.startswith("qgmrn") else TINY_LNMN if model.startswith("lnmn") else TINY_MODEL
    if model == "cnn-lstm":
        sets += TINY_CNN
    sets += list(extra_set)
    args = ["--model", model, "--out", str(out), "--no-progress", "--epochs", str(epochs)]
    if steps is not None:
        args += ["--steps", str(steps)]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A dataset cache directory shared by the session's runs (generated on first use)."""
    d = tmp_path_factory.mktemp("fastmod-data")
    os.environ.setdefault("FASTMOD_CACHE", str(d / "cache"))
    return d


def padded_questions(lens, num_tokens: int):
    """[len(lens), max(lens)] token ids: random real tokens (1 ... num_tokens - 1)
    up to each length, <NULL> (0) after; for the question encoders' tests."""
    import torch
    q = torch.zeros(len(lens), int(max(lens)), dtype=torch.long)
    for i, n in enumerate(lens):
        q[i, :n] = torch.randint(1, num_tokens, (int(n),))
    return q


def output_and_grads(model, batch, use_kernels: bool):
    """model(*batch) on its kernel or reference path, and every parameter's gradient
    of the squared output's sum: (output, {name: grad})."""
    from fastmod.nn import set_use_kernels
    set_use_kernels(model, use_kernels)
    model.zero_grad()
    out = model(*batch)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
