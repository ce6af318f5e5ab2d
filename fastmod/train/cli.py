"""``python -m fastmod.train``: argument parsing, config resolution, and the run."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import textwrap
from pathlib import Path

from fastmod.train import config as cfgmod
from fastmod.train.config import UsageError

PROG = "python -m fastmod.train"
DEFAULT_MODEL = "cnn-lstm"

DESCRIPTION = """\
Train a visual-reasoning model on CLEVR (or on the embedded CLEVR-style dataset).

With no arguments: generates the embedded dataset once into a cache directory
(reused afterwards), trains a small CNN+LSTM that finishes on 2 CPU cores in a
few minutes, and prints validation accuracy per question type next to the
majority-answer baselines.

Configuration is layered (later wins): the model's paper defaults -> the
'quick' preset when no dataset is given -> --config FILE.yaml -> --set
key=value -> the dedicated flags below.  The resolved config is written to
RUN_DIR/config.yaml; print it with --print-config.
"""

EPILOG = """\
examples:
  python -m fastmod.train                                   # quick demo run
  python -m fastmod.train --model lstm --data-dir ~/CLEVR_v1.0
  python -m fastmod.train --model cnn-lstm --data-dir ~/CLEVR_v1.0 \\
      --features-h5 ~/clevr-feats/{split}_features.h5 --amp bf16
  python -m fastmod.train --set train.batch_size=32 --set optim.lr=1e-3
  python -m fastmod.train --resume runs/cnn-lstm-20260101-120000
  torchrun --nproc_per_node=4 -m fastmod.train --model cnn-lstm --data-dir ~/CLEVR_v1.0
  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
      --rdzv_endpoint=HOST:29500 -m fastmod.train --data-dir /data/CLEVR_v1.0

run directory: config.yaml, metrics.jsonl, last.pt, best.pt, loss.png,
accuracy.png, results.json, tb/ (TensorBoard, when installed).
exit status: 0 done, 1 stopped on a non-finite loss, 2 bad arguments,
130/143 interrupted by SIGINT/SIGTERM after saving a checkpoint.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="NAME",
                   help=f"model to train (default {DEFAULT_MODEL}); --list-models shows the choices")
    p.add_argument("--list-models", action="store_true", help="list the model names and exit")
    p.add_argument("--data-dir", metavar="DIR",
                   help="CLEVR_v1.0 directory (questions/, images/) or clevr-iep directory "
                        "(train_questions.h5, vocab.json, {split}_features.h5); default: the embedded "
                        "generated dataset, built once into a cache directory")
    p.add_argument("--features-h5", metavar="FILE",
                   help="precomputed image features (N x C x h x w, e.g. ResNet-101 conv4 1024x14x14) "
                        "used instead of pixels; '{split}' in the name is replaced by train/val")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file with sections data/train/optim/model overriding the defaults "
                        "(a run's config.yaml works)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config key, dotted, value in YAML (repeatable), "
                        "e.g. --set train.batch_size=32 --set model.fc_dims=[512]")
    p.add_argument("--preset", choices=("quick", "paper"),
                   help="'paper': the papers' configuration; 'quick': small and fast (default when no "
                        "dataset is given, else 'paper')")
    p.add_argument("--out", metavar="RUN_DIR",
                   help="run directory (default runs/MODEL-YYYYmmdd-HHMMSS); must be empty or new")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last.pt exactly where it stopped "
                        "(its config.yaml is reused; --set and the flags below still apply)")
    p.add_argument("--device", metavar="DEV", help="auto (default), cpu, cuda or cuda:N  [train.device]")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"),
                   help="mixed precision: autocast to bf16 or fp16 (fp16 uses a grad scaler)  [train.amp]")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model  [train.compile]")
    p.add_argument("--seed", type=int, metavar="N", help="seed for weights, data order and dropout  [train.seed]")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic algorithms (slower on GPU)  [train.deterministic]")
    p.add_argument("--epochs", type=int, metavar="N", help="number of passes over the training set  [train.epochs]")
    p.add_argument("--steps", type=int, metavar="N",
                   help="train exactly N optimiser steps instead of --epochs  [train.steps]")
    p.add_argument("--batch-size", type=int, metavar="N", help="per-process batch size  [train.batch_size]")
    p.add_argument("--on-nonfinite", choices=("stop", "skip"),
                   help="a NaN/inf loss stops the run naming the step (default) or skips that batch "
                        "[train.nonfinite]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars  [train.progress=false]")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


