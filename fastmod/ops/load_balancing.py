"""QGMRN's load-balancing loss (paper section 3.5, after Shazeer et al. 2017)."""
from __future__ import annotations

import torch

from fastmod import _checks

EPS = 1e-10


def load_balancing_loss(gates: torch.Tensor, *, eps: float = EPS) -> torch.Tensor:
    """L_load = Σ_l CV(A_l,:)², with loads A_l,m = Σ_i P_l,m^(i).

    Args:
        gates: P, [B, L, M] (batch, layers, modules), floating (typically the
            straight-through gates of ``gumbel_sigmoid_gate``, so the loss is
            differentiable through them).
        eps: added to the squared mean in the denominator so that a layer whose
            modules are all off (A_l,: = 0) gives 0, not NaN.

    CV² = var / (mean² + eps) over the M modules of a layer, with the
    *population* variance (correction 0: the loads are the whole population of
    the layer's modules, and M = 1 gives 0 rather than NaN).  The loss is 0
    exactly when every module of every layer has the same load.

    Returns a scalar, float32 (float64 for float64 gates).
    """
    _checks.tensor("gates", gates)
    if gates.dim() != 3:
        raise ValueError(f"gates must have shape [B, L, M], got shape {tuple(gates.shape)}")
    if gates.shape[0] == 0 or gates.shape[2] == 0:
        raise ValueError(f"gates must have at least one sample and one module, got shape {tuple(gates.shape)}")
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}")
    compute = torch.float64 if gates.dtype == torch.float64 else torch.float32
    loads = gates.to(compute).sum(0)                      # [L, M]
    mean = loads.mean(-1)
    var = loads.var(-1, correction=0)
    return (var / (mean * mean + eps)).sum()
