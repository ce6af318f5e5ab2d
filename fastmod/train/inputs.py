"""From the config's ``data`` section to datasets (glue to ``fastmod.data``).

Sources, in the order they are looked for:
  * no ``data.data_dir``: the embedded generated dataset (``fastmod.data.default_dataset``),
    built once into a cache directory and reused;
  * a clevr-iep directory (``train_questions.h5``, ``vocab.json``, features
    ``{split}_features.h5`` next to them or from ``data.features_h5``);
  * a ``CLEVR_v1.0`` directory (``questions/``, ``images/``), optionally with
    precomputed features (``data.features_h5``, ``{split}`` replaced by the split).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmod.train import distributed
from fastmod.train.config import UsageError


@dataclass
class DataBundle:
    train: Any
    val: Any
    vocab: Any
    visual_key: str                   # "image" or "features"
    visual_shape: tuple[int, ...]
    data_dir: Path
    format: str
    types: tuple[str, ...] = field(default_factory=tuple)
    subtypes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_tokens(self) -> int:
        return self.vocab.num_question_tokens

    @property
    def num_answers(self) -> int:
        return self.vocab.num_answers

    @property
    def vocab_state(self) -> dict:
        """The vocabulary as a dict, embedded in checkpoints: evaluation encodes
        questions exactly as training did, whatever vocab.json the data has now."""
        return self.vocab.to_dict()


def detect_format(data_dir: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    if (data_dir / "train_questions.h5").is_file() or (data_dir / "val_questions.h5").is_file():
        return "iep"
    return "clevr"


def features_path(template: str | None, split: str, data_dir: Path, fmt: str) -> Path | None:
    if template:
        p = Path(template.replace("{split}", split))
        return p if p.is_absolute() or p.exists() else data_dir / p
    if fmt == "iep":
        return data_dir / f"{split}_features.h5"
    return None


def resolve_data_dir(dcfg: dict, info: distributed.DistInfo, progress: bool = True) -> Path:
    """The dataset directory; generates the embedded dataset (rank 0 first) when none is given."""
    if dcfg["data_dir"] is None:
        from fastmod.data import default_dataset

        g = dcfg["generated"]
        kwargs = dict(cache_dir=dcfg["cache_dir"], n_train=g["n_train"], n_val=g["n_val"],
                      image_size=g["image_size"], seed=g["seed"], questions_per_image=g["questions_per_image"],
                      progress=info.is_main and progress)
        if info.is_main:
            path = default_dataset(**kwargs)
        distributed.barrier(info)
        if not info.is_main:
            path = default_dataset(**kwargs)
        return Path(path)
    path = Path(dcfg["data_dir"]).expanduser()
    if not path.is_dir():
        raise UsageError(f"data directory {str(path)!r} does not exist")
    return path


def _vocab(data_dir: Path):
    from fastmod import data as fdata

    path = data_dir / fdata.vocab.VOCAB_FILE
    return fdata.load_or_build_vocab(data_dir, None if path.is_file() else fdata.read_questions(data_dir, "train"))


def build(cfg: dict, info: distributed.DistInfo, *, vocab=None, splits=("train", "val"),
          progress: bool = True) -> DataBundle:
    """Datasets for ``splits`` (train and the configured val split by default).

    ``vocab``: use this vocabulary (evaluation uses the checkpoint's) instead of
    loading or building the one stored beside the data."""
    from fastmod import data as fdata

    dcfg = cfg["data"]
    data_dir = resolve_data_dir(dcfg, info, progress)
    fmt = detect_format(data_dir, dcfg["format"])
    sets: dict[str, Any] = {}
    limits = {"train": dcfg["max_train_questions"]}
    if fmt == "iep":
        vocab_path = data_dir / "vocab.json"
        for split in splits:
            qh5 = data_dir / f"{split}_questions.h5"
            fh5 = features_path(dcfg["features_h5"], split, data_dir, fmt)
            for p in (qh5, fh5) if vocab is not None else (qh5, fh5, vocab_path):
                if not p.is_file():
                    raise UsageError(f"clevr-iep data: {str(p)!r} does not exist")
            sets[split] = fdata.IepDataset(qh5, fh5, vocab or vocab_path, max_questions=limits.get(
                split, dcfg["max_val_questions"]))
        if vocab is None:
            vocab = sets[splits[0]].vocab
    else:
        if vocab is None:  # rank 0 builds and saves it, the others load it
            if info.is_main:
                vocab = _vocab(data_dir)
            distributed.barrier(info)
            if not info.is_main:
                vocab = _vocab(data_dir)
        for split in splits:
            fh5 = features_path(dcfg["features_h5"], split, data_dir, fmt)
            if fh5 is not None and not fh5.is_file():
                raise UsageError(f"features file {str(fh5)!r} does not exist")
            sets[split] = fdata.ClevrDataset(
                data_dir, split, vocab, image_size=dcfg["image_size"],
                max_questions=limits.get(split, dcfg["max_val_questions"]),
                features_h5=fh5, image_cache=dcfg["image_cache"], progress=info.is_main and progress)
    for split, ds in sets.items():
        if not getattr(ds, "has_answers", True):
            raise UsageError(f"split {split!r} of {str(data_dir)!r} has no answers (like CLEVR's test split); "
                             "train and evaluate on splits with answers")
    first = sets[splits[0]][0]
    visual_key = "features" if "features" in first else "image"
    return DataBundle(
        train=sets.get("train"), val=sets.get(splits[-1]), vocab=vocab,
        visual_key=visual_key, visual_shape=tuple(first[visual_key].shape), data_dir=data_dir, format=fmt,
        types=tuple(fdata.QUESTION_TYPES), subtypes=tuple(fdata.QUESTION_SUBTYPES))