_FLAG_KEYS = {  # argparse dest -> config key
    "device": "train.device", "amp": "train.amp", "compile": "train.compile", "seed": "train.seed",
    "deterministic": "train.deterministic", "epochs": "train.epochs", "steps": "train.steps",
    "batch_size": "train.batch_size", "on_nonfinite": "train.nonfinite",
    "data_dir": "data.data_dir", "features_h5": "data.features_h5",
}


def _flag_overrides(args) -> dict:
    out: dict = {}
    for dest, key in _FLAG_KEYS.items():
        v = getattr(args, dest)
        if v is not None:
            section, name = key.split(".")
            out.setdefault(section, {})[name] = v
    if args.no_progress:
        out.setdefault("train", {})["progress"] = False
    return out


def _peek(layers: list[dict], section: str, key: str):
    val = None
    for layer in layers:
        if section in layer and key in layer[section]:
            val = layer[section][key]
    return val


def resolve_config(args) -> tuple[dict, object]:
    """The full config for ``args`` and the model spec (``UsageError`` on any problem)."""
    from fastmod.train import registry

    user_layers = []
    if args.config:
        user_layers.append(("--config " + args.config, cfgmod.load_yaml(args.config)))
    user_layers.append(("--set", cfgmod.parse_set(args.set)))
    user_layers.append(("command-line flags", _flag_overrides(args)))

    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise UsageError(f"--resume {args.resume!r}: no config.yaml there (not a run directory?)")
        cfg = cfgmod.load_yaml_full(saved)
        name = cfg.pop("model_name", None)
        if args.model and args.model != name:
            raise UsageError(f"--resume: the run trained {name!r}, not {args.model!r}")
        spec = registry.get(name)
    else:
        spec = registry.get(args.model or DEFAULT_MODEL)
        cfg = cfgmod.merge(cfgmod.BASE, spec.defaults, f"{spec.name} defaults", strict=False)
        preset = args.preset
        if preset is None:
            given = _peek([layer for _, layer in user_layers], "data", "data_dir")
            preset = "quick" if given is None else "paper"
        if preset == "quick":
            cfg = cfgmod.merge(cfg, spec.quick, f"{spec.name} quick preset")
    for where, layer in user_layers:
        cfg = cfgmod.merge(cfg, layer, where)
    cfgmod.validate(cfg)
    return {"model_name": spec.name, **cfg}, spec


