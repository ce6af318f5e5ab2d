"""Optimiser schemes: one or more named optimisers, their per-step LR schedulers,
and which of them step at a given training step.

Most models use ``adam_scheme`` (one Adam, optional linear warm-up).  A model
with several parameter groups trained on different schedules returns its own
scheme, e.g. LNMN's alternating weight / architecture optimisers::

    def lnmn_scheme(model, optim_cfg):
        arch = [p for n, p in model.named_parameters() if n.endswith("alpha")]
        rest = [p for n, p in model.named_parameters() if not n.endswith("alpha")]
        w, a = optim_cfg["weights"], optim_cfg["arch"]
        return OptimScheme(
            {"weights": torch.optim.Adam(rest, lr=w["lr"], betas=w["betas"]),
             "arch": torch.optim.Adam(arch, lr=a["lr"], betas=a["betas"], weight_decay=a["weight_decay"])},
            active=lambda step: ("weights",) if step % 2 == 0 else ("arch",))

The training loop computes the loss and its gradients once per step, then steps
only the optimisers ``active(step)`` names (and their schedulers); gradients of
all parameters are zeroed every step.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn


class OptimScheme:
    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer],
                 schedulers: Mapping[str, torch.optim.lr_scheduler.LRScheduler] | None = None,
                 active: Callable[[int], Iterable[str]] | None = None):
        if not optimizers:
            raise ValueError("optimizers must name at least one optimiser")
        self.optimizers = dict(optimizers)
        self.schedulers = dict(schedulers or {})
        unknown = set(self.schedulers) - set(self.optimizers)
        if unknown:
            raise ValueError(f"schedulers {sorted(unknown)} have no optimiser of that name")
        self._active = active

    def active(self, step: int) -> tuple[str, ...]:
        """Names of the optimisers that step at (0-based) optimiser step ``step``."""
        names = tuple(self._active(step)) if self._active else tuple(self.optimizers)
        for n in names:
            if n not in self.optimizers:
                raise KeyError(f"active({step}) named unknown optimiser {n!r}")
        return names

    def params(self, names: Iterable[str]) -> list[torch.Tensor]:
        return [p for n in names for g in self.optimizers[n].param_groups for p in g["params"]]

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def step_schedulers(self, names: Iterable[str]) -> None:
        for n in names:
            if n in self.schedulers:
                self.schedulers[n].step()

    def lrs(self) -> dict[str, float]:
        return {n: opt.param_groups[0]["lr"] for n, opt in self.optimizers.items()}

    def state_dict(self) -> dict:
        return {"optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["optimizers"]) != set(self.optimizers):
            raise ValueError(f"checkpoint has optimisers {sorted(state['optimizers'])}, "
                             f"the model's scheme has {sorted(self.optimizers)}")
        for n, s in state["optimizers"].items():
            self.optimizers[n].load_state_dict(s)
        for n, s in state.get("schedulers", {}).items():
            if n in self.schedulers:
                self.schedulers[n].load_state_dict(s)


def warmup_scheduler(opt: torch.optim.Optimizer, lr: float, warmup_steps: int, start_lr: float):
    """Linear warm-up from ``start_lr`` to ``lr`` over ``warmup_steps`` steps, then constant
    (QGMRN warms up from 3e-6 to 3e-4)."""
    start = start_lr / lr if lr > 0 else 1.0

    def factor(step: int) -> float:
        if warmup_steps <= 0 or step >= warmup_steps:
            return 1.0
        return start + (1.0 - start) * step / warmup_steps

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def adam_scheme(model: nn.Module, optim_cfg: dict) -> OptimScheme:
    """One Adam over every trainable parameter; ``optim_cfg`` is the config's
    ``optim`` section (lr, betas, weight_decay, warmup_steps, warmup_start_lr)."""
    if optim_cfg.get("name", "adam") != "adam":
        raise ValueError(f"optim.name: only 'adam' is supported, got {optim_cfg['name']!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=optim_cfg["lr"], betas=tuple(optim_cfg["betas"]),
                           weight_decay=optim_cfg["weight_decay"])
    sched = warmup_scheduler(opt, optim_cfg["lr"], optim_cfg["warmup_steps"], optim_cfg["warmup_start_lr"])
    return OptimScheme({"main": opt}, {"main": sched})
