"""Shared pieces of the benchmark suites: side-by-side timing of fastmod, the
eager reference and torch.compile(reference), with bytes-moved and memory info."""
from __future__ import annotations

import functools

import torch

from conftest import DEVICE, sync

IMPLS = ("fastmod", "eager", "compile")


def rounds(cpu: int, gpu: int) -> int:
    return gpu if DEVICE == "cuda" else cpu


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """torch.compile of a reference function, cached so each case compiles once."""
    return torch.compile(fn)


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward while running fn()."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def run(benchmark, step, *, group: str, impl: str, nbytes: int, n_rounds: int, warmup: int = 2, **info):
    """Time step() (warmed up, device-synchronised) and record GB/s and peak memory."""
    def timed():
        step()
        sync()

    for _ in range(warmup):
        timed()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.group = group
    benchmark.pedantic(timed, rounds=n_rounds, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(impl=impl, device=DEVICE, bytes=nbytes, gbps=round(nbytes / median / 1e9, 2))
    if DEVICE == "cuda":
        benchmark.extra_info["peak_mem_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        benchmark.extra_info["device_name"] = torch.cuda.get_device_name()
