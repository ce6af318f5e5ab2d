#!/usr/bin/env bash
# GPU validation, run on a lent GPU machine in one call (device time is short:
# everything fits in DEADLINE seconds, default 570, most important first; give the
# call a 600 s limit):
#   scripts/gpu_check.sh
# 1. pip install -e . without the extension; the extension (CUDA on, sm_90) builds
#    in the background meanwhile                                   -> build.log
# 2. while it builds (Triton only): mixed-node and Gumbel benchmarks, forward+backward
#    and forward; kernels launched per call                          -> launch_counts.json;
#    the Triton tests (mixed node, Gumbel, routed conv, fused norms) -> tests_triton.log;
#    the mixed-node launch-parameter sweep                          -> tune_mixed_node.txt/json;
#    the routed-conv Triton forward and training step against dense cuDNN, kernel time
#    (NCHW x; x and weight channels-last on both sides; the grouped 3x3 with its x
#    copied to channels-last, as before)                            -> routed_triton*.txt;
#    the Triton grouped weight gradient against cuDNN, each variant in its own process
#    (a fault names itself)                                         -> group_wgrad_check.txt;
#    host time per call of a Triton launch, the fused norms, the routed conv -> launch_overhead.txt;
#    whole models profiled: GPU kernels and host hot spots, kernels on vs off
#                                                                   -> profile_models.txt
# 3. with the extension: the routed-conv CUDA kernels profiled      -> routed_profile.txt;
#    the CUDA tests (routed conv, modules, models)                  -> tests_cuda.log;
#    the routed-conv benchmark (CPU subset of shapes), routed vs dense -> bench_routed_conv.json;
#    whole models (benchmarks/bench_models.py), kernels on vs off      -> bench_models.json
# Results go to $OUT: env.txt (per-stage rc and seconds), summary.md, and every log
# and JSON in results.tgz (the device tool brings back at most 8 files; the archive
# is rewritten after each stage, so a run cut short still returns what it had).  A stage
# starts only with at least 20 s left and is cut at its own limit or the deadline,
# whichever comes first, so a slow stage still leaves the later ones some time.
# Overrides: DEADLINE, BUILD_LIMIT, WGRAD_LIMIT, WGRAD_ARGS (more check_group_wgrad.py arguments), PROFILE_MODELS_LIMIT, ROUTED_BENCH_LIMIT, MODELS_LIMIT (per model), MODELS, TEST_LIMIT, BENCH_LIMIT,
# TUNE_LIMIT, TUNE_MN_LIMIT (seconds); TRITON_TESTS, CUDA_TESTS, TEST_WORKERS; TUNE_CONFIGS (see
# scripts/profile_routed_triton.py --configs); ROUTED_CASES (its --cases); GROUP_WGRAD (its
# --group-wgrad, default both); TUNE_MN_ARGS (more
# arguments of benchmarks/tune_mixed_node.py); BENCHES (default "mixed_node gumbel_gate"); SKIP (parts to leave out, see want below);
# FASTMOD_BENCH_FULL=1 for every routed shape; SKIP_BUILD=1 installs nothing and uses
# the installed fastmod (a dry run of this script off the GPU).
set -uo pipefail
OUT=${OUT:-/tmp/fastmod-gpu}
RES=$(mktemp -d)  # everything is written here, then packed into $OUT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
DEADLINE=${DEADLINE:-570}
T0=$(date +%s)

# want PART: whether PART is not named in SKIP (space-separated; parts: bandwidth,
# bench_fwd_bwd, bench_fwd, launch_counts, tests_triton, tune_mixed_node, routed_triton,
# routed_triton_cl, routed_triton_copy, group_wgrad_check, launch_overhead, profile_models, routed_profile, tests_cuda, routed_bench,
# bench_models; the build has SKIP_BUILD).
want() { case " ${SKIP:-} " in *" $1 "*) return 1 ;; *) return 0 ;; esac; }

# pack: copy the two short reports to $OUT and everything into $OUT/results.tgz
# (through a temporary name, so parallel stages never leave a half-written archive).
pack() {
  local tmp="$OUT/.pack.$BASHPID"
  cp "$RES/env.txt" "$OUT/env.txt" 2>/dev/null
  cp "$RES/summary.md" "$OUT/summary.md" 2>/dev/null
  tar czf "$tmp" -C "$RES" . 2>/dev/null && mv -f "$tmp" "$OUT/results.tgz"
}

# stage NAME LIMIT CMD...: run CMD under min(LIMIT, time left); log rc and seconds.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ "$left" -lt 20 ]; then
    echo "$name skipped: ${left}s left" | tee -a "$RES/env.txt"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start rc
  start=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  echo "$name rc=$rc in $(( $(date +%s) - start ))s (limit ${limit}s)" | tee -a "$RES/env.txt"
  pack
  return $rc
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$RES/env.txt"
# (output to its own file, then into env.txt: stage logs its rc line there itself)
if want bandwidth; then
  stage bandwidth 30 sh -c 'exec python3 scripts/gpu_bandwidth.py > "$1" 2>&1' sh "$RES/bandwidth.txt"
  tee -a "$RES/env.txt" < "$RES/bandwidth.txt"
