#!/usr/bin/env bash
# The GPU check (issue 12 item 5), bounded to about 8.5 minutes of wall time on one GPU:
#   1. install the project and its peers from the wheels in $WHEELS (default: .whl/ at the repo
#      root; no package index is used): lark, interegular, fla-core, accelerated-scan;
#   2. in parallel, for $PARALLEL_BUDGET seconds: the Triton tests compiled for the GPU
#      (PSMC_TEST_DEVICE=cuda, TRITON_INTERPRET=0, $TEST_WORKERS xdist workers), the chunk
#      kernels' accuracy check (benchmarks/chunk_gpu_check.py --skip-timing) and the
#      benchmark's warm-up (benchmarks/gpu.py --warm: compiles and autotuning into the caches);
#   3. benchmarks/gpu.py alone on the GPU (psmc against fla, accelerated-scan and torch
#      associative_scan, with correctness checks), cut at $BENCH_BUDGET seconds, every case
#      with its own budget.
# Everything is printed as it happens; with $OUT set, the logs and the table are written there
# (gpu_check.log, gpu_tests.log, chunk_check.log, warm.log, gpu_bench.log, gpu_bench.md). A
# failing step never stops the next one; the exit status is that of the benchmark. INSTALL=0
# skips the installs.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
WHEELS=${WHEELS:-.whl}
BENCH_BUDGET=${BENCH_BUDGET:-240}
OUTDIR=${OUT:-}
LOG=/dev/null
if [ -n "$OUTDIR" ]; then mkdir -p "$OUTDIR"; LOG="$OUTDIR/gpu_check.log"; fi
# the GPU image's interpreter is python3; the steps below (and tests that start Python) say python
if ! command -v python >/dev/null 2>&1; then
  mkdir -p "${TMPDIR:-/tmp}/psmc-bin" && ln -sf "$(command -v python3)" "${TMPDIR:-/tmp}/psmc-bin/python"
  export PATH="${TMPDIR:-/tmp}/psmc-bin:$PATH"
fi
say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

say "python $(python -c 'import sys; print(sys.version.split()[0])'), $(python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$LOG"

# 1. installs: wheels only, no index, no dependency resolution (torch, triton, numpy, sympy,
#    networkx, einops, pytest and hypothesis are on the machine already)
if [ "${INSTALL:-1}" = 0 ]; then
  say "INSTALL=0: using what is installed"
elif [ -d "$WHEELS" ]; then
  say "installing $(ls "$WHEELS"/*.whl 2>/dev/null | xargs -n1 basename | tr '\n' ' ')"
  python -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl 2>&1 | tail -3 | tee -a "$LOG"
else
  say "no wheel folder $WHEELS: peers that are not installed are reported as such"
fi
if [ "${INSTALL:-1}" = 0 ]; then
  :
elif python -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
  say "psmc installed (editable)"
else
  say "psmc not pip-installable here (no setuptools?): using PYTHONPATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PSMC_CACHE_DIR="${PSMC_CACHE_DIR:-$(mktemp -d)}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$(mktemp -d)}"
python -c "import psmc, fla, accelerated_scan; print('imports ok: psmc', psmc.__file__)" 2>&1 | tail -1 | tee -a "$LOG"

