"""clevr-iep's preprocessed HDF5 files.

``{split}_questions.h5``: ``questions`` [N, L] (token ids, <NULL>-padded,
<START> ... <END>), ``image_idxs`` [N], optional ``answers`` [N] and ``programs``
[N, Lp] (prefix order by default); ``{split}_features.h5``: ``features``
[N_images, C, h, w] (ResNet-101 conv4: 1024 x 14 x 14); ``vocab.json`` with
``question_token_to_idx``, ``answer_token_to_idx``, ``program_token_to_idx``.
"""
from __future__ import annotations

import numpy as np
import torch

from fastmod.data.cache import H5Features, LazyH5
from fastmod.data.dataset import EncodedQuestions
from fastmod.data.errors import DataError
from fastmod.data.qtypes import UNKNOWN, subtype_of_function
from fastmod.data.vocab import SPECIALS, Vocab


def program_type(tokens: list[str]) -> tuple[str, str]:
    """Type of an iep program (tokens, specials removed): the root is the first token in
    prefix order or the last in postfix order; whichever is an answer function."""
    for tok in (tokens[:1] + tokens[-1:]):
        t = subtype_of_function(tok)
        if t != UNKNOWN:
            return t
    return UNKNOWN


class IepDataset(torch.utils.data.Dataset):
    """Questions and precomputed features from clevr-iep's HDF5 files.  Items as
    :class:`fastmod.data.ClevrDataset` with ``features`` float32 [C, h, w]."""

    def __init__(self, questions_h5, features_h5, vocab_json, *, max_questions: int | None = None):
        self.vocab = vocab_json if isinstance(vocab_json, Vocab) else Vocab.load(vocab_json)
        h5 = LazyH5(questions_h5)
        qs = h5.dataset("questions")[()]
        img = h5.dataset("image_idxs")[()]
        f = h5.file()
        n = len(qs) if max_questions is None else min(max_questions, len(qs))
        if len(img) != len(qs):
            raise DataError(f"{questions_h5}: 'image_idxs' has {len(img)} rows but 'questions' has {len(qs)}")
        answers = f["answers"][()][:n] if "answers" in f else np.full(n, -1)
        if (answers >= self.vocab.num_answers).any():
            bad = int(np.argmax(answers >= self.vocab.num_answers))
            raise DataError(f"{questions_h5}: record {bad} has answer index {int(answers[bad])}, not in "
                            f"{vocab_json} ({self.vocab.num_answers} answers)")
        if (qs[:n] >= self.vocab.num_question_tokens).any():
            bad = int(np.argmax((qs[:n] >= self.vocab.num_question_tokens).any(1)))
            raise DataError(f"{questions_h5}: question record {bad} has a token id outside {vocab_json}")
        progs = f["programs"][()][:n] if "programs" in f else None
        h5.close()  # everything needed is in memory now
        toks = [row[:int(np.flatnonzero(row).max()) + 1 if row.any() else 0].tolist() for row in qs[:n]]
        types = []
        specials = {self.vocab.program_token_to_idx.get(s) for s in SPECIALS}
        for i in range(n):
            if progs is None:
                types.append(UNKNOWN)
                continue
            names = [self.vocab.program_idx_to_token.get(int(t), "") for t in progs[i] if int(t) not in specials]
            types.append(program_type(names))
        self.features = H5Features(features_h5, int(img[:n].max()) if n else 0)
        self.q = EncodedQuestions(toks, answers, types, img[:n], np.arange(n))
        self.has_answers = bool((self.q.answers >= 0).any())

    def __len__(self) -> int:
        return len(self.q)

    def labels(self) -> tuple[list[int], list[str], list[str]]:
        """(answers, question types, subtypes) of every question, without reading features."""
        return self.q.labels()

    def __getitem__(self, i: int) -> dict:
        item = self.q.item(i)
        item["features"] = torch.from_numpy(np.asarray(self.features.get(int(self.q.image_idx[i])),
                                                       dtype=np.float32))
        return item
