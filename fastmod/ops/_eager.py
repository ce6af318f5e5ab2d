"""Eager calls of the Triton ops without the torch.library dispatch.

A Python custom op with registered autograd costs about 20 us of host time per
call (measured on this project's CPU VM, torch 2.14: 21.4 us against 3.6 us for a
``torch.autograd.Function`` around the same no-op), several times a small gate or
node kernel's GPU time.  So eager calls run the op's Python implementation inside
an autograd.Function built from the very same setup_context/backward the
registered op uses, and only traced code (torch.compile) goes through the
registered op, which it needs to see into the Triton kernels.
"""
from __future__ import annotations

from typing import Callable

import torch


def eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable):
    """An autograd.Function class from ``forward(*inputs)`` (no ctx),
    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``, as
    ``torch.library.register_autograd`` takes them.  Every input must be passed
    (defaults are not filled in).  The class uses the ctx-first ``forward``
    style: with a separate ``setup_context``, ``Function.apply`` binds the
    arguments through ``inspect.signature`` on every call (~15 us)."""

    def fwd(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(backward)})


def call(op, function, *args):
    """``op(*args)`` while torch.compile traces, else ``function.apply(*args)``."""
    if torch.compiler.is_compiling():
        return op(*args)
    return function.apply(*args)
