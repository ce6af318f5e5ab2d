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


def cuda_graph(step):
    """Capture step() in a CUDA graph (warmed up on a side stream, as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def _median_wall(step, n):
    import time

    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]


def run(benchmark, step, *, group: str, impl: str, nbytes: int, n_rounds: int, warmup: int = 2,
        graph: bool = True, **info):
    """Time step() side by side with the other implementations of its group.

    CPU: wall-clock time of step().  GPU, graph=True: the benchmark's timing is the replay
    of step() captured in a CUDA graph, i.e. the GPU execution time with
    Python and launch overhead removed (the same treatment for fastmod, eager
    and torch.compile); the wall-clock time of an ordinary eager call is
    recorded as extra_info["wall_ms"].  graph=False (steps with autograd's
    backward, which does not capture reliably): wall-clock time, synchronised.
    GB/s is bytes that must move / time.
    """
    for _ in range(warmup):
        step()
    sync()
    timed = step
    if DEVICE == "cuda":
        benchmark.extra_info["wall_ms"] = round(_median_wall(step, max(10, n_rounds // 4)) * 1e3, 4)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        benchmark.extra_info["peak_mem_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        benchmark.extra_info["device_name"] = torch.cuda.get_device_name()
        if graph:
            timed = cuda_graph(step).replay
        benchmark.extra_info["timing"] = "cuda-graph" if graph else "wall"

    def timed_sync():
        timed()
        sync()

    benchmark.group = group
    benchmark.pedantic(timed_sync, rounds=n_rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(impl=impl, device=DEVICE, bytes=nbytes, gbps=round(nbytes / median / 1e9, 2))
