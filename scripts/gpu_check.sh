#!/usr/bin/env bash
# GPU validation, run on a lent GPU machine in one call:
#   scripts/gpu_check.sh [TEST_GLOB] [BENCH_FILES...]
# builds fastmod (CUDA on, sm_90), runs the CUDA tests and the benchmarks and
# writes everything under $OUT (env.txt, build.log, tests.log, bench.log,
# summary.md and one bench_*.json per benchmark file: at most 8 files).
# Each stage has its own time limit, so a slow stage still leaves the others'
# results behind.
set -uo pipefail
OUT=${OUT:-/tmp/fastmod-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# Two pytest runs: the routed-conv CUDA kernels (first run on a GPU) go last and in
# their own process, so a fault there cannot poison the CUDA context of the others.
TESTS=${1:-"tests/test_mixed_node*.py tests/test_gumbel*.py tests/test_load_balancing.py tests/test_router.py"}
TESTS_LAST=${TESTS_LAST:-"tests/test_routed*.py"}
shift || true
TESTS=$(ls $TESTS 2>/dev/null | tr "\n" " ")
# (the CPU emulator of the CUDA source is for GPU-less CI; here the real kernels run)
TESTS_LAST=$(ls $TESTS_LAST 2>/dev/null | grep -v cuda_emu | tr "\n" " ")
BENCH=${*:-$(ls benchmarks/bench_*.py)}
BUILD_LIMIT=${BUILD_LIMIT:-240} TEST_LIMIT=${TEST_LIMIT:-150} BENCH_LIMIT=${BENCH_LIMIT:-240}
# Per-file limits: LIMIT_bench_mixed_node=90 etc. override BENCH_LIMIT.

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
python3 scripts/gpu_bandwidth.py 2>&1 | tee -a "$OUT/env.txt"

echo "== build"
start=$(date +%s)
timeout "$BUILD_LIMIT" python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/env.txt"
if [ $rc -ne 0 ]; then  # keep the Triton paths testable even if csrc fails to build
  tail -40 "$OUT/build.log"
  FASTMOD_BUILD_EXT=0 python3 -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1
  echo "pure-Python install rc=$?" | tee -a "$OUT/env.txt"
fi
grep -E "error|Error" "$OUT/build.log" | head -20
python3 -c "import fastmod, torch; from fastmod import _extension; print('_C loaded', _extension.load(), 'cuda compiled', _extension.cuda_compiled())" 2>&1 | tee -a "$OUT/env.txt"

echo "== tests"
# shellcheck disable=SC2086
timeout "$TEST_LIMIT" python3 -m pytest $TESTS -q --maxfail=15 -p no:cacheprovider --benchmark-disable -rfs \
    > "$OUT/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/env.txt"
tail -25 "$OUT/tests.log"
if [ -n "$TESTS_LAST" ]; then
  echo "== tests: $TESTS_LAST" >> "$OUT/tests.log"
  # shellcheck disable=SC2086
  timeout "$TEST_LIMIT" python3 -m pytest $TESTS_LAST -q --maxfail=15 -p no:cacheprovider --benchmark-disable -rfs \
      >> "$OUT/tests.log" 2>&1
  echo "routed tests rc=$?" | tee -a "$OUT/env.txt"
  tail -25 "$OUT/tests.log"
fi

echo "== benchmarks"
# One JSON per file, so a file that runs out of time does not cost the others.
# shellcheck disable=SC2086
for f in $BENCH; do
  name=$(basename "$f" .py)
  limit_var="LIMIT_${name}"
  timeout "${!limit_var:-$BENCH_LIMIT}" python3 -m pytest "$f" --benchmark-only -q -p no:cacheprovider \
      --benchmark-json="$OUT/$name.json" >> "$OUT/bench.log" 2>&1
  echo "$name rc=$?" | tee -a "$OUT/env.txt"
  { echo "### $name"; python3 benchmarks/summarize.py "$OUT/$name.json" --markdown; } >> "$OUT/summary.md" 2>&1
done
cat "$OUT/summary.md"

if [ "${TUNE_LIMIT:-0}" -gt 0 ]; then
  echo "== mixed_node launch-parameter sweep" | tee -a "$OUT/summary.md"
  (cd benchmarks && timeout "$TUNE_LIMIT" python3 tune_mixed_node.py) >> "$OUT/summary.md" 2>&1
  grep best "$OUT/summary.md"
fi
