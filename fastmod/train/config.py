"""Run configuration: nested dicts with sections ``data``, ``train``, ``optim``
and ``model``, merged in layers (later wins):

  1. ``BASE`` below, then the model's paper defaults (``registry.ModelSpec.defaults``);
  2. the model's ``quick`` preset when no dataset is given (small, CPU-friendly);
  3. ``--config FILE.yaml``;  4. ``--set key=value`` (dotted keys, YAML values);
  5. the dedicated flags (``--epochs``, ``--seed``, ``--amp`` ...).

Every layer may only set keys that exist (a typo is an error naming the key and
the keys that do exist) with a value of a compatible type.  The resolved config
is written to ``RUN_DIR/config.yaml``; ``--resume`` reads it back.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml


class UsageError(Exception):
    """A bad command line or config: printed as one line, exit status 2."""


BASE: dict[str, Any] = {
    "data": {
        "data_dir": None,          # CLEVR_v1.0 directory or clevr-iep directory; None: generated dataset
        "features_h5": None,       # precomputed feature maps; "{split}" is replaced by train/val
        "format": "auto",          # auto | clevr | iep
        "image_size": 224,         # pixels fed to the model (square)
        "max_train_questions": None,
        "max_val_questions": None,
        "val_split": "val",
        "num_workers": 2,
        "image_cache": False,      # true: HDF5 cache of decoded images beside the data; or a path
        "cache_dir": None,         # where the generated dataset is cached (default: fastmod.data's)
        "generated": {"n_train": 2000, "n_val": 300, "image_size": 64, "seed": 0,  # images (quick: 4000)
                      "questions_per_image": 10},
    },
    "train": {
        "epochs": 20,
        "steps": None,             # stop after this many optimiser steps (None: epochs decide)
        "batch_size": 64,
        "eval_batch_size": 256,
        "grad_clip": None,         # max global grad norm (None: no clipping)
        "nonfinite": "stop",       # stop | skip: what a NaN/inf loss does
        "log_every": 25,           # steps between metric log lines
        "eval_every": None,        # steps between validations (None: once per epoch)
        "ckpt_every": 500,         # steps between checkpoints (also at each epoch end)
        "seed": 0,
        "deterministic": False,
        "amp": "none",             # none | bf16 | fp16
        "compile": False,
        "device": "auto",          # auto | cpu | cuda | cuda:N
        "progress": True,
        "tensorboard": True,       # when tensorboard is installed
        "plots": True,
        "threads": None,           # torch.set_num_threads (None: torch's default)
    },
    "optim": {
        "name": "adam",
        "lr": 5e-4,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "warmup_steps": 0,         # linear warm-up from warmup_start_lr to lr
        "warmup_start_lr": 0.0,
    },
    "model": {},
}

SECTIONS = ("data", "train", "optim", "model")


def _type_name(v) -> str:
    return type(v).__name__ if v is not None else "null"


def _coerce(path: str, default, value):
    """Check ``value`` against the default's type; ints pass as floats, YAML
    strings like "1e-4" as numbers."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value) if isinstance(default, float) else int(value)
            except ValueError:
                pass
        if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    elif isinstance(value, type(default)):
        return value
    raise UsageError(f"config key '{path}' expects a {_type_name(default)} (default {default!r}), "
                     f"got {value!r}")


def merge(base: dict, override: Mapping, where: str, _prefix: str = "", *, strict: bool = True) -> dict:
    """A copy of ``base`` with ``override`` merged in; unknown keys and wrong types
    raise ``UsageError`` mentioning ``where`` the override came from.  ``strict=False``
    (a model's own defaults) may add keys, e.g. a second optimiser's section."""
    out = copy.deepcopy(base)
    if not isinstance(override, Mapping):
        raise UsageError(f"{where}: expected a mapping at '{_prefix or '<top>'}', got {override!r}")
    for key, value in override.items():
        path = f"{_prefix}{key}"
        if key not in out:
            if not strict:
                out[key] = copy.deepcopy(value)
                continue
            known = ", ".join(sorted(out)) or "none"
            raise UsageError(f"{where}: unknown config key '{path}' (known keys here: {known})")
        if isinstance(out[key], dict) and out[key] and isinstance(value, Mapping):
            out[key] = merge(out[key], value, where, path + ".", strict=strict)
        else:
            out[key] = _coerce(path, out[key], value)
    return out


def parse_set(items: list[str]) -> dict:
    """``["train.lr=1e-3", "model.fc_dims=[512]"]`` -> nested override dict."""
    override: dict = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set expects key=value (e.g. train.epochs=3), got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise UsageError(f"--set: bad key {key!r} in {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise UsageError(f"--set {item!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
        node = override
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set: key {key!r} conflicts with another --set")
        node[parts[-1]] = value
    return override


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(p)!r} must hold a mapping of sections {SECTIONS}")
    data.pop("model_name", None)  # a run's saved config may be reused as --config
    return data


def load_yaml_full(path: str | Path) -> dict:
    """A run's saved config.yaml, including its ``model_name``."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or "model_name" not in data:
        raise UsageError(f"{str(path)!r} is not a fastmod run config (no model_name)")
    return data


def dump_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def save(cfg: dict, path: str | Path) -> None:
    from fastmod.train.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), dump_yaml(cfg).encode())


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


_CHOICES = {
    "train.nonfinite": ("stop", "skip"),
    "train.amp": ("none", "bf16", "fp16"),
    "data.format": ("auto", "clevr", "iep"),
}
_POSITIVE_INT_OR_NONE = ("train.steps", "train.eval_every", "train.grad_clip", "train.threads",
                         "data.max_train_questions", "data.max_val_questions")
_POSITIVE_INT = ("train.epochs", "train.batch_size", "train.eval_batch_size", "train.log_every",
                 "train.ckpt_every", "data.image_size")


def validate(cfg: dict) -> dict:
    """Value checks the type check cannot do; raises ``UsageError``."""
    for key, options in _CHOICES.items():
        if get(cfg, key) not in options:
            raise UsageError(f"config key '{key}' must be one of {options}, got {get(cfg, key)!r}")
    for key in _POSITIVE_INT + _POSITIVE_INT_OR_NONE:
        v = get(cfg, key)
        if v is None and key in _POSITIVE_INT_OR_NONE:
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        if key != "train.grad_clip":
            ok = ok and isinstance(v, int)
        if not ok:
            raise UsageError(f"config key '{key}' must be a positive {'number' if key == 'train.grad_clip' else 'integer'}"
                             f"{' or null' if key in _POSITIVE_INT_OR_NONE else ''}, got {v!r}")
    if not isinstance(cfg["train"]["seed"], int):
        raise UsageError(f"config key 'train.seed' must be an integer, got {cfg['train']['seed']!r}")
    return cfg
