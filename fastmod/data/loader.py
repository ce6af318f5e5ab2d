"""Batching: ``collate`` pads questions with ``<NULL>`` (0); ``make_loader`` builds a
DataLoader whose order depends only on ``seed``."""
from __future__ import annotations

import torch

from fastmod.data.vocab import SPECIALS

NULL_IDX = SPECIALS.index("<NULL>")


def collate(batch: list[dict]) -> dict:
    """Items -> batch: ``question`` [B, T] long (padded with <NULL>), ``question_len`` [B],
    ``answer`` [B], ``image`` [B, 3, H, W] or ``features`` [B, C, h, w],
    ``qtype``/``qsubtype`` lists of str, ``index`` [B] long."""
    if not batch:
        raise ValueError("collate: batch must not be empty")
    lens = torch.tensor([len(b["question"]) for b in batch], dtype=torch.long)
    q = torch.full((len(batch), int(lens.max())), NULL_IDX, dtype=torch.long)
    for i, b in enumerate(batch):
        q[i, :len(b["question"])] = b["question"]
    out = {"question": q, "question_len": lens,
           "answer": torch.stack([torch.as_tensor(b["answer"], dtype=torch.long) for b in batch]),
           "qtype": [b["qtype"] for b in batch], "qsubtype": [b["qsubtype"] for b in batch],
           "index": torch.tensor([int(b["index"]) for b in batch], dtype=torch.long)}
    for key in ("image", "features"):
        if key in batch[0]:
            out[key] = torch.stack([b[key] for b in batch])
    return out


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, sampler=None, num_workers: int = 0,
                drop_last: bool = False, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` using :func:`collate`; shuffling draws from a
    ``torch.Generator`` seeded with ``seed``, so the order is reproducible."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if sampler is not None and shuffle:
        raise ValueError("pass either shuffle=True or a sampler, not both")
    g = torch.Generator()
    g.manual_seed(int(seed))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=num_workers, collate_fn=collate, drop_last=drop_last, generator=g,
        pin_memory=pin_memory, persistent_workers=num_workers > 0)
