"""routed_conv2d's CUDA source (csrc/routed_conv/routed_conv_cuda.cu) run on the CPU
through the emulator in tests/cuda_emu: work list, tiling, operand index math,
epilogues and host code against the reference, without a GPU.  Timing, inter-CTA
races and the real WMMA fragment layouts are only checked on a GPU
(test_routed_conv_cuda.py)."""
import os
import shutil

import pytest
import torch

from fastmod.ops import routed_conv2d_reference
from test_routed_conv import make_gates


def _toolchain() -> bool:
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return False
    return shutil.which(os.environ.get("CXX", "c++")) is not None


pytestmark = pytest.mark.skipif(not _toolchain(), reason="needs ninja and a C++ compiler")


@pytest.fixture(scope="module")
def emu():
    from cuda_emu import emulator

    return emulator.load()


def _pairs(v):
    return [v, v] if isinstance(v, int) else list(v)


def check(emu, mode, *, kind, n=2, cin=8, cout=8, hw=(7, 7), k=3, blocks=4, stride=1, padding=None,
          dilation=1, bias=True, dtype=torch.float64,
          masks=((True, True, True, True), (False, False, False, True)), tol=None):
    """Forward and every gradient (exact and active) of the emulated op vs the reference;
    fp16/bf16/fp32 against the float64 reference of the same rounded inputs."""
    groups = blocks if mode == "group" else 1
    padding = dilation * (k - 1) // 2 if padding is None else padding
    x = torch.randn(n, cin, *hw).to(dtype)
    w = (torch.randn(cout, cin // groups, k, k) / (cin // groups * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout).to(dtype) if bias else None
    gates = make_gates(kind, n, blocks, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    conv = (_pairs(stride), _pairs(padding), _pairs(dilation), groups, mode)
    tol = tol or {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 3e-2, torch.bfloat16: 6e-2}[dtype]

    def close(a, r, what):
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        err = (a.double() - r.double()).abs().max().item() if r.numel() else 0.0
        assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"

    y = emu.routed_conv2d(x, w, gates, b, *conv, True)
    assert y.dtype == dtype and y.is_contiguous()
    kw = dict(stride=conv[0], padding=conv[1], dilation=conv[2], groups=groups, gate_on=mode)
    dy = torch.randn(y.shape, dtype=torch.float64)
    for exact in (True, False):
        ins = [t.double().clone().requires_grad_(True) if t is not None else None for t in (x, w, gates, b)]
        yr = routed_conv2d_reference(*ins, router_grad="exact" if exact else "active", **kw)
        close(y, yr.detach(), "forward")
        yr.backward(dy)
        ref = (ins[0].grad, ins[1].grad, ins[3].grad if bias else None, ins[2].grad)
        for mask in masks:
            got = emu.routed_conv2d_backward(dy.to(dtype), x, w, gates, b, y, *conv, list(mask), exact)
            for name, a, r, m in zip(("grad_x", "grad_w", "grad_b", "grad_gates"), got, ref, mask):
                if m and r is not None:
                    close(a, r, f"{name} (exact={exact}, mask={mask})")
    if mode != "in":
        assert (y.view(n, blocks, -1)[gates == 0] == 0).all()


SHAPES = [  # tile edges, several pixel/column tiles, 1-64 channels per block
    ("group", dict(cin=8, cout=8, blocks=4, hw=(13, 11))),
    ("group", dict(cin=32, cout=24, blocks=4, hw=(6, 6), stride=2)),
    ("group", dict(cin=6, cout=3, blocks=3, hw=(20, 17), n=1)),
    ("group", dict(cin=8, cout=16, blocks=4, hw=(8, 7), k=2, stride=(2, 1), padding=(1, 0), bias=False)),
    ("out", dict(cin=5, cout=67, blocks=67, hw=(10, 9))),
    ("out", dict(cin=9, cout=130, blocks=10, hw=(4, 4), stride=2)),
    ("out", dict(cin=3, cout=260, blocks=260, hw=(5, 4))),  # > 128 gates: the work list's runs
    ("out", dict(cin=6, cout=8, blocks=4, hw=(9, 10), dilation=2, stride=2)),
    ("in", dict(cin=7, cout=9, blocks=7, hw=(11, 10))),
    ("in", dict(cin=12, cout=70, blocks=3, hw=(8, 8), k=1, stride=2)),
    ("in", dict(cin=8, cout=6, blocks=2, hw=(10, 9), dilation=2, padding=1, bias=False)),
]


@pytest.mark.parametrize("mode,over", SHAPES)
@pytest.mark.parametrize("kind", ["random", "nonbinary"])
def test_float64_matches_reference(emu, mode, over, kind):
    check(emu, mode, kind=kind, **over)


@pytest.mark.parametrize("mode", ["group", "out", "in"])
@pytest.mark.parametrize("kind", ["on", "off"])
def test_all_on_all_off(emu, mode, kind):
    check(emu, mode, kind=kind, hw=(5, 6))


@pytest.mark.parametrize("mode", ["group", "out", "in"])
def test_empty_batch(emu, mode):
    groups = 4 if mode == "group" else 1
    x, w, gates = torch.randn(0, 8, 5, 5), torch.randn(8, 8 // groups, 3, 3), torch.zeros(0, 4)
    conv = ([1, 1], [1, 1], [1, 1], groups, mode)
    y = emu.routed_conv2d(x, w, gates, None, *conv, True)
    assert y.shape == (0, 8, 5, 5)
    got = emu.routed_conv2d_backward(y, x, w, gates, None, y, *conv, [True] * 4, True)
    assert [tuple(t.shape) for t in got] == [(0, 8, 5, 5), (8, 8 // groups, 3, 3), (8,), (0, 4)]
    assert got[1].abs().sum() == 0


@pytest.mark.parametrize("dtype,over", [
    (torch.float64, dict(cin=8, cout=8, blocks=4, hw=(5, 4))),                # SIMT grad_weight
    (torch.float16, dict(cin=64, cout=64, blocks=2, hw=(4, 4), tol=3e-2)),    # WMMA grad_weight
])
def test_group_grad_weight_over_sample_chunks(emu, dtype, over):
    """Group-mode grad_weight sums chunks of 8 samples per CTA: 19 samples make two
    full chunks and a partial one, with off blocks inside the chunks."""
    check(emu, "group", kind="random", n=19, dtype=dtype, **over)


TC_SHAPES = [  # >= 32 channels per tile: the tensor-core kernel's cases
    ("group", dict(cin=64, cout=96, blocks=2, hw=(9, 11), n=1)),
    ("out", dict(cin=33, cout=70, blocks=70, hw=(13, 7), stride=2)),
    ("in", dict(cin=48, cout=40, blocks=6, hw=(10, 10), stride=2)),
]


@pytest.mark.parametrize("mode,over", TC_SHAPES)
@pytest.mark.parametrize("tf32", [True, False])
def test_float32_tf32_only_when_allowed(emu, mode, over, tf32):
    torch.backends.cudnn.allow_tf32 = tf32  # conftest's autouse fixture restores it
    before = emu.mma_calls()
    check(emu, mode, kind="nonbinary", dtype=torch.float32, masks=((True, True, True, True),),
          tol=1e-2 if tf32 else None, **over)
    assert (emu.mma_calls() > before) == tf32


@pytest.mark.parametrize("mode,over", TC_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tc", ["1", "0"])
def test_half_tensor_core_and_simt(emu, mode, over, dtype, tc, monkeypatch):
    monkeypatch.setenv("FASTMOD_ROUTED_CONV_TC", tc)
    before = emu.mma_calls()
    check(emu, mode, kind="nonbinary", dtype=dtype, masks=((True, True, True, True),), **over)
    assert (emu.mma_calls() > before) == (tc == "1")
