"""The one place that decides which implementation of an op runs.

Backends:
  ``"reference"``  plain PyTorch (``fastmod.ops.*_reference``); always there.
  ``"triton"``     Triton kernels from ``fastmod.kernels``; CUDA tensors, or CPU
                   tensors under ``TRITON_INTERPRET=1`` (used by the tests).
  ``"cpu"``        C++ kernels in ``fastmod._C`` for CPU tensors.
  ``"cuda"``       CUDA kernels in ``fastmod._C`` for CUDA tensors.

``backend=None`` (or ``"auto"``) picks the op's first implemented backend that
can run on the inputs' device, or the reference when none can, or when
kernels are switched off with ``FASTMOD_KERNELS=0``.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import torch

from fastmod import _extension

BACKENDS = ("reference", "triton", "cpu", "cuda")


def kernels_enabled() -> bool:
    """False when the environment variable ``FASTMOD_KERNELS`` is ``0``."""
    return os.environ.get("FASTMOD_KERNELS", "1").strip() != "0"


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result  # asks the dispatcher, which dynamo cannot trace
def available(backend: str, device: torch.device, op: str | None = None) -> bool:
    """Whether ``backend`` can run on ``device`` (and, if given, has op ``op``)."""
    if backend == "reference":
        return True
    if backend == "triton":
        return triton_installed() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreting()))
    if backend == "cpu":
        return device.type == "cpu" and (_extension.has_op(op, "CPU") if op else _extension.load())
    if backend == "cuda":
        return device.type == "cuda" and _extension.cuda_compiled() and (op is None or _extension.has_op(op, "CUDA"))
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def select(op: str, requested: str | None, device: torch.device, implemented: Sequence[str],
           cpp_op: str | None = None) -> str:
    """Resolve the backend for one call of ``op``.

    ``implemented`` lists the op's kernel backends in order of preference;
    ``cpp_op`` names its ``torch.ops.fastmod`` entry (checked for "cpu"/"cuda").
    An explicit request that cannot run raises ``RuntimeError`` saying why.
    """
    if requested is None or requested == "auto":
        if not kernels_enabled():
            return "reference"
        for name in implemented:
            if name == "triton" and device.type == "cpu":
                continue  # the interpreter is a test vehicle, never picked automatically
            if available(name, device, cpp_op if name in ("cpu", "cuda") else None):
                return name
        return "reference"
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
    if requested != "reference" and requested not in implemented:
        raise ValueError(f"{op} has no {requested!r} backend; it has {['reference', *implemented]}")
    if not available(requested, device, cpp_op if requested in ("cpu", "cuda") else None):
        reason = ""
        if requested in ("cpu", "cuda") and _extension.error() is not None:
            reason = f" (fastmod._C failed to load: {_extension.error()})"
        elif requested == "triton" and not triton_installed():
            reason = " (triton is not installed)"
        raise RuntimeError(f"{op}: backend {requested!r} cannot run on device {device}{reason}")
    return requested
