"""Whole models: a training step (forward + backward of the loss, the model's own
auxiliary loss included) and an inference forward, with fastmod's kernels
(``use_kernels=True``) against the same model on its plain-PyTorch reference path
(``use_kernels=False``), side by side in one run.

CPU: each model's quick preset (the one ``python -m fastmod.train`` trains with no
dataset), batch 32, 64 x 64 images.  GPU, or ``FASTMOD_BENCH_PAPER=1``: the paper
configurations (QGMRN on 224 x 224 pixels; LNMN on 1024 x 14 x 14 feature maps, as
Stack-NMN), batch 64 on a GPU, 4 on the CPU (``FASTMOD_BENCH_BATCH`` overrides).
Wall clock with a sync (the LNMN controller packs variable-length questions on the
host, so its steps cannot be captured in a CUDA graph).
"""
import os

import pytest
import torch

from _harness import run
from conftest import DEVICE
from fastmod.nn import set_use_kernels
from fastmod.train import registry
from fastmod.train.config import BASE, merge

MODELS = ("lnmn", "qgmrn-brn", "qgmrn-frn")
GPU = DEVICE == "cuda"
PAPER = GPU or os.environ.get("FASTMOD_BENCH_PAPER") == "1"
BATCH = int(os.environ.get("FASTMOD_BENCH_BATCH", 64 if GPU else 4 if PAPER else 32))


def _model(name):
    spec = registry.get(name)
    cfg = merge(BASE, spec.defaults, "bench", strict=False)
    if not PAPER:
        cfg = merge(cfg, spec.quick, "bench")
    pixels = name.startswith("qgmrn") or not PAPER
    shape = ((3, 224, 224) if PAPER else (3, 64, 64)) if pixels else (1024, 14, 14)
    ctx = registry.ModelContext(num_tokens=90, num_answers=28, visual_shape=shape, is_pixels=pixels)
    return spec.build(cfg["model"], ctx).to(DEVICE), shape


def make_step(name: str, impl: str, pass_: str):
    """step(): one training step or inference forward of model ``name`` with
    fastmod's kernels (impl "fastmod") or on its reference path ("reference")."""
    torch.manual_seed(0)
    model, shape = _model(name)
    set_use_kernels(model, impl == "fastmod")
    lens = torch.randint(4, 20, (BATCH,), device=DEVICE)
    q = torch.randint(1, 90, (BATCH, 20), device=DEVICE) * (torch.arange(20, device=DEVICE) < lens[:, None])
    vis = torch.randn(BATCH, *shape, device=DEVICE)
    ans = torch.randint(0, 28, (BATCH,), device=DEVICE)
    if pass_ == "infer":
        model.eval()

        def step():
            with torch.no_grad():
                model(q, lens, vis)
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            logits, aux = model(q, lens, vis)
            (torch.nn.functional.cross_entropy(logits, ans) + aux).backward()
    return step


@pytest.mark.parametrize("impl", ["fastmod", "reference"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pass_", ["infer", "train"])
def test_model(benchmark, impl, name, pass_):
    run(benchmark, make_step(name, impl, pass_), group=f"model {name} {pass_}{' paper' if PAPER else ''}",
        impl=impl, nbytes=0, n_rounds=10 if GPU else 3, warmup=2 if GPU else 1, graph=False, batch=BATCH)
