"""``ClevrDataset``: questions of one split of a CLEVR_v1.0-layout dataset, encoded.

All checks that can be made up front run in the constructor (folders, files,
JSON keys, answers in the vocabulary, image indices and image files), so a bad
dataset fails before training starts.  Encoded questions live in flat numpy
arrays (CLEVR's 700k questions would be large as Python lists).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastmod.data.cache import H5Features, PngImages, default_cache_path, open_image_cache
from fastmod.data.clevr import (check_dir, check_image_file, images_dir, no_gc, questions_file, read_questions,
                                read_scenes)
from fastmod.data.errors import DataError
from fastmod.data.qtypes import QUESTION_SUBTYPES, QUESTION_TYPES, question_type, question_type_from_text
from fastmod.data.transforms import normalize
from fastmod.data.vocab import Vocab

_TYPES = QUESTION_TYPES + ("unknown",)
_SUBTYPES = QUESTION_SUBTYPES + ("unknown",)


class EncodedQuestions:
    """Questions as a flat token array + offsets, answers, types and image indices."""

    def __init__(self, token_lists, answers, qtypes, image_idx, indices):
        lens = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        self.offsets = np.concatenate([[0], np.cumsum(lens)])
        self.tokens = (np.fromiter((i for t in token_lists for i in t), dtype=np.int64, count=int(lens.sum()))
                       if len(token_lists) else np.zeros(0, np.int64))
        self.answers = np.asarray(answers, dtype=np.int64)
        self.qtype = np.asarray([_TYPES.index(t) for t, _ in qtypes], dtype=np.int8)
        self.qsubtype = np.asarray([_SUBTYPES.index(s) for _, s in qtypes], dtype=np.int8)
        self.image_idx = np.asarray(image_idx, dtype=np.int64)
        self.index = np.asarray(indices, dtype=np.int64)

    def __len__(self):
        return len(self.answers)

    def labels(self) -> tuple[list[int], list[str], list[str]]:
        """(answers, question types, subtypes) of every question, without reading images."""
        return (self.answers.tolist(), [_TYPES[t] for t in self.qtype], [_SUBTYPES[s] for s in self.qsubtype])

    def item(self, i: int) -> dict:
        return {"question": torch.from_numpy(self.tokens[self.offsets[i]:self.offsets[i + 1]].copy()),
                "answer": torch.tensor(int(self.answers[i]), dtype=torch.long),
                "qtype": _TYPES[self.qtype[i]], "qsubtype": _SUBTYPES[self.qsubtype[i]],
                "index": int(self.index[i])}


def encode_records(qs: list[dict], vocab: Vocab, source: Path) -> EncodedQuestions:
    """Encode CLEVR question records; an answer outside ``vocab`` raises naming the record."""
    toks, answers, types, img = [], [], [], []
    for i, q in enumerate(qs):
        toks.append(vocab.encode_question(q["question"]))
        a = q.get("answer")
        if a is None:
            answers.append(-1)
        else:
            try:
                answers.append(vocab.encode_answer(str(a)))
            except ValueError as e:
                raise DataError(f"{source}: question record {i}: {e}") from None
        t = question_type(q.get("program"))
        types.append(t if t[0] != "unknown" else question_type_from_text(q["question"], a))
        img.append(q["image_index"])
    idx = [q.get("question_index", i) for i, q in enumerate(qs)]
    return EncodedQuestions(toks, answers, types, img, idx)


class ClevrDataset(torch.utils.data.Dataset):
    """Questions of ``split`` from a CLEVR_v1.0-layout directory.

    Items: ``question`` LongTensor [T] (``<START> ... <END>``), ``answer`` long
    scalar (-1 when the split has no answers), ``image`` float32 [3, S, S]
    (``S = image_size``, ImageNet-normalised) or, with ``features_h5``,
    ``features`` float32 [C, h, w] (an HDF5 file with ``features`` [N_images, C, h, w]
    indexed by image index), ``qtype``/``qsubtype`` str, ``index`` int (the
    question's ``question_index``).

    ``image_cache``: None/False (decode PNGs every time), True (an HDF5 cache of
    decoded, resized images beside the data or under ``$FASTMOD_CACHE``), or a
    path.  ``check_images``: "header" (default; every image exists and is a PNG),
    "full" (decode every image up front), or "exists".
    """

    def __init__(self, data_dir, split: str, vocab: Vocab, *, image_size: int = 64,
                 max_questions: int | None = None, features_h5=None, image_cache=None,
                 check_images: str = "header", progress: bool = False):
        if not isinstance(split, str) or not split:
            raise TypeError(f"split must be a non-empty str such as 'train', got {split!r}")
        if not isinstance(vocab, Vocab):
            raise TypeError(f"vocab must be a fastmod.data.Vocab, got {type(vocab).__name__}")
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        if max_questions is not None and (not isinstance(max_questions, int) or max_questions < 1):
            raise ValueError(f"max_questions must be None or a positive int, got {max_questions!r}")
        if check_images not in ("header", "full", "exists"):
            raise ValueError(f"check_images must be 'header', 'full' or 'exists', got {check_images!r}")
        self.data_dir, self.split, self.vocab, self.image_size = Path(data_dir), split, vocab, image_size
        qfile = questions_file(self.data_dir, split)
        qs = read_questions(self.data_dir, split)
        if max_questions is not None:
            qs = qs[:max_questions]
        if not qs:
            raise DataError(f"{qfile} holds no questions")
        with no_gc():
            self.q = encode_records(qs, vocab, qfile)
        self.has_answers = bool((self.q.answers >= 0).any())

        scenes = read_scenes(self.data_dir, split)
        if scenes is not None:
            sfile = qfile.parent.parent / "scenes" / f"CLEVR_{split}_scenes.json"
            for i, q in enumerate(qs):
                if q["image_index"] >= len(scenes):
                    raise DataError(f"{qfile}: question record {i} has image_index {q['image_index']}, "
                                    f"out of range for {sfile} ({len(scenes)} scenes)")
        self.num_scenes = None if scenes is None else len(scenes)
        del scenes  # CLEVR's training scenes are large; only their number is needed

        filenames = {}
        for q in qs:
            filenames.setdefault(q["image_index"], q["image_filename"])
        self.features = self.images = None
        if features_h5 is not None:
            self.features = H5Features(features_h5, max(filenames))
        else:
            idir = images_dir(self.data_dir, split)
            check_dir(idir, "image folder")
            first_record = {}
            for i, q in enumerate(qs):
                first_record.setdefault(q["image_index"], i)
            for ii, name in filenames.items():
                check_image_file(idir / name, f"question record {first_record[ii]} of {qfile}",
                                 "exists" if image_cache else check_images)
            png = PngImages(idir, filenames, image_size)
            if image_cache:
                path = (default_cache_path(self.data_dir, split, image_size) if image_cache is True
                        else Path(image_cache))
                self.images = open_image_cache(path, png, sorted(filenames), progress=progress)
            else:
                self.images = png

    def __len__(self) -> int:
        return len(self.q)

    def __getitem__(self, i: int) -> dict:
        item = self.q.item(i)
        ii = int(self.q.image_idx[i])
        if self.features is not None:
            item["features"] = torch.from_numpy(np.asarray(self.features.get(ii), dtype=np.float32))
        else:
            item["image"] = normalize(self.images.get(ii))
        return item

    @property
    def qtypes(self) -> list[str]:
        return [_TYPES[t] for t in self.q.qtype]

    def labels(self) -> tuple[list[int], list[str], list[str]]:
        """(answers, question types, subtypes) of every question, without reading images."""
        return self.q.labels()

    def __repr__(self):
        return f"ClevrDataset({str(self.data_dir)!r}, split={self.split!r}, {len(self)} questions)"
