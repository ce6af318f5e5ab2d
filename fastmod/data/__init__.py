"""CLEVR data for fastmod: readers for the official CLEVR_v1.0 layout and clevr-iep's
HDF5 files, an embedded CLEVR-style generator, vocabularies, datasets and loaders.

    from fastmod import data
    root = data.default_dataset()                       # generated once, cached
    train_q = data.read_questions(root, "train")
    vocab = data.load_or_build_vocab(root, train_q)
    ds = data.ClevrDataset(root, "train", vocab, image_size=64)
    loader = data.make_loader(ds, 64, shuffle=True, seed=0)

``python -m fastmod.data.generate --out DIR`` writes a generated dataset.
"""
from fastmod.data.clevr import read_questions, read_scenes
from fastmod.data.dataset import ClevrDataset
from fastmod.data.default import cache_root, default_dataset
from fastmod.data.errors import DataError, MissingDataError
from fastmod.data.executor import IllPosedProgram, execute
from fastmod.data.iep import IepDataset
from fastmod.data.loader import collate, make_loader
from fastmod.data.qtypes import QUESTION_SUBTYPES, QUESTION_TYPES, question_type
from fastmod.data.render import render_scene
from fastmod.data.scene import CLEVR_ANSWERS, sample_scene
from fastmod.data.templates import FAMILIES, TEMPLATES
from fastmod.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastmod.data.vocab import Vocab, load_or_build_vocab, tokenize
from fastmod.data.writer import generate_dataset

__all__ = [
    "QUESTION_TYPES", "QUESTION_SUBTYPES", "question_type", "generate_dataset", "default_dataset", "cache_root",
    "Vocab", "load_or_build_vocab", "tokenize", "ClevrDataset", "IepDataset", "collate", "make_loader",
    "read_questions", "read_scenes", "execute", "IllPosedProgram", "DataError", "MissingDataError",
    "render_scene", "sample_scene", "TEMPLATES", "FAMILIES", "CLEVR_ANSWERS", "IMAGENET_MEAN", "IMAGENET_STD",
]
