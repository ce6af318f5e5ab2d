"""``python -m fastmod.evaluate --checkpoint RUN_DIR/best.pt [--split val]``

Accuracy of a trained checkpoint: overall, the five question types of both
papers' Table 1 and the 13 subtypes, printed as tables and written as JSON
(default: ``eval_<split>.json`` beside the checkpoint)::

    {"checkpoint": ..., "model": ..., "split": ..., "step": ..., "num_questions": N,
     "overall": 0.61, "loss": 0.93,
     "types": {"count": ..., ...}, "subtypes": {"exist": ..., ...},
     "counts": {"types": {...}, "subtypes": {...}}}

Accuracies are fractions in [0, 1] (NaN when a type has no questions).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastmod.train.config import UsageError

PROG = "python -m fastmod.evaluate"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Accuracy of a trained checkpoint: overall, the five question types of both\n"
                            "papers' Table 1 and the 13 subtypes, printed as tables and written as JSON\n"
                            "(default: eval_<split>.json beside the checkpoint).  Accuracies in the JSON\n"
                            "are fractions in [0, 1], null for a type without questions.",
                epilog="exit status: 0 done, 2 bad arguments (missing checkpoint or data).")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint file, or a run directory (its best.pt, else last.pt)")
    p.add_argument("--split", default="val", help="dataset split to evaluate (default val)")
    p.add_argument("--data-dir", metavar="DIR", help="dataset directory (default: the one the run trained on)")
    p.add_argument("--features-h5", metavar="FILE", help="precomputed features ('{split}' is replaced)")
    p.add_argument("--max-questions", type=int, metavar="N", help="evaluate only the first N questions")
    p.add_argument("--batch-size", type=int, metavar="N", help="evaluation batch size (default: the run's)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="autocast dtype (default: the run's)")
    p.add_argument("--out", metavar="FILE.json", help="where to write the JSON (default: beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _vocab_from_state(state: dict | None):
    if state is None:
        return None
    from fastmod.data import Vocab

    return Vocab(**state)


def evaluate_checkpoint(args) -> dict:
    from fastmod.train import checkpoint as ckpt_io
    from fastmod.train import distributed, inputs, loop, registry
    from fastmod.train.registry import ModelContext

    try:
        path = ckpt_io.resolve(args.checkpoint)
        ck = ckpt_io.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    spec = registry.get(ck["model_name"])
    cfg = ck["config"]
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    if args.data_dir:
        cfg["data"]["data_dir"] = args.data_dir
    if args.features_h5:
        cfg["data"]["features_h5"] = args.features_h5
    cfg["data"]["max_val_questions"] = args.max_questions
    amp = args.amp or cfg["train"]["amp"]
    info = distributed.DistInfo()
    device = distributed.resolve_device(args.device)
    data = inputs.build(cfg, info, vocab=_vocab_from_state(ck.get("vocab")), splits=(args.split,))
    ctx = ModelContext(num_tokens=data.num_tokens, num_answers=data.num_answers,
                       visual_shape=tuple(ck.get("visual_shape") or data.visual_shape),
                       is_pixels=data.visual_key == "image")
    if tuple(data.visual_shape) != ctx.visual_shape:
        raise UsageError(f"the data gives {data.visual_key} of shape {tuple(data.visual_shape)}, "
                         f"the checkpoint was trained on {ctx.visual_shape}")
    model = spec.build(cfg["model"], ctx).to(device)
    model.load_state_dict(ck["model"])
    from fastmod.data import make_loader

    loader = make_loader(data.val, args.batch_size or cfg["train"]["eval_batch_size"], shuffle=False,
                         num_workers=cfg["data"]["num_workers"])
    summary = loop.evaluate(model, loader, data.visual_key, device, amp, info, data.types, data.subtypes,
                            progress=not args.no_progress, desc=args.split)
    return {"checkpoint": str(path), "model": spec.name, "split": args.split, "step": ck["step"],
            "data_dir": str(data.data_dir), **summary}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        result = evaluate_checkpoint(args)
    except UsageError as e:
        print(f"fastmod.evaluate: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # fastmod.data.DataError: bad dataset files
        from fastmod.data import DataError

        if not isinstance(e, DataError):
            raise
        print(f"fastmod.evaluate: error: {e}", file=sys.stderr)
        return 2
    from fastmod.train import metrics

    out = Path(args.out) if args.out else Path(result["checkpoint"]).parent / f"eval_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics.json_safe(result), indent=2))
    print(f"{result['model']} at step {result['step']} on {args.split} ({result['num_questions']} questions), "
          f"accuracy %:")
    print(metrics.format_table([(result["model"], result)], tuple(result["types"])))
    print()
    print(metrics.format_subtypes(result))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
