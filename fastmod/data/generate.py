"""Command line: ``python -m fastmod.data.generate --out DIR [--train N --val M --seed S --image-size 128]``.

Writes a CLEVR-style dataset in the CLEVR_v1.0 layout (see :mod:`fastmod.data.writer`)."""
from __future__ import annotations

import argparse
import sys
import time

from fastmod.data.writer import generate_dataset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmod.data.generate",
                                 description="Generate a CLEVR-style dataset (CLEVR_v1.0 layout: images/, "
                                             "questions/, scenes/) with 2-D rendered scenes and "
                                             "program-annotated questions.")
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--train", type=int, default=10000, help="training images (default 10000)")
    ap.add_argument("--val", type=int, default=1000, help="validation images (default 1000)")
    ap.add_argument("--test", type=int, default=0, help="test images, questions without answers (default 0)")
    ap.add_argument("--questions-per-image", type=int, default=10, help="questions per image (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--image-size", type=int, default=128, help="square image side in pixels (default 128)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: up to 2)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = generate_dataset(args.out, n_train=args.train, n_val=args.val, n_test=args.test, seed=args.seed,
                               image_size=args.image_size, questions_per_image=args.questions_per_image,
                               workers=args.workers, progress=not args.no_progress)
    except ValueError as e:
        ap.error(str(e))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