def _default_run_dir(model: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{model}-{stamp}"


def _setup_torch(tc: dict):
    """Apply train.threads / train.deterministic; returns a function undoing it
    (``main`` may be called in-process, e.g. by tests)."""
    import torch

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    if tc["threads"]:
        torch.set_num_threads(tc["threads"])
    if tc["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    def restore():
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[3], saved[4]

    return restore


def run(args) -> int:
    cfg, spec = resolve_config(args)
    if args.print_config:
        sys.stdout.write(cfgmod.dump_yaml(cfg))
        return 0
    model_cfg = {k: v for k, v in cfg.items() if k != "model_name"}
    restore = _setup_torch(model_cfg["train"])
    try:
        return _run(args, cfg, spec, model_cfg)
    finally:
        restore()


def _run(args, cfg: dict, spec, model_cfg: dict) -> int:
    from fastmod.train import checkpoint as ckpt_io
    from fastmod.train import distributed, inputs, loop, metrics

    device = distributed.resolve_device(model_cfg["train"]["device"], distributed.local_rank_from_env())
    info = distributed.init(device)
    try:
        def log(msg: str) -> None:
            if info.is_main:
                from tqdm.auto import tqdm

                tqdm.write(msg, file=sys.stdout)

        resume_state = None
        if args.resume:
            run_dir = Path(args.resume)
            last = run_dir / ckpt_io.LAST
            if not last.is_file():
                raise UsageError(f"--resume {args.resume!r}: no {ckpt_io.LAST} there")
            resume_state = ckpt_io.load(last, map_location="cpu")
        else:
            run_dir = Path(args.out) if args.out else _default_run_dir(spec.name)
            problem = None
            if info.is_main and run_dir.exists() and any(run_dir.iterdir()):
                problem = f"--out {str(run_dir)!r} is not empty (use --resume to continue a run)"
            where, problem = distributed.broadcast_object((str(run_dir), problem), info)  # rank 0 decides
            if problem:
                raise UsageError(problem)
            run_dir = Path(where)

        data = inputs.build(model_cfg, info, splits=("train", model_cfg["data"]["val_split"]),
                            progress=model_cfg["train"]["progress"])
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfgmod.save(cfg, run_dir / "config.yaml")
            data.vocab.save(run_dir / "vocab.json")
            if resume_state is not None:
                loop.trim_log(run_dir / "metrics.jsonl", resume_state["step"])
        distributed.barrier(info)

        trainer = loop.Trainer(model_cfg, spec, data, run_dir, device, info, resume=resume_state, log=log)
        nparams = sum(p.numel() for p in trainer.model.parameters())
        log(f"{spec.name}: {nparams / 1e6:.2f}M parameters | data {data.data_dir} ({data.format}, "
            f"{len(data.train)} train / {len(data.val)} val questions, {data.visual_key} "
            f"{tuple(data.visual_shape)}) | device {device}"
            f"{f' x {info.world_size} ranks' if info.enabled else ''} | amp {model_cfg['train']['amp']} | "
            f"{trainer.total_steps} steps of batch {model_cfg['train']['batch_size']} | run dir {run_dir}"
            + (f" | resuming at step {trainer.step}" if resume_state is not None else ""))
        try:
            final = trainer.fit()
        except loop.Interrupted as e:
            import signal

            log(f"{e}; checkpoint saved to {e.path}. Continue with: {PROG} --resume {run_dir}")
            return 128 + int(e.signum) if e.signum in (signal.SIGINT, signal.SIGTERM) else 1
        except loop.NonFiniteLoss as e:
            print(f"fastmod.train: error: {e}", file=sys.stderr)
            return 1
        finally:
            trainer.close()
        if info.is_main:
            report = final_report(spec.name, trainer, final, data)
            print(report["text"], flush=True)
            ckpt_io.atomic_write_bytes(run_dir / "results.json",
                                       json.dumps(metrics.json_safe(report["json"]), indent=2).encode())
        return 0
    finally:
        distributed.cleanup()


def final_report(name: str, trainer, final: dict, data) -> dict:
    from fastmod.train import metrics

    rows = [(f"{name} (step {trainer.step})", final)]
    best = trainer.best_summary
    if best is not None and trainer.best["step"] != trainer.step:
        rows.append((f"{name} best (step {trainer.best['step']})", best))
    baselines = None
    try:
        baselines = metrics.dataset_baselines(data)
        rows += [("majority answer", baselines["majority"]), ("Q-type majority", baselines["qtype"])]
    except Exception as e:  # a baseline is informative only
        trainer.log(f"note: majority baselines unavailable ({e})")
    text = textwrap.dedent(f"""
        Validation accuracy (%), {final['num_questions']} questions; best {100 * trainer.best['acc']:.2f}% at step {trainer.best['step']}:
        """) + metrics.format_table(rows, data.types) + "\n"
    return {"text": text, "json": {"model": name, "step": trainer.step, "final": final, "best": trainer.best,
                                   "baselines": baselines}}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.list_models:
            from fastmod.train import registry

            for n in registry.names():
                print(f"{n:<12}{registry.get(n).description}")
            for n, what in registry.PLANNED.items():
                print(f"{n:<12}{what} (not implemented yet)")
            return 0
        return run(args)
    except UsageError as e:
        print(f"{PROG.split()[-1]}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # fastmod.data.DataError (bad dataset files) is a ValueError
        from fastmod.data import DataError

        if not isinstance(e, DataError):
            raise
        print(f"{PROG.split()[-1]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG.split()[-1]}: aborted", file=sys.stderr)
        return 130
