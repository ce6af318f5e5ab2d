"""Checks shared by the routed-convolution tests: a fused op's autograd fallback
against its float64 reference, routed_conv2d's weight gradient against the
reference's, and a script run in a fresh process with the direct CPU kernels
switched off or forced to their AVX2 build."""
import os
import subprocess
import sys

import torch


def assert_grads_match_reference(fast, reference, leaves64, gen, out_tol, rtol, atol):
    """fast(*float32 copies) against reference(*leaves64): outputs, and every leaf's
    gradient for the same random upstream gradient."""
    leaves64 = [t.requires_grad_() for t in leaves64]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    got, want = fast(*leaves32), reference(*leaves64)
    dy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(got, leaves32, dy.float())
    grads_ref = torch.autograd.grad(want, leaves64, dy)
    torch.testing.assert_close(got, want.float(), **out_tol)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b.float(), rtol=rtol, atol=atol)


def assert_weight_grad_matches(x, wt, g, dy, atol, **kw):
    """grad_weight of routed_conv2d (CPU backend, float32) against the float64
    reference's, for the same x, weight, gates and upstream gradient dy."""
    from fastmod.ops import routed_conv2d, routed_conv2d_reference

    grads = []
    for fn, dt, extra in ((routed_conv2d, torch.float32, dict(backend="cpu")),
                          (routed_conv2d_reference, torch.float64, {})):
        wl = wt.detach().to(dt).requires_grad_()
        y = fn(x.to(dt), wl, g.to(dt), **kw, **extra)
        grads.append(torch.autograd.grad(y, wl, dy.to(dt))[0])
    torch.testing.assert_close(grads[0], grads[1].float(), rtol=1e-4, atol=atol)


def run_with_direct_setting(script: str, direct: str = "0") -> None:
    """Runs `script` (which prints "ok" last) with FASTMOD_ROUTED_CONV_DIRECT=direct
    ("0": off, "avx2"), which is read once per process, hence the fresh one."""
    env = dict(os.environ, FASTMOD_ROUTED_CONV_DIRECT=direct)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
