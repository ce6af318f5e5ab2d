"""Loads the compiled extension ``fastmod._C`` once and remembers why it failed.

Importing fastmod never fails because the extension is missing: the C++/CUDA
backends are then reported unavailable and the ops fall back (see
``fastmod.backends``).  Asking for such a backend explicitly raises with the
original import error so the user can see what went wrong.
"""
from __future__ import annotations

import functools
import importlib
import warnings

_loaded: bool | None = None
_error: BaseException | None = None


def load() -> bool:
    """Import ``fastmod._C`` (registering its ops); return whether it worked."""
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("fastmod._C")
            _loaded = True
        except (ImportError, OSError) as exc:  # missing build or ABI mismatch
            _loaded, _error = False, exc
            warnings.warn(
                f"fastmod._C could not be loaded ({exc}); the C++/CUDA kernels are off and "
                "ops fall back to Triton or the PyTorch reference. Reinstall with "
                "`pip install -e .` against the torch you run.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _loaded


def error() -> BaseException | None:
    """The exception raised by importing ``fastmod._C``, or None."""
    load()
    return _error


@functools.lru_cache(maxsize=None)  # the answer is fixed per process; ops ask on every call
def has_op(name: str, dispatch_key: str | None = None) -> bool:
    """Whether ``torch.ops.fastmod.<name>`` was registered by the extension
    (and, given ``dispatch_key`` such as "CPU" or "CUDA", has a kernel for it)."""
    import torch

    if not (load() and hasattr(torch.ops.fastmod, name)):
        return False
    if dispatch_key is None:
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmod::{name}", dispatch_key)


def cuda_compiled() -> bool:
    """Whether the extension was built with its CUDA sources."""
    import torch

    return load() and bool(torch.ops.fastmod.cuda_compiled())
