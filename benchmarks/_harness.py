"""Shared pieces of the benchmark suites: side-by-side timing of fastmod, the
eager reference and torch.compile(reference), with bytes-moved and memory info."""
from __future__ import annotations

import functools
import itertools
import os
import time

import torch

from conftest import DEVICE, sync

IMPLS = ("fastmod", "eager", "compile")


def rounds(cpu: int, gpu: int) -> int:
    return gpu if DEVICE == "cuda" else cpu


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """torch.compile of a reference function, cached so each case compiles once."""
    return torch.compile(fn)


def fresh_leaves(*tensors):
    """New leaf tensors (views, no copy) that require grad, for one forward +
    backward step.  A leaf's autograd node keeps the stream that was current when
    it was made, and the backward's last step makes the caller's stream wait on
    it: a leaf made on the default stream before a CUDA-graph capture breaks the
    capture ("operation would make the legacy stream depend on a capturing
    blocking stream", the 2026-11-27 H100 run; pytorch/pytorch#164302).  Leaves
    made inside each step are made on the stream that is capturing."""
    return [t.detach().requires_grad_(True) for t in tensors]


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


def cuda_graph(step, reps: int = 1):
    """Capture ``reps`` calls of step() in one CUDA graph (warmed up on a side
    stream, as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            step()
    return graph


def _median_wall(step, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]


# One replay + synchronize has a fixed cost of roughly 30 us whatever the graph
# holds (inferred from the H100 run of 2026-11-26: the 64x8x32 gate, one kernel
# and its seed draw, timed at 34 us, the 10-kernel eager gate at 45 us): small
# steps are captured `reps` times in one graph, enough for ~1 ms of GPU work, so
# that cost is spread thin.
_REPLAY_S = 1e-3
_MAX_REPS = 64
_MAX_GRAPH_BYTES = 8 << 30


# After a failed capture the process stops trying: what a failed capture leaves
# behind (the allocator's capture pool, the stream) is not something to build on.
# (The 2026-11-26 GPU run captured forward+backward steps with no fallback: the
# first, fastmod's 64x8x32 gate, was timed, the eight after it raised; which of
# them could not be captured and which inherited a broken state is not known.)
_capture_failed = False


def _stop_capturing():
    global _capture_failed
    _capture_failed = True
    # A capture that fails ends without the CUDA generator's capture epilogue, so
    # its state still says "capturing" and every later torch.rand raises "Offset
    # increment outside graph capture" (the 2026-11-27 H100 run: all fwd+bwd cases
    # after the first failed capture).  A clone of the state is not capturing.
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    try:
        gen.graphsafe_set_state(gen.clone_state())
    except (AttributeError, RuntimeError):
        pass


def _capture_error(e: BaseException) -> str:
    """The first line of the error that broke a capture: the one raised inside the
    capture (chained as __context__), not capture_end's 'previous error'."""
    while e.__context__ is not None:
        e = e.__context__
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__


def graph_target(step, peak_bytes: int = 0):
    """(target, reps): a pytest-benchmark target for ``pedantic(iterations=reps)``.

    The first call of each round replays a graph of ``reps`` captured steps and
    synchronises; the other reps - 1 calls do nothing, so the round time / reps
    that pytest-benchmark records is the GPU time of one step.  reps is sized
    from a one-step replay, and capped so reps x the step's peak memory stays
    under 8 GiB (the allocator may keep each captured step's blocks apart).
    """
    one = cuda_graph(step)
    t = _median_wall(one.replay, 10)
    reps = max(1, min(_MAX_REPS, int(_REPLAY_S / max(t, 1e-6))))
    if peak_bytes:
        reps = max(1, min(reps, _MAX_GRAPH_BYTES // peak_bytes))
    graph = one if reps == 1 else cuda_graph(step, reps)
    calls = itertools.count()

    def target():
        if next(calls) % reps == 0:
            graph.replay()
            sync()
    return target, reps


def run(benchmark, step, *, group: str, impl: str, nbytes: int, n_rounds: int, warmup: int = 2,
        graph: bool = True, **info):
    """Time step() side by side with the other implementations of its group.

    CPU: wall-clock time of step().  GPU: the GPU time of step() from replays of
    a CUDA graph that captured it (see graph_target), i.e. without Python or
    launch overhead, the same treatment for fastmod, eager and torch.compile;
    the wall-clock time of an ordinary eager call is recorded as
    extra_info["wall_ms"].  Steps with autograd's backward are captured too; if
    a capture fails (or graph=False, or FASTMOD_BENCH_GRAPH=0) the timing is the
    synchronised wall clock and extra_info["timing"] says so and why.
    GB/s is bytes that must move / time.
    """
    for _ in range(warmup):
        step()
    sync()

    def timed():
        step()
        sync()
    iterations = 1
    if DEVICE == "cuda":
        benchmark.extra_info["wall_ms"] = round(_median_wall(step, max(10, n_rounds // 4)) * 1e3, 4)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
        benchmark.extra_info["peak_mem_mb"] = round(peak / 2**20, 1)
        benchmark.extra_info["device_name"] = torch.cuda.get_device_name()
        timing = "wall"
        if graph and os.environ.get("FASTMOD_BENCH_GRAPH", "1") != "0" and not _capture_failed:
            try:
                timed, iterations = graph_target(step, peak)
                timing = "cuda-graph"
                benchmark.extra_info["steps_per_replay"] = iterations
            except Exception as e:  # a step that cannot be captured: fall back to the wall clock
                _stop_capturing()
                torch.cuda.synchronize()
                timing = f"wall (capture failed: {_capture_error(e)})"
        elif _capture_failed:
            timing = "wall (an earlier capture in this process failed)"
        benchmark.extra_info["timing"] = timing

    benchmark.group = group
    benchmark.pedantic(timed, rounds=n_rounds, iterations=iterations, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(impl=impl, device=DEVICE, bytes=nbytes, gbps=round(nbytes / median / 1e9, 2))
