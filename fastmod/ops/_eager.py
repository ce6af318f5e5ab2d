"""Eager calls of the Triton (and C++) ops without the torch.library dispatch.

A Python custom op with registered autograd costs about 20 us of host time per
call (measured on this project's CPU VM, torch 2.14: 21.4 us against 3.6 us for a
``torch.autograd.Function`` around the same no-op), several times a small gate or
node kernel's GPU time.  So eager calls run the op's Python implementation inside
an autograd.Function built from the very same setup_context/backward the
registered op uses, and only traced code (torch.compile) goes through the
registered op, which it needs to see into the Triton kernels.  Both directions
launch their kernels directly, as a triton_op's own eager calls do (see
``direct_launch``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:  # torch.library.triton_op runs its kernels the same way (its backend_fn)
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:  # pragma: no cover (a torch without wrap_triton has no triton_op either)
    set_wrap_triton_enabled = None


def direct_launch(fn: Callable) -> Callable:
    """``fn`` with ``wrap_triton(kernel)[grid](...)`` launching the kernel directly.

    Outside a triton_op, wrap_triton sends every eager launch through a higher-order
    op: ~48 us more host time per launch than a direct one (4 us, this project's CPU
    VM, torch 2.14, the launch itself stubbed out), and one entry per launch added
    for good to torch's kernel side table (its constant arguments), which grows
    without bound over a training run.  Under a Python dispatch mode (FakeTensorMode,
    make_fx, export) the HOP is what traces the kernel, so it stays on there."""
    if set_wrap_triton_enabled is None:
        return fn

    def run(*args):
        if _get_current_dispatch_mode() is not None:
            return fn(*args)
        with set_wrap_triton_enabled(False):
            return fn(*args)
    return run


def below_autograd(op: Callable) -> Callable:
    """``op(*args)`` with the autograd dispatch keys excluded: for a C++ op run inside
    an ``eager_function``, whose Function already records the graph, so the op's own
    registered autograd (torch.library's Python wrapper: ~20 us a call) is skipped."""
    def run(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return run


def eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable,
                   triton: bool = True):
    """An autograd.Function class from ``forward(*inputs)`` (no ctx),
    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``, as
    ``torch.library.register_autograd`` takes them.  Every input must be passed
    (defaults are not filled in).  The class uses the ctx-first ``forward``
    style: with a separate ``setup_context``, ``Function.apply`` binds the
    arguments through ``inspect.signature`` on every call (~15 us).  ``triton``:
    forward and backward launch Triton kernels (run under ``direct_launch``)."""

    wrap = direct_launch if triton else (lambda fn: fn)
    direct = wrap(forward)

    def fwd(ctx, *inputs):
        output = direct(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(fwd), "backward": staticmethod(wrap(backward))})


def call(op, function, *args):
    """``op(*args)`` while torch.compile traces, else ``function.apply(*args)``."""
    if torch.compiler.is_compiling():
        return op(*args)
    return function.apply(*args)
