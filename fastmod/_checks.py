"""Argument checks shared by the ops: each raises naming the bad argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {value.dtype}")
    return value


def _same(attr: str, exc: type, hint: str, tensors: dict):
    names = list(tensors)
    first = getattr(tensors[names[0]], attr)
    for n in names[1:]:
        value = getattr(tensors[n], attr)
        if value != first:
            raise exc(f"{n} has {attr} {value} but {names[0]} has {first}; {hint}")
    return first


def same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    return _same("dtype", TypeError, "pass tensors of one dtype", tensors)


def same_device(**tensors: torch.Tensor) -> torch.device:
    return _same("device", ValueError, "move them to one device", tensors)


def broadcast_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> torch.Size:
    # Hand-rolled: torch.broadcast_shapes costs more than a small kernel launch.
    sa, sb = a.shape, b.shape
    if sa == sb:
        return sa
    n = max(len(sa), len(sb))
    pa, pb = (1,) * (n - len(sa)) + tuple(sa), (1,) * (n - len(sb)) + tuple(sb)
    out = []
    for da, db in zip(pa, pb):
        if da != db and da != 1 and db != 1:
            raise ValueError(f"{name_a} of shape {tuple(sa)} and {name_b} of shape {tuple(sb)} "
                             "are not broadcastable")
        out.append(db if da == 1 else da)
    return torch.Size(out)


def choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


def positive_finite(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not (v > 0 and v != float("inf")):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return v