fi

# Build: the package goes in first without the extension (seconds), so the Triton
# stages start at once; the extension (about 2 min of nvcc) builds meanwhile in the
# background, in a copy of the tree, and its _C is copied into fastmod/ when done.
# Stages that need _C wait for it (wait_build).
echo "== install (pure Python), extension building in the background"
BUILD_PID=
if [ "${SKIP_BUILD:-0}" = 1 ]; then echo "build skipped (SKIP_BUILD=1)" > "$RES/build.log"; else
  FASTMOD_BUILD_EXT=0 python3 -m pip install --no-build-isolation --no-deps -e . > "$RES/install.log" 2>&1
  echo "pure-Python install rc=$?" | tee -a "$RES/env.txt"
  BT=$(mktemp -d)
  tar --exclude=./build --exclude=./.git -cf - . | tar -xf - -C "$BT"
  ( start=$(date +%s)
    cd "$BT" && timeout "${BUILD_LIMIT:-240}" python3 setup.py build_ext --inplace > "$RES/build.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] && cp fastmod/_C*.so "$OLDPWD/fastmod/"
    echo "build rc=$rc in $(( $(date +%s) - start ))s (background)" >> "$RES/env.txt"
  ) &
  BUILD_PID=$!
fi
wait_build() {
  [ -n "$BUILD_PID" ] && { wait "$BUILD_PID"; BUILD_PID=; grep -E " error|Error" "$RES/build.log" | head -20
    python3 -c "import fastmod, torch; from fastmod import _extension; print('_C loaded', _extension.load(), 'cuda compiled', _extension.cuda_compiled())" 2>&1 | tee -a "$RES/env.txt"; }
  return 0
}

# failures are also written to failures.txt as they happen (tests/conftest.py), so a
# run cut by its limit still names them
export FASTMOD_FAIL_LOG="$RES/failures.txt"
PYTEST=(python3 -m pytest -q --maxfail=15 -p no:cacheprovider --benchmark-disable -rfs)
# Most of the tests' time is Triton and Inductor compiling on the CPU cores (the
# 2026-11-27 H100 run: about 1 s a test), so with pytest-xdist (in the GPU image)
# one run spreads them over TEST_WORKERS processes; a worker that faults is
# replaced and its test reported.
tests() {  # tests NAME LIMIT FILES...
  local name=$1 limit=$2
  shift 2
  if python3 -c "import xdist" 2>/dev/null; then
    echo "== $name (pytest-xdist, ${TEST_WORKERS:-12} workers)"
    stage "$name" "$limit" "${PYTEST[@]}" -n "${TEST_WORKERS:-12}" "$@" > "$RES/$name.log" 2>&1
  else
    echo "== $name (one process)"
    stage "$name" "$limit" "${PYTEST[@]}" "$@" > "$RES/$name.log" 2>&1
  fi
  tail -25 "$RES/$name.log"
}

bench() {  # bench NAME LIMIT [KEXPR TAG]: one JSON per call (pytest-benchmark writes it only at
  # the end, so a call cut by its limit loses its own cases, not the others')
  local json="$RES/bench_$1${4:+_$4}.json"
  stage "bench_$1${4:+_$4}" "$2" python3 -m pytest "benchmarks/bench_$1.py" --benchmark-only -q -p no:cacheprovider \
      ${3:+-k "$3"} --benchmark-json="$json" >> "$RES/bench.log" 2>&1
  [ -s "$json" ] &&
    { echo "### $1 ${4:-}"; python3 benchmarks/summarize.py "$json" --markdown; } >> "$RES/summary.md" 2>&1
}

benches() {  # benches PART KEXPR TAG: the mixed-node and Gumbel benchmarks of one pass
  for name in ${BENCHES:-mixed_node gumbel_gate}; do
    want "$1" && bench "$name" "${BENCH_LIMIT:-60}" "$2" "$3"
  done
}

# --- while the extension builds: the Triton kernels (none of this needs _C) ---
echo "== mixed-node and Gumbel benchmarks, forward + backward, then forward"
benches bench_fwd_bwd "bwd" fwd_bwd
benches bench_fwd "not bwd" fwd
if want launch_counts; then
  echo "== kernel launches per call"
  stage launch_counts 60 sh -c 'exec python3 scripts/launch_counts.py --json "$1.json" > "$1.txt" 2>&1' \
      sh "$RES/launch_counts"
  tee -a "$RES/env.txt" < "$RES/launch_counts.txt"
fi
if want tests_triton; then
  tests tests_triton "${TEST_LIMIT:-100}" ${TRITON_TESTS:-tests/test_mixed_node.py tests/test_mixed_node_module.py \
    tests/test_gumbel_gate.py tests/test_routed_conv_triton.py tests/test_fused_norm.py}
fi
if want tune_mixed_node; then
  echo "== mixed-node launch-parameter sweep (CUDA-graph replay)"
  stage tune_mixed_node "${TUNE_MN_LIMIT:-90}" sh -c 'cd benchmarks && exec python3 tune_mixed_node.py --json "$1.json" \
      ${TUNE_MN_ARGS:-} > "$1.txt" 2>&1' sh "$RES/tune_mixed_node"
  grep best "$RES/tune_mixed_node.txt"
