"""Tokeniser and vocabularies, in clevr-iep's ``vocab.json`` format.

``question_token_to_idx`` and ``program_token_to_idx`` start with the specials
``<NULL>`` (0, padding) ``<START>`` ``<END>`` ``<UNK>``.  Answers built here are
plain classes 0..A-1 (CLEVR's 28 answers are always included, so a split never
meets an answer the training split lacked); a clevr-iep ``vocab.json`` is used as
it is (its answer indices match its ``answers`` in the HDF5 files).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable

from fastmod.data.executor import FUNCTIONS, program_to_tokens
from fastmod.data.scene import ATTRIBUTES, CLEVR_ANSWERS, RELATIONS, VALUES

NULL, START, END, UNK = "<NULL>", "<START>", "<END>", "<UNK>"
SPECIALS = (NULL, START, END, UNK)
VOCAB_FILE = "vocab.json"


def tokenize(text: str, lower: bool = True) -> list[str]:
    """clevr-iep's tokeniser (``;`` and ``,`` are tokens, ``?`` and ``.`` dropped), lower-cased
    unless ``lower=False`` (clevr-iep keeps the case)."""
    if not isinstance(text, str):
        raise TypeError(f"question must be a str, got {type(text).__name__}")
    text = text.replace(";", " ;").replace(",", " ,").replace("?", "").replace(".", "")
    return (text.lower() if lower else text).split()


def _index(tokens: Iterable[str], specials=SPECIALS) -> dict[str, int]:
    out = {t: i for i, t in enumerate(specials)}
    for t in sorted(set(tokens) - set(specials)):
        out[t] = len(out)
    return out


def _all_program_tokens() -> set[str]:
    toks = set(FUNCTIONS)
    toks |= {f"filter_{a}[{v}]" for a in ATTRIBUTES for v in VALUES[a]}
    toks |= {f"relate[{r}]" for r in RELATIONS}
    return toks


class Vocab:
    """Question-word, answer and program-token vocabularies."""

    def __init__(self, question_token_to_idx: dict, answer_token_to_idx: dict, program_token_to_idx: dict):
        for name, d in (("question_token_to_idx", question_token_to_idx),
                        ("answer_token_to_idx", answer_token_to_idx),
                        ("program_token_to_idx", program_token_to_idx)):
            if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in d.items()):
                raise ValueError(f"{name} must map str tokens to int indices")
        for name, d in (("question_token_to_idx", question_token_to_idx),
                        ("program_token_to_idx", program_token_to_idx)):
            if d.get(NULL) != 0 or START not in d or END not in d:
                raise ValueError(f"{name} must have {NULL}=0, {START} and {END}")
        if UNK not in question_token_to_idx:
            raise ValueError(f"question_token_to_idx must have {UNK}")
        self.question_token_to_idx = dict(question_token_to_idx)
        self.answer_token_to_idx = dict(answer_token_to_idx)
        self.program_token_to_idx = dict(program_token_to_idx)
        self.question_idx_to_token = {i: t for t, i in self.question_token_to_idx.items()}
        self.answer_idx_to_token = {i: t for t, i in self.answer_token_to_idx.items()}
        self.program_idx_to_token = {i: t for t, i in self.program_token_to_idx.items()}

    # sizes ------------------------------------------------------------------
    @property
    def num_answers(self) -> int:
        return max(self.answer_token_to_idx.values(), default=-1) + 1

    @property
    def num_question_tokens(self) -> int:
        return max(self.question_token_to_idx.values()) + 1

    @property
    def num_program_tokens(self) -> int:
        return max(self.program_token_to_idx.values()) + 1

    # encoding ---------------------------------------------------------------
    def encode_question(self, text: str) -> list[int]:
        """``<START> tokens <END>``; words not in the vocabulary map to ``<UNK>``.  A word is
        looked up as written, then lower-cased (vocabularies built here are lower-case;
        clevr-iep's keep the case)."""
        q, unk = self.question_token_to_idx, self.question_token_to_idx[UNK]
        ids = [q[START]]
        for tok in tokenize(text, lower=False):
            ids.append(q.get(tok, q.get(tok.lower(), unk)))
        ids.append(q[END])
        return ids

    def decode_question(self, ids) -> str:
        words = (self.question_idx_to_token.get(int(i), UNK) for i in ids)
        return " ".join(w for w in words if w not in (NULL, START, END))

    def encode_answer(self, answer: str, allow_unknown: bool = False) -> int:
        """Class index of ``answer``; unknown answers raise ``ValueError`` (or give -1
        with ``allow_unknown``)."""
        idx = self.answer_token_to_idx.get(answer)
        if idx is None:
            if allow_unknown:
                return -1
            raise ValueError(f"answer {answer!r} is not in the answer vocabulary "
                             f"({self.num_answers} answers, e.g. {sorted(self.answer_token_to_idx)[:6]})")
        return idx

    def decode_answer(self, idx: int) -> str:
        return self.answer_idx_to_token.get(int(idx), UNK)

    def encode_program(self, program: list[dict]) -> list[int]:
        """Program tokens (``filter_color[red]``) in CLEVR's node order with START/END."""
        p = self.program_token_to_idx
        unk = p.get(UNK, 0)
        return [p[START]] + [p.get(t, unk) for t in program_to_tokens(program)] + [p[END]]

    # building and files -----------------------------------------------------
    @classmethod
    def build(cls, questions: Iterable) -> "Vocab":
        """From question dicts (``question``, optional ``answer``/``program``) or plain strings."""
        words, answers, prog = set(), set(CLEVR_ANSWERS), _all_program_tokens()
        for q in questions:
            if isinstance(q, str):
                words.update(tokenize(q))
                continue
            words.update(tokenize(q["question"]))
            if q.get("answer") is not None:
                answers.add(q["answer"])
            if q.get("program"):
                prog.update(program_to_tokens(q["program"]))
        return cls(_index(words), {a: i for i, a in enumerate(sorted(answers))}, _index(prog))

    def to_dict(self) -> dict:
        return {"question_token_to_idx": self.question_token_to_idx,
                "answer_token_to_idx": self.answer_token_to_idx,
                "program_token_to_idx": self.program_token_to_idx}

    def save(self, path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> "Vocab":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {path} does not exist")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"vocabulary file {path} is not valid JSON: {e}") from None
        missing = [k for k in ("question_token_to_idx", "answer_token_to_idx") if k not in d]
        if missing:
            raise ValueError(f"vocabulary file {path} lacks key(s) {missing}")
        prog = d.get("program_token_to_idx") or _index(_all_program_tokens())
        try:
            return cls(d["question_token_to_idx"], d["answer_token_to_idx"], prog)
        except ValueError as e:
            raise ValueError(f"vocabulary file {path}: {e}") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (f"Vocab({self.num_question_tokens} question tokens, {self.num_answers} answers, "
                f"{self.num_program_tokens} program tokens)")


def _fallback_path(data_dir: Path) -> Path:
    from fastmod.data.default import cache_root
    tag = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return cache_root() / "vocab" / f"{data_dir.name}-{tag}.json"


def load_or_build_vocab(data_dir, questions=None, vocab_path=None) -> Vocab:
    """The vocabulary of the dataset in ``data_dir``: loaded from ``vocab_path`` or
    ``data_dir/vocab.json`` if it exists, else built from ``questions`` (the
    training questions: dicts or strings) and saved there.  If ``data_dir`` is
    read-only and no ``vocab_path`` is given, it is saved under the fastmod cache
    (``$FASTMOD_CACHE/vocab``) with a warning and found there next time."""
    data_dir = Path(data_dir)
    target = Path(vocab_path) if vocab_path is not None else data_dir / VOCAB_FILE
    candidates = [target] if vocab_path is not None else [target, _fallback_path(data_dir)]
    for c in candidates:
        if c.is_file():
            return Vocab.load(c)
    if questions is None:
        raise FileNotFoundError(f"no vocabulary at {target} and no questions given to build one")
    vocab = Vocab.build(questions)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        vocab.save(target)
    except OSError as e:
        if vocab_path is not None:
            raise OSError(f"cannot write the vocabulary to vocab_path={target}: {e}") from None
        fb = _fallback_path(data_dir)
        fb.parent.mkdir(parents=True, exist_ok=True)
        vocab.save(fb)
        warnings.warn(f"{data_dir} is not writable ({e.strerror}); vocabulary saved to {fb}", stacklevel=2)
    return vocab
