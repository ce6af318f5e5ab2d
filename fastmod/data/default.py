"""The default dataset: a small generated CLEVR-style set, built once and cached."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fastmod.data.writer import GENERATOR_VERSION, generate_dataset


def cache_root() -> Path:
    """``$FASTMOD_CACHE`` or ``~/.cache/fastmod``."""
    env = os.environ.get("FASTMOD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastmod"


def default_dataset(cache_dir=None, n_train: int = 2000, n_val: int = 300, image_size: int = 64,
                    seed: int = 0, questions_per_image: int = 10, progress: bool = True) -> Path:
    """Path to a generated CLEVR-style dataset (CLEVR_v1.0 layout) with these parameters.

    Generated on first use into ``cache_dir`` (default :func:`cache_root`), in a
    folder named by the parameters and the generator version; written to a
    temporary folder and renamed when complete, so an interrupted generation is
    never reused."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    name = (f"clevr-gen-v{GENERATOR_VERSION}-train{n_train}-val{n_val}-img{image_size}"
            f"-q{questions_per_image}-seed{seed}")
    final = root / name
    if final.is_dir():  # only ever created complete, by the rename below
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        generate_dataset(tmp, n_train=n_train, n_val=n_val, seed=seed, image_size=image_size,
                         questions_per_image=questions_per_image, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise  # not a concurrent generation that finished first
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