# 2. in parallel, for at most $PARALLEL_BUDGET seconds: the Triton tests compiled for the GPU
#    (xdist workers: compiling dominates, and the machine has the cores), the chunk kernels'
#    accuracy check, and the benchmark's warm-up (benchmarks/gpu.py --warm in three processes by
#    case group: every row called once, untimed, so that psmc's kernels, fla's autotuned
#    kernels and Inductor's graphs are in the on-disk caches when the timed run starts alone).
#    Tests that assert CPU-only behaviour (what backend='auto' does with CPU tensors) are
#    deselected. PSMC_AUTOTUNE=0 in the tests: the static launch configurations.
PARALLEL_BUDGET=${PARALLEL_BUDGET:-240}
TEST_WORKERS=${TEST_WORKERS:-6}
say "in parallel for at most ${PARALLEL_BUDGET}s: Triton tests on CUDA (${TEST_WORKERS} workers), chunk accuracy check, benchmark warm-up"
TLOG=/dev/null
[ -n "$OUTDIR" ] && TLOG="$OUTDIR/gpu_tests.log"
SCRATCH=$(mktemp -d)
XDIST=""
python -c "import xdist" 2>/dev/null && [ "$TEST_WORKERS" -gt 1 ] && XDIST="-n $TEST_WORKERS"
(PSMC_TEST_DEVICE=cuda TRITON_INTERPRET=0 PSMC_AUTOTUNE=0 timeout -s INT -k 15 "$(( PARALLEL_BUDGET - 15 ))" python -m pytest -q -p no:cacheprovider $XDIST \
  tests/codegen/test_triton_scan.py tests/codegen/test_triton_matrix.py tests/codegen/test_triton_layers.py \
  tests/codegen/test_triton_varlen.py tests/codegen/test_triton_tree.py tests/codegen/test_triton_state.py tests/codegen/test_triton_autotune.py tests/codegen/test_triton.py tests/runtime/test_triton_chunk.py \
  tests/runtime/test_triton_delta.py \
  tests/runtime/test_triton_delta_step.py tests/runtime/test_triton_dplr.py tests/runtime/test_triton_dplr_step.py \
  -k "not backend_choice and not auto_chooses" > "$SCRATCH/tests.log" 2>&1; echo "pytest exit $?" >> "$SCRATCH/tests.log") &
TESTS=$!
(timeout -s INT -k 10 "$(( PARALLEL_BUDGET - 30 ))" python benchmarks/chunk_gpu_check.py --skip-timing --no-fla > "$SCRATCH/chunk.log" 2>&1; echo "chunk_gpu_check exit $?" >> "$SCRATCH/chunk.log") &
WARM=""
# fla's chunk kernels compile for minutes on the GPU image's Triton (its autotuner compiles every
# configuration; 2026-12-04: chunk_delta_rule 99 s, chunk_gla's backward more than 150 s), so
# the GLA family gets processes of its own; --isolate kills a row that outlives its budget
# (what it compiled stays in the cache for the timed run).
for groups in "gla" "simple_gla" "delta_rule kda gated_delta_product" \
              "first_order decode ssm tree tree_decode packed rwkv7 packed_rwkv7 rwkv6 mlstm"; do
  tag=${groups%% *}
  (env -u OUT timeout -s INT -k 10 "$(( PARALLEL_BUDGET - 5 ))" python benchmarks/gpu.py --warm --isolate \
     --budget "$(( PARALLEL_BUDGET - 20 ))" --case-budget 90 --only $groups > "$SCRATCH/warm_$tag.log" 2>&1
   echo "warm-up ($groups) exit $?" >> "$SCRATCH/warm_$tag.log") &
  WARM="$WARM $!"
done
wait $TESTS
tail -25 "$SCRATCH/tests.log" | tee -a "$LOG"
cp "$SCRATCH/tests.log" "$TLOG" 2>/dev/null
say "tests done (124 or 130 = cut at the budget: the summary above counts what ran)"
wait
pkill -9 -f "benchmarks/gpu.py .*--child" 2>/dev/null  # (a child whose parent was killed: not beside the timed run)
cat "$SCRATCH"/warm_*.log > "$SCRATCH/warm.log"
grep -E "exit|Error|Overrun" "$SCRATCH/warm.log" | head -40 | tee -a "$LOG"
cat "$SCRATCH/chunk.log" | tee -a "$LOG" | tail -40
if [ -n "$OUTDIR" ]; then cp "$SCRATCH/warm.log" "$OUTDIR/warm.log"; cp "$SCRATCH/chunk.log" "$OUTDIR/chunk_check.log"; fi
say "parallel phase done"

# 3. the benchmark, alone on the GPU
say "benchmark (budget ${BENCH_BUDGET}s)"
timeout -s INT -k 15 $(( BENCH_BUDGET + 45 )) python benchmarks/gpu.py --isolate --budget "$BENCH_BUDGET" 2>&1 | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
say "finished (benchmark exit $STATUS)"
exit "$STATUS"
