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


def getenv(name: str, default: str) -> str:
    """``os.environ.get(name, default)`` without its cost when the variable is unset (a
    KeyError raised and caught inside ``Mapping.get``), which every eager op call paid
    here: ~5 us of a 64 us Gumbel-gate training step on the CPU.  Reads the mapping's
    own dict, which ``os.environ`` keeps in step with every change."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if data is None or encode is None:  # not CPython's os._Environ
        return os.environ.get(name, default)
    raw = data.get(encode(name))
    return default if raw is None else os.environ.decodevalue(raw)


def kernels_enabled() -> bool:
    """False when the environment variable ``FASTMOD_KERNELS`` is ``0``."""
    return getenv("FASTMOD_KERNELS", "1").strip() != "0"


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return getenv("TRITON_INTERPRET", "0") == "1"


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


_AUTO: dict[tuple, str] = {}


def _auto(device: torch.device, implemented: Sequence[str], cpp_op: str | None) -> str:
    """The first implemented backend that can run on ``device``, else the reference."""
    for name in implemented:
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter is a test vehicle, never picked automatically
        if available(name, device, cpp_op if name in ("cpu", "cuda") else None):
            return name
    return "reference"


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
        if torch.compiler.is_compiling():
            return _auto(device, implemented, cpp_op)
        # The automatic choice depends on nothing else once the extension is loaded;
        # looked up, it costs eager calls ~4 us less than the loop below.
        key = (device.type, tuple(implemented), cpp_op)
        choice = _AUTO.get(key)
        if choice is None:
            choice = _AUTO[key] = _auto(device, implemented, cpp_op)
        return choice
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
