"""Accuracy by question type, the run's metrics log, and the tables printed at the end.

``TypedAccuracy`` counts correct answers overall, per type (the five columns of
both papers' Table 1) and per subtype (13), on the device, so counting costs no
host sync; ``reduce`` sums the counts over DDP ranks.  ``MetricsLog`` appends
one JSON object per line to ``RUN_DIR/metrics.jsonl`` and mirrors the scalars to
TensorBoard when it is installed.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import torch

from fastmod.train import distributed


def question_types() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from fastmod.data import QUESTION_SUBTYPES, QUESTION_TYPES

    return tuple(QUESTION_TYPES), tuple(QUESTION_SUBTYPES)


class TypedAccuracy:
    """Correct/total counts overall, per type and per subtype (labels outside the
    known lists, e.g. "unknown", count only towards the overall figure)."""

    def __init__(self, types: Sequence[str], subtypes: Sequence[str], device="cpu"):
        self.types, self.subtypes = tuple(types), tuple(subtypes)
        self._t = {n: i for i, n in enumerate(self.types)}
        self._s = {n: i for i, n in enumerate(self.subtypes)}
        n = 1 + len(self.types) + len(self.subtypes)
        self.correct = torch.zeros(n, dtype=torch.float64, device=device)
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def _slots(self, qtypes: Iterable[str], qsubtypes: Iterable[str]) -> torch.Tensor:
        # One-hot rows: column 0 overall, then types, then subtypes.
        qtypes, qsubtypes = list(qtypes), list(qsubtypes)
        rows = torch.zeros(len(qtypes), self.total.numel(), dtype=torch.float64)
        rows[:, 0] = 1
        off = 1 + len(self.types)
        for i, (t, s) in enumerate(zip(qtypes, qsubtypes)):
            if t in self._t:
                rows[i, 1 + self._t[t]] = 1
            if s in self._s:
                rows[i, off + self._s[s]] = 1
        return rows.to(self.total.device, non_blocking=True)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, answer: torch.Tensor, qtypes, qsubtypes, loss_sum=None) -> None:
        rows = self._slots(qtypes, qsubtypes)
        hit = (pred == answer).to(torch.float64)
        self.correct += hit @ rows
        self.total += rows.sum(0)
        if loss_sum is not None:
            self.loss_sum += loss_sum.detach().to(torch.float64)

    def reduce(self, info: distributed.DistInfo) -> "TypedAccuracy":
        packed = torch.cat([self.correct, self.total, self.loss_sum.view(1)])
        distributed.all_reduce_sum(packed, info)
        n = self.total.numel()
        self.correct, self.total, self.loss_sum = packed[:n], packed[n:2 * n], packed[2 * n]
        return self

    def summary(self) -> dict:
        c, t = self.correct.cpu().tolist(), self.total.cpu().tolist()
        acc = [ci / ti if ti else float("nan") for ci, ti in zip(c, t)]
        off = 1 + len(self.types)
        return {
            "overall": acc[0],
            "loss": float(self.loss_sum) / t[0] if t[0] else float("nan"),
            "num_questions": int(t[0]),
            "types": {n: acc[1 + i] for i, n in enumerate(self.types)},
            "subtypes": {n: acc[off + i] for i, n in enumerate(self.subtypes)},
            "counts": {"types": {n: int(t[1 + i]) for i, n in enumerate(self.types)},
                       "subtypes": {n: int(t[off + i]) for i, n in enumerate(self.subtypes)}},
        }


def majority_baselines(train_answers: Sequence[int], train_types: Sequence[str], val_answers: Sequence[int],
                       val_types: Sequence[str], val_subtypes: Sequence[str], types, subtypes) -> dict:
    """Accuracy on the val questions of (a) always answering the most common
    training answer, and (b) the most common training answer of the question's
    type (Table 1's "Q-type baseline")."""
    overall = Counter(train_answers).most_common(1)[0][0] if len(train_answers) else -1
    by_type: dict[str, Counter] = {}
    for a, t in zip(train_answers, train_types):
        by_type.setdefault(t, Counter())[a] += 1
    per_type = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
    out = {}
    for name, guess in (("majority", lambda t: overall), ("qtype", lambda t: per_type.get(t, overall))):
        acc = TypedAccuracy(types, subtypes)
        pred = torch.tensor([guess(t) for t in val_types], dtype=torch.long)
        acc.update(pred, torch.as_tensor(list(val_answers), dtype=torch.long), val_types, val_subtypes)
        out[name] = acc.summary()
    return out


TYPE_LABELS = {  # column headers of Table 1 for the data module's type names
    "count": "Count", "exist": "Exist", "compare_numbers": "Compare Numbers",
    "compare_number": "Compare Numbers", "query_attribute": "Query Attribute",
    "compare_attribute": "Compare Attribute",
}


def _pct(x: float) -> str:
    return "   -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}"


def format_table(rows: Sequence[tuple[str, dict]], types: Sequence[str]) -> str:
    """Accuracy rows (label, summary) as a Table-1-style text table (percent)."""
    heads = ["Overall"] + [TYPE_LABELS.get(t, t) for t in types]
    width = max(12, max(len(label) for label, _ in rows) + 1)
    colw = [max(7, len(h) + 1) for h in heads]
    lines = ["".ljust(width) + "".join(h.rjust(w) for h, w in zip(heads, colw))]
    for label, s in rows:
        vals = [s["overall"]] + [s["types"].get(t) for t in types]
        lines.append(label.ljust(width) + "".join(_pct(v).rjust(w) for v, w in zip(vals, colw)))
    counts = rows[0][1].get("counts", {}).get("types") if rows else None
    if counts is not None:
        n = [rows[0][1]["num_questions"]] + [counts.get(t, 0) for t in types]
        lines.append("(questions)".ljust(width) + "".join(str(v).rjust(w) for v, w in zip(n, colw)))
    return "\n".join(lines)


def format_subtypes(summary: dict) -> str:
    lines = [f"{'subtype':<18}{'acc %':>7}{'n':>8}"]
    for name, acc in summary["subtypes"].items():
        lines.append(f"{name:<18}{_pct(acc):>7}{summary['counts']['subtypes'].get(name, 0):>8}")
    return "\n".join(lines)


class MetricsLog:
    """Rank-0 metrics sink: JSONL lines ``{"kind", "step", "epoch", "time", ...}``
    and, when available and enabled, TensorBoard scalars under ``RUN_DIR/tb``."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = open(self.path, "a", buffering=1) if enabled else None
        self._tb = None
        self.tensorboard_error = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception as e:  # tensorboard not installed
                self.tensorboard_error = str(e).splitlines()[0] if str(e) else type(e).__name__

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._f.write(json.dumps(json_safe(rec), default=float) + "\n")
        if self._tb is not None:
            for k, v in _flatten(values).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def json_safe(x):
    """NaN/inf -> None, recursively: strict JSON has no NaN (a type without questions)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def dataset_labels(dataset) -> tuple[list[int], list[str], list[str]]:
    """(answers, types, subtypes) of every question, from the dataset's
    ``labels()`` when it has one, else by reading its items."""
    if hasattr(dataset, "labels"):  # fastmod.data datasets: label arrays, no image reads
        return dataset.labels()
    answers, types, subtypes = [], [], []
    for i in range(len(dataset)):
        item = dataset[i]
        answers.append(int(item["answer"]))
        types.append(item["qtype"])
        subtypes.append(item["qsubtype"])
    return answers, types, subtypes


def dataset_baselines(data) -> dict:
    """``majority_baselines`` of a ``train.inputs.DataBundle`` (train answers -> val)."""
    ta, tt, _ = dataset_labels(data.train)
    va, vt, vs = dataset_labels(data.val)
    return majority_baselines(ta, tt, va, vt, vs, data.types, data.subtypes)
