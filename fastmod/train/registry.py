"""Model registry: command-line name -> ``ModelSpec``.

A spec is everything the training command needs to know about a model:

* ``build(model_cfg, ctx) -> nn.Module``: ``model_cfg`` is the config's ``model``
  section, ``ctx`` a ``ModelContext`` (vocabulary sizes, one sample's visual shape);
* ``optimizers(model, optim_cfg) -> OptimScheme`` (default: one Adam);
* ``defaults``: the paper's configuration, as overrides of ``config.BASE``
  (it must define every key of the ``model`` section, and may add keys, e.g.
  ``optim.arch`` for a second optimiser);
* ``quick``: overrides for the small run used when no dataset is given;
* ``find_unused_parameters``: passed to DistributedDataParallel (routers that
  switch branches off leave parameters without gradients).

Adding a model is one ``register(ModelSpec(...))`` call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from fastmod.train.config import UsageError
from fastmod.train.optim import OptimScheme, adam_scheme


@dataclass(frozen=True)
class ModelContext:
    num_tokens: int                       # question vocabulary size (index 0 is <NULL>)
    num_answers: int
    visual_shape: tuple[int, int, int]    # one sample's image (3,H,W) or features (C,h,w)
    is_pixels: bool                       # True: raw image, False: precomputed feature maps


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[dict, ModelContext], nn.Module]
    defaults: dict
    quick: dict = field(default_factory=dict)
    optimizers: Callable[[nn.Module, dict], OptimScheme] = adam_scheme
    find_unused_parameters: bool = False


_REGISTRY: dict[str, ModelSpec] = {}

# Names of both papers' models that later work will register.
PLANNED: dict[str, str] = {
    "stack-nmn": "Stack-NMN (9 modules)",
}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    if "model" not in spec.defaults:
        raise ValueError(f"{spec.name}: defaults must define the 'model' section")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> ModelSpec:
    """The spec for ``name``; ``UsageError`` (one line) for planned or unknown names."""
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in PLANNED:
        raise UsageError(f"model {name!r} ({PLANNED[name]}) is not implemented yet; "
                         f"available now: {', '.join(sorted(_REGISTRY))}")
    raise UsageError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))} "
                     f"(planned: {', '.join(PLANNED)})")


# ---------------------------------------------------------------- built-in models

_LSTM_PAPER: dict[str, Any] = {  # clevr-iep LstmModel defaults; Adam 5e-4, batch 64, ~100k iterations
    "wordvec_dim": 300, "rnn_dim": 256, "rnn_num_layers": 2, "rnn_dropout": 0.0,
    "fc_dims": [1024], "fc_use_batchnorm": False, "fc_dropout": 0.0,
}
# The quick preset (no dataset given): 4000 generated 64-px images x 10 questions,
# 3 epochs of batch 64 (1875 steps): a few minutes on 2 CPU cores.  One compute
# thread plus one loader process: two OpenMP threads slow down many times over
# when anything else runs on a 2-core machine.
_LSTM_QUICK = {"wordvec_dim": 64, "rnn_dim": 128, "rnn_num_layers": 1, "fc_dims": [512]}
_QUICK_TRAIN = {"train": {"epochs": 3, "batch_size": 64, "log_every": 25, "ckpt_every": 250, "threads": 1},
                "optim": {"lr": 2e-3},
                "data": {"image_size": 64, "num_workers": 1, "generated": {"n_train": 4000}}}


def _build_lstm(cfg: dict, ctx: ModelContext) -> nn.Module:
    from fastmod.models.baselines import LstmModel

    return LstmModel(ctx.num_tokens, ctx.num_answers, **cfg)


def _build_cnn_lstm(cfg: dict, ctx: ModelContext) -> nn.Module:
    from fastmod.models.baselines import CnnLstmModel

    return CnnLstmModel(ctx.num_tokens, ctx.num_answers, ctx.visual_shape, ctx.is_pixels, **cfg)


# QGMRN (paper 003, section 4.2): embedding 200, GRU 512, tau 1, modules start on with
# probability 0.7; Adam 3e-4, betas (0.9, 0.999), batch 64; 224 x 224 pixels.
_QGMRN_PAPER: dict[str, Any] = {
    "wordvec_dim": 200, "rnn_dim": 512, "stem_channels": 64, "tau": 1.0, "init_prob": 0.7, "load_weight": 0.01,
    "classifier_proj_dim": 512, "fc_dims": [1024], "fc_dropout": 0.0, "router_grad": "exact",
}
_QGMRN_QUICK = {"wordvec_dim": 64, "rnn_dim": 128, "stem_channels": 16, "classifier_proj_dim": 64, "fc_dims": [256]}


def _build_qgmrn(variant: str):
    def build(cfg: dict, ctx: ModelContext) -> nn.Module:
        from fastmod.models.qgmrn import QGMRN

        if not ctx.is_pixels:
            raise UsageError(f"qgmrn-{variant} trains from raw pixels (paper 003, section 4.1); "
                             "drop data.features_h5")
        return QGMRN(ctx.num_tokens, ctx.num_answers, ctx.visual_shape, variant=variant, **cfg)
    return build


# LNMN (paper 000, sections 3-4, Table 2's original setting): T = 5, L = 5, map_dim 384;
# weights Adam 1e-4 (0.9, 0.999), alphas Adam 3e-4 (0.5, 0.999) with weight decay 1e-3,
# lambda_op 1; lambda_w 1 -> 0 over 20 epochs, -> -1 over the next 10 (CLEVR: ~700k
# questions, 10937 steps of 64 an epoch).
_LNMN_PAPER: dict[str, Any] = {
    "steps": 5, "stack_len": 5, "map_dim": 384, "lstm_dim": 512, "wordvec_dim": 300,
    "stem_channels": [64, 128, 256, 512], "normalize_nodes": True, "fc_dims": [512], "entropy_weight": 1.0,
    "entropy_schedule": [218750, 109375], "sparsity_weight": 1.0,
}
_LNMN_OPTIM = {"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.0,
               "arch": {"lr": 3e-4, "betas": [0.5, 0.999], "weight_decay": 1e-3}}
_LNMN_QUICK = {"map_dim": 32, "lstm_dim": 64, "wordvec_dim": 32, "stem_channels": [16, 32], "fc_dims": [128],
               "entropy_schedule": [1250, 625]}


def _build_lnmn(cfg: dict, ctx: ModelContext) -> nn.Module:
    from fastmod.models.lnmn import LNMN

    return LNMN(ctx.num_tokens, ctx.num_answers, ctx.visual_shape, ctx.is_pixels, **cfg)


def _lnmn_scheme(model: nn.Module, optim_cfg: dict):
    from fastmod.models.lnmn import lnmn_scheme

    return lnmn_scheme(model, optim_cfg)


def _with(model: dict, **sections) -> dict:
    out = {k: dict(v) for k, v in sections.items()}
    out["model"] = model
    return out


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    paper_train = {"train": {"epochs": 10, "batch_size": 64}, "optim": {"lr": 5e-4}}
    register(ModelSpec(
        name="lstm",
        description="blind LSTM baseline (question only), Johnson et al. 2017",
        build=_build_lstm,
        defaults=_with(_LSTM_PAPER, **paper_train),
        quick=_with(_LSTM_QUICK, **_QUICK_TRAIN),
    ))
    register(ModelSpec(
        name="cnn-lstm",
        description="CNN+LSTM baseline (image + question, concatenated), Johnson et al. 2017",
        build=_build_cnn_lstm,
        defaults=_with({**_LSTM_PAPER, "stem_channels": [64, 128, 256, 512], "cnn_proj_dim": 512,
                        "cnn_pooling": "maxpool2"}, **paper_train),
        quick=_with({**_LSTM_QUICK, "stem_channels": [32, 64, 64, 64], "cnn_proj_dim": 0,
                     "cnn_pooling": "none"}, **_QUICK_TRAIN),
    ))
    for name, counts in (("lnmn", [4, 2, 1, 1]), ("lnmn-11", [4, 2, 2, 2]), ("lnmn-14", [5, 4, 2, 2])):
        register(ModelSpec(
            name=name,
            description=f"LNMN ({sum(counts) + 1} modules: {counts[0]}+{counts[1]} attention, {counts[2]}+{counts[3]} "
                        "answer, NoOp), Stack-NMN with mixed-node generic modules",
            build=_build_lnmn,
            defaults=_with({**_LNMN_PAPER, "modules": counts}, train={"epochs": 30, "batch_size": 64},
                           optim=_LNMN_OPTIM),
            quick=_with({**_LNMN_QUICK}, **_QUICK_TRAIN),
            optimizers=_lnmn_scheme,
        ))
    qgmrn_train = {"train": {"epochs": 20, "batch_size": 64}, "optim": {"lr": 3e-4}}
    register(ModelSpec(
        name="qgmrn-brn",
        description="QGMRN, branch routing: GRU -> Gumbel-sigmoid router -> routed ResNeXt-26 (c=32, GN)",
        build=_build_qgmrn("brn"),
        defaults=_with({**_QGMRN_PAPER, "depths": [2, 2, 2, 2], "widths": [64, 128, 256, 256], "cardinality": 32,
                        "norm3": "gn"}, **qgmrn_train),
        quick=_with({**_QGMRN_QUICK, "depths": [1, 1, 1, 1], "widths": [16, 32, 64, 64], "cardinality": 8,
                     "norm3": "gn"}, **_QUICK_TRAIN),
        find_unused_parameters=True,
    ))
    register(ModelSpec(
        name="qgmrn-frn",
        description="QGMRN, filter routing: GRU -> Gumbel-sigmoid router -> filter-routed ResNet-34",
        build=_build_qgmrn("frn"),
        # the paper warms FRN's learning rate up from 3e-6 (its length is not given)
        defaults=_with({**_QGMRN_PAPER, "depths": [3, 4, 6, 3], "widths": [64, 128, 256, 512]},
                       train=qgmrn_train["train"],
                       optim={"lr": 3e-4, "warmup_steps": 2000, "warmup_start_lr": 3e-6}),
        quick=_with({**_QGMRN_QUICK, "depths": [1, 1, 1, 1], "widths": [16, 32, 64, 64]}, **_QUICK_TRAIN),
        find_unused_parameters=True,
    ))
