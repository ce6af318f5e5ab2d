"""Benchmark setup: `pytest benchmarks --benchmark-only` on CPU or GPU.

Every case times fastmod, the eager reference and torch.compile(reference)
side by side in one run; extra_info records GB/s and peak memory."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "0")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def device():
    return DEVICE
