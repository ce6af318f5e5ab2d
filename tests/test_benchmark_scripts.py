"""The benchmark helper scripts still run: summarize.py (both tables) on a small
pytest-benchmark JSON, and interleaved_routed_conv.py on one tiny case."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastmod import _extension

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _bench(group, impl, median, **extra):
    return {"group": group, "param": impl, "stats": {"median": median},
            "extra_info": {"impl": impl, **extra}}


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, check=True).stdout


def test_summarize_tables(tmp_path):
    g = "routed_conv frn3x3-64 hw56 fwd"
    data = {"benchmarks": [_bench(g, "dense", 0.010, density=1.0), _bench(g, "compiled", 0.011),
                           _bench(g, "routed@1.0", 0.010), _bench(g, "routed@0.57", 0.0066),
                           _bench(g, "routed@0.3", 0.0041), _bench(g, "routed@0.1", 0.0025)]}
    f = tmp_path / "b.json"
    f.write_text(json.dumps(data))
    plain = _run(os.path.join(BENCH, "summarize.py"), str(f), "--markdown")
    assert "0.66x" in plain
    routed = _run(os.path.join(BENCH, "summarize.py"), str(f), "--markdown", "--routed")
    # 0.66 <= 0.67 (met), 0.41 > 0.40 (missed), 0.25 > 0.20 (missed)
    assert "| frn3x3-64 | fwd | 10.00 | 11.00 |" in routed and "yes / no / no" in routed


@pytest.mark.skipif(not _extension.has_op("routed_conv2d"), reason="fastmod._C not built")
def test_interleaved_script_runs(tmp_path):
    out = tmp_path / "r.json"
    _run(os.path.join(BENCH, "interleaved_routed_conv.py"), "--cases", "brn3x3-w256-hw7-c8", "--rounds", "2",
         "--n", "2", "--passes", "fwd,train", "--json", str(out))
    res = json.loads(out.read_text())["results"]
    assert [(r["case"], r["pass"]) for r in res] == [("brn3x3-w256-hw7-c8", "fwd"), ("brn3x3-w256-hw7-c8", "train")]
    assert all(r["dense_ms"] > 0 and set(r["ratio"]) == {"1.0", "0.57", "0.3", "0.1"} for r in res)


def test_graph_target_spreads_replays(monkeypatch):
    """The GPU timing target: one replay of a reps-step graph per pytest-benchmark
    round of reps calls, reps sized from a one-step replay and capped by memory.
    (CUDA itself is faked: this checks the bookkeeping, which no CPU run exercises.)"""
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    # _harness imports the benchmarks' conftest, a name the tests' conftest holds here.
    monkeypatch.setitem(sys.modules, "conftest", load("conftest"))
    _harness = load("_harness")
    captured, replays = [], []

    class FakeGraph:
        def __init__(self, reps):
            self.reps = reps

        def replay(self):
            replays.append(self.reps)

    def fake_graph(step, reps=1):
        captured.append(reps)
        return FakeGraph(reps)

    monkeypatch.setattr(_harness, "cuda_graph", fake_graph)
    monkeypatch.setattr(_harness, "_median_wall", lambda step, n: 50e-6)  # a 50 us step
    target, reps = _harness.graph_target(lambda: None)
    assert reps == 20 and captured == [1, 20]  # 20 x 50 us = the 1 ms aimed at
    replays.clear()
    for _ in range(3 * reps):  # three pytest-benchmark rounds of `reps` calls
        target()
    assert replays == [20, 20, 20]
    # Memory cap: 3 GiB per step leaves room for 2 steps under 8 GiB.
    _, reps = _harness.graph_target(lambda: None, peak_bytes=3 << 30)
    assert reps == 2
    # A step slower than the aim is captured once and replayed every call.
    monkeypatch.setattr(_harness, "_median_wall", lambda step, n: 5e-3)
    captured.clear()
    _, reps = _harness.graph_target(lambda: None)
    assert reps == 1 and captured == [1]


def test_launch_counts_script_explains_itself():
    root = os.path.dirname(BENCH)
    script = os.path.join(root, "scripts", "launch_counts.py")
    assert "one launch each way" in _run(script, "--help")
    if not torch.cuda.is_available():  # without a GPU it says so and exits 2
        r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "needs a GPU" in r.stderr


@pytest.mark.parametrize("name,phrase", [("profile_routed_triton.py", "host's launch overhead"),
                                         ("profile_routed_cuda.py", "kernels listed by total GPU time"),
                                         ("check_group_wgrad.py", "each variant in its own process"),
                                         ("profile_models.py", "where the host time goes"),
                                         ("launch_overhead.py", "Host time per call on a GPU")])
def test_profile_scripts_explain_themselves(name, phrase):
    script = os.path.join(os.path.dirname(BENCH), "scripts", name)
    assert phrase in " ".join(_run(script, "--help").split())
    if not torch.cuda.is_available():  # without a GPU they say so and exit 2
        r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "GPU" in r.stderr


def test_summarize_compares_like_with_like(tmp_path):
    """A GPU group where one implementation fell back to the wall clock is compared
    on every implementation's wall clock, not graph time against wall time."""
    g = "gumbel_gate fwd+bwd 64x8x32"
    data = {"benchmarks": [
        _bench(g, "fastmod", 0.00001, timing="cuda-graph", wall_ms=0.5),
        _bench(g, "eager", 0.0004, timing="wall (capture failed: x)", wall_ms=0.4)]}
    f = tmp_path / "b.json"
    f.write_text(json.dumps(data))
    table = _run(os.path.join(BENCH, "summarize.py"), str(f), "--markdown")
    assert "mixed timings" in table and "| 0.500 | 0.400 | 0.80x |" in table
