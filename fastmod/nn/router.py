"""QGMRN's routing network: question features -> binary routing path (paper section 3.3)."""
from __future__ import annotations

import math

import torch

from fastmod import _checks
from fastmod.nn._switch import KernelSwitch
from fastmod.ops.gumbel_gate import gumbel_sigmoid_gate


class GumbelSigmoidRouter(KernelSwitch, torch.nn.Module):
    """A linear layer q -> L×M logits P̃, gated by the Gumbel-sigmoid straight-through gate.

    Args:
        in_features: h, size of the question features q.
        num_layers: L, routed layers.
        num_modules: M, modules (branches or filters) per layer.
        tau: temperature τ > 0; assign ``router.tau = ...`` to anneal it.
        init_prob: execution probability every module starts with: the bias is
            initialised to log(p / (1 - p)) (paper section 4.2: p = 0.7).

    Forward: q [B, in_features] (any floating dtype the linear layer accepts) ->
    gates [B, L, M] in q's dtype, 0/1 values with straight-through gradients.
    Stochastic in ``train()``, deterministic (1[P̃ > 0]) in ``eval()``.

    After each forward, ``last_logits`` ([B, L, M], detached) and
    ``last_execution_ratio`` ([L], float32: the fraction of modules executed per
    layer, averaged over the batch) are kept for inspection; they are plain
    attributes, not buffers, so the state dict is just the linear layer's.
    """

    def __init__(self, in_features: int, num_layers: int, num_modules: int, tau: float = 1.0,
                 init_prob: float = 0.7):
        super().__init__()
        for name, value in (("in_features", in_features), ("num_layers", num_layers), ("num_modules", num_modules)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        init_prob = float(init_prob)
        if not 0.0 < init_prob < 1.0:
            raise ValueError(f"init_prob must be in (0, 1), got {init_prob!r}")
        self.in_features, self.num_layers, self.num_modules = in_features, num_layers, num_modules
        self.init_prob = init_prob
        self.fc = torch.nn.Linear(in_features, num_layers * num_modules)
        with torch.no_grad():
            self.fc.bias.fill_(math.log(init_prob / (1.0 - init_prob)))
        self.tau = tau
        self.last_logits: torch.Tensor | None = None
        self.last_execution_ratio: torch.Tensor | None = None

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._tau = _checks.positive_finite("tau", value)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        _checks.tensor("q", q)
        if q.dim() != 2 or q.shape[1] != self.in_features:
            raise ValueError(f"q must have shape [B, {self.in_features}], got {tuple(q.shape)}")
        logits = self.fc(q).view(q.shape[0], self.num_layers, self.num_modules)
        gates = gumbel_sigmoid_gate(logits, self._tau, hard=True, stochastic=self.training, backend=self.backend)
        self.last_logits = logits.detach()
        self.last_execution_ratio = gates.detach().float().mean(dim=(0, 2))
        return gates

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_layers={self.num_layers}, num_modules={self.num_modules}, "
                f"tau={self._tau}, init_prob={self.init_prob}")
