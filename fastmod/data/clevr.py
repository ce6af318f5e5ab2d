"""Readers for the official ``CLEVR_v1.0`` layout.

    DATA/questions/CLEVR_{split}_questions.json   {"info", "questions": [...]}
    DATA/images/{split}/CLEVR_{split}_{index:06d}.png
    DATA/scenes/CLEVR_{split}_scenes.json         optional ({"info", "scenes": [...]})

Question records carry ``image_index``, ``image_filename``, ``split``,
``question`` and, except in the test split, ``answer``,
``question_family_index`` and ``program`` (nodes with ``function`` or ``type``,
``inputs``, ``value_inputs``).  Every check here raises naming the file and
the record.
"""
from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path

from fastmod.data.errors import DataError, MissingDataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OBJECT_KEYS = ("shape", "color", "size", "material")


def questions_file(data_dir, split) -> Path:
    return Path(data_dir) / "questions" / f"CLEVR_{split}_questions.json"


def scenes_file(data_dir, split) -> Path:
    return Path(data_dir) / "scenes" / f"CLEVR_{split}_scenes.json"


def images_dir(data_dir, split) -> Path:
    return Path(data_dir) / "images" / split


def check_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise MissingDataError(f"{what} {path} does not exist (expected the CLEVR_v1.0 layout: "
                               "questions/, images/<split>/, optional scenes/)")


@contextlib.contextmanager
def no_gc():
    """Pause the cyclic garbage collector: parsing CLEVR's JSON creates millions of
    objects and triggers it over and over (6x slower on 100k questions)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _load_json(path: Path, top_key: str) -> list:
    if not path.is_file():
        raise MissingDataError(f"{path} does not exist")
    try:
        with open(path) as f, no_gc():
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get(top_key), list):
        raise DataError(f"{path}: expected an object with a '{top_key}' list at the top level")
    return data[top_key]


def read_questions(data_dir, split: str) -> list[dict]:
    """The question records of ``split``, checked: every record has a ``question``
    string and a non-negative int ``image_index``; ``image_filename`` is filled in
    when absent; if any record has an ``answer``, all must."""
    data_dir = Path(data_dir)
    check_dir(data_dir, "CLEVR data directory")
    path = questions_file(data_dir, split)
    qs = _load_json(path, "questions")
    with_answers = any(isinstance(q, dict) and "answer" in q for q in qs)
    for i, q in enumerate(qs):
        if not isinstance(q, dict):
            raise DataError(f"{path}: question record {i} is not an object")
        for key, typ in (("question", str), ("image_index", int)):
            if key not in q:
                raise DataError(f"{path}: question record {i} lacks key '{key}'")
            if not isinstance(q[key], typ) or isinstance(q[key], bool):
                raise DataError(f"{path}: question record {i} has {key}={q[key]!r}, expected {typ.__name__}")
        if q["image_index"] < 0:
            raise DataError(f"{path}: question record {i} has a negative image_index {q['image_index']}")
        if with_answers and "answer" not in q:
            raise DataError(f"{path}: question record {i} lacks key 'answer' (other records have one)")
        prog = q.get("program")
        if prog is not None and not (isinstance(prog, list) and all(
                isinstance(n, dict) and ("function" in n or "type" in n) for n in prog)):
            raise DataError(f"{path}: question record {i} has a malformed program "
                            "(expected a list of nodes with 'function' or 'type')")
        q.setdefault("image_filename", f"CLEVR_{split}_{q['image_index']:06d}.png")
    return qs


def read_scenes(data_dir, split: str, required: bool = False) -> list[dict] | None:
    """The scenes of ``split`` ordered by ``image_index`` (None if the file is absent
    and not ``required``).  Objects need shape/color/size/material."""
    path = scenes_file(data_dir, split)
    if not path.is_file() and not required:
        return None
    scenes = _load_json(path, "scenes")
    for i, s in enumerate(scenes):
        if not isinstance(s, dict) or "objects" not in s:
            raise DataError(f"{path}: scene record {i} lacks key 'objects'")
        for j, o in enumerate(s["objects"]):
            missing = [k for k in OBJECT_KEYS if k not in o]
            if missing:
                raise DataError(f"{path}: scene record {i}, object {j} lacks key(s) {missing}")
        if s.get("image_index", i) != i:
            raise DataError(f"{path}: scene record {i} has image_index {s.get('image_index')}; "
                            "scenes must be ordered by image_index")
    return scenes


def check_image_file(path: Path, record: str, level: str = "header") -> None:
    """Raise if the image is missing, or (``level="header"``) lacks a PNG signature,
    or (``"full"``) cannot be decoded."""
    if not path.is_file():
        raise MissingDataError(f"image {path} for {record} does not exist (image index out of range?)")
    if level == "header" and path.suffix.lower() == ".png":
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                raise DataError(f"image {path} for {record} is not a PNG file (corrupt?)")
    elif level == "full":
        load_image(path, record)


def load_image(path: Path, record: str):
    """Decode an image as RGB, raising ``DataError`` naming the file for a corrupt one."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise MissingDataError(f"image {path} for {record} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {path} for {record} cannot be decoded (corrupt PNG?): {e}") from None