fi
ROUTED_CASES=${ROUTED_CASES:-frn3x3-64,frn3x3-128,frn3x3-256,frn3x3-512,brn1x1out-w128-hw28-c16,brn1x1in-w128-hw28-c16,brn3x3-w64-hw56-c8,brn3x3-w128-hw28-c16,brn3x3-w256-hw14-c32}
if want routed_triton; then
  # kernel time per call (torch.profiler): the do_bench sweep of 2026-11-27 was host-bound
  echo "== routed-conv Triton forward (and training step) vs dense cuDNN (kernel time)"
  stage routed_triton "${TUNE_LIMIT:-90}" sh -c 'exec python3 scripts/profile_routed_triton.py --train --cases "$2" \
      --configs "${TUNE_CONFIGS:-default;128,128,32,8,3;64,128,64,4,3;128,64,32,4,4;64,64,32,4,3}" \
      --group-wgrad "${GROUP_WGRAD:-dense,triton}" > "$1.txt" 2>&1' sh "$RES/routed_triton" "$ROUTED_CASES"
  cat "$RES/routed_triton.txt"
fi
if want routed_triton_cl; then  # a network run in torch.channels_last
  stage routed_triton_cl 60 sh -c 'exec python3 scripts/profile_routed_triton.py --channels-last --cases "$2" \
      > "$1" 2>&1' sh "$RES/routed_triton_cl.txt" "$ROUTED_CASES"
  cat "$RES/routed_triton_cl.txt"
fi
if want routed_triton_copy; then  # the grouped 3x3 with its x copied to channels-last (before 2026-11-27)
  stage routed_triton_copy 40 sh -c 'exec python3 scripts/profile_routed_triton.py --nchw copy \
      --cases brn3x3-w64-hw56-c8,brn3x3-w128-hw28-c16,brn3x3-w256-hw14-c32 > "$1" 2>&1' sh "$RES/routed_triton_copy.txt"
  cat "$RES/routed_triton_copy.txt"
fi
if want group_wgrad_check; then  # the Triton grouped weight gradient, each variant in its own process
  stage group_wgrad_check "${WGRAD_LIMIT:-100}" sh -c 'exec python3 scripts/check_group_wgrad.py --sanitize \
      ${WGRAD_ARGS:-} > "$1" 2>&1' sh "$RES/group_wgrad_check.txt"
  cat "$RES/group_wgrad_check.txt"
fi
if want launch_overhead; then  # host time per call: Triton launches, fused norms, routed conv vs PyTorch
  stage launch_overhead 60 sh -c 'exec python3 scripts/launch_overhead.py > "$1" 2>&1' sh "$RES/launch_overhead.txt"
  cat "$RES/launch_overhead.txt"
fi
if want profile_models; then  # whole models: GPU kernels and host hot spots, kernels on vs off
  stage profile_models "${PROFILE_MODELS_LIMIT:-120}" sh -c 'exec python3 scripts/profile_models.py --top 8 \
      --models qgmrn-brn,qgmrn-frn,lnmn --impls fastmod,fastmod-nonorm,reference --host 20 > "$1" 2>&1' sh "$RES/profile_models.txt"
  grep -E "wall|^ +[0-9]" "$RES/profile_models.txt" | head -80
fi

# --- with the extension ---
wait_build
if want routed_profile; then
  echo "== routed-conv CUDA kernels profiled"
  stage routed_profile 60 sh -c 'exec python3 scripts/profile_routed_cuda.py > "$1" 2>&1' sh "$RES/routed_profile.txt"
  cat "$RES/routed_profile.txt"
fi
if want tests_cuda; then
  tests tests_cuda "${TEST_LIMIT:-100}" ${CUDA_TESTS:-tests/test_routed_conv_cuda.py tests/test_routed_conv.py \
    tests/test_routed_conv_triton.py tests/test_routed_modules.py tests/test_routed_conv_gn.py \
    tests/test_routed_bottleneck.py tests/test_load_balancing.py tests/test_router.py tests/test_train_models.py}
fi
if want routed_bench; then
  echo "== routed-conv benchmark (routed vs dense; routed = FASTMOD_ROUTED_CONV_GPU, default triton)"
  FASTMOD_ROUTED_CONV_GPU=${FASTMOD_ROUTED_CONV_GPU:-triton} \
  FASTMOD_BENCH_FULL=${FASTMOD_BENCH_FULL:-0} FASTMOD_BENCH_IMPLS=${FASTMOD_BENCH_IMPLS:-routed,dense} \
      bench routed_conv "${ROUTED_BENCH_LIMIT:-120}"
fi
if want bench_models; then
  echo "== whole models (LNMN, QGMRN-BRN/FRN): training step and inference, kernels on vs off"
  # one JSON per model, so a model cut by its limit loses only its own rows
  for m in ${MODELS:-lnmn qgmrn-brn qgmrn-frn}; do bench models "${MODELS_LIMIT:-70}" "$m" "$m"; done
fi
cat "$RES/summary.md"
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$RES/env.txt"
pack
