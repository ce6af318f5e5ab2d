#!/usr/bin/env bash
# GPU validation, run on a lent GPU machine in one call (device time is short:
# everything fits in DEADLINE seconds, default 540, most important first):
#   scripts/gpu_check.sh
# 1. build fastmod (CUDA on, sm_90)            -> build.log
# 2. the routed-conv CUDA kernel tests          -> tests_routed.log  (never run on a GPU before)
# 3. routed-conv benchmark, CPU subset of shapes, routed vs dense -> bench_routed_conv.json
# 4. the mixed-node / Gumbel / router tests     -> tests.log
# 5. kernels launched per call, each way        -> launch_counts.json
# 6. the mixed-node and Gumbel benchmarks       -> bench_*.json
# Results go to $OUT (env.txt with per-stage rc and seconds, summary.md).  A stage
# starts only with at least 20 s left and is cut at its own limit or the deadline,
# whichever comes first, so a slow stage still leaves the later ones some time.
# Overrides: DEADLINE, BUILD_LIMIT, ROUTED_TEST_LIMIT, ROUTED_BENCH_LIMIT,
# TEST_LIMIT, BENCH_LIMIT (seconds); FASTMOD_BENCH_FULL=1 for every routed shape.
set -uo pipefail
OUT=${OUT:-/tmp/fastmod-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
DEADLINE=${DEADLINE:-540}
T0=$(date +%s)

# stage NAME LIMIT CMD...: run CMD under min(LIMIT, time left); log rc and seconds.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ "$left" -lt 20 ]; then
    echo "$name skipped: ${left}s left" | tee -a "$OUT/env.txt"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start rc
  start=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  echo "$name rc=$rc in $(( $(date +%s) - start ))s (limit ${limit}s)" | tee -a "$OUT/env.txt"
  return $rc
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
stage bandwidth 30 python3 scripts/gpu_bandwidth.py 2>&1 | tee -a "$OUT/env.txt"

echo "== build"
stage build "${BUILD_LIMIT:-240}" python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
if [ $? -ne 0 ] && ! grep -q "build skipped" "$OUT/build.log"; then
  tail -40 "$OUT/build.log"  # keep the Triton paths testable even if csrc fails to build
  FASTMOD_BUILD_EXT=0 python3 -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1
  echo "pure-Python install rc=$?" | tee -a "$OUT/env.txt"
fi
grep -E "error|Error" "$OUT/build.log" | head -20
python3 -c "import fastmod, torch; from fastmod import _extension; print('_C loaded', _extension.load(), 'cuda compiled', _extension.cuda_compiled())" 2>&1 | tee -a "$OUT/env.txt"

PYTEST=(python3 -m pytest -q --maxfail=15 -p no:cacheprovider --benchmark-disable -rfs)
echo "== routed-conv CUDA tests"  # own process: a fault there cannot poison the others' CUDA context
stage tests_routed "${ROUTED_TEST_LIMIT:-120}" "${PYTEST[@]}" tests/test_routed_conv_cuda.py tests/test_routed_conv.py \
    > "$OUT/tests_routed.log" 2>&1
tail -25 "$OUT/tests_routed.log"

bench() {  # bench NAME LIMIT: one JSON per file, so a file out of time does not cost the others
  stage "bench_$1" "$2" python3 -m pytest "benchmarks/bench_$1.py" --benchmark-only -q -p no:cacheprovider \
      --benchmark-json="$OUT/bench_$1.json" >> "$OUT/bench.log" 2>&1
  [ -f "$OUT/bench_$1.json" ] &&
    { echo "### $1"; python3 benchmarks/summarize.py "$OUT/bench_$1.json" --markdown; } >> "$OUT/summary.md" 2>&1
}
echo "== routed-conv benchmark (routed vs dense)"
FASTMOD_BENCH_FULL=${FASTMOD_BENCH_FULL:-0} FASTMOD_BENCH_IMPLS=${FASTMOD_BENCH_IMPLS:-routed,dense} \
    bench routed_conv "${ROUTED_BENCH_LIMIT:-150}"

echo "== other tests"
stage tests "${TEST_LIMIT:-90}" "${PYTEST[@]}" tests/test_mixed_node.py tests/test_gumbel_gate.py \
    tests/test_load_balancing.py tests/test_router.py tests/test_fused_norm.py tests/test_routed_modules.py \
    > "$OUT/tests.log" 2>&1
tail -25 "$OUT/tests.log"

echo "== kernel launches per call"
stage launch_counts 60 python3 scripts/launch_counts.py --json "$OUT/launch_counts.json" 2>&1 | tee -a "$OUT/env.txt"

echo "== mixed-node and Gumbel benchmarks"
bench mixed_node "${BENCH_LIMIT:-90}"
bench gumbel_gate "${BENCH_LIMIT:-90}"
cat "$OUT/summary.md"
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/env.txt"
