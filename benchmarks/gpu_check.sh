#!/usr/bin/env bash
# The GPU check (issue 12 item 5), bounded to about 5 minutes of wall time on one GPU:
#   1. install the project and its peers from the wheels in $WHEELS (default: .whl/ at the repo
#      root; no package index is used): lark, interegular, fla-core, accelerated-scan;
#   2. the Triton tests compiled for the GPU (PSMC_TEST_DEVICE=cuda, TRITON_INTERPRET=0), cut
#      at $TEST_BUDGET seconds;
#   3. benchmarks/gpu.py (psmc against fla, accelerated-scan and torch associative_scan, with
#      correctness checks), cut at $BENCH_BUDGET seconds, every case with its own budget.
# Everything is printed as it happens; with $OUT set, the log and the table are written there
# (gpu_check.log, gpu_tests.log, gpu_bench.log, gpu_bench.md). A failing step never stops the
# next one; the exit status is that of the benchmark. INSTALL=0 skips the installs.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
WHEELS=${WHEELS:-.whl}
TEST_BUDGET=${TEST_BUDGET:-45}
BENCH_BUDGET=${BENCH_BUDGET:-210}
OUTDIR=${OUT:-}
LOG=/dev/null
if [ -n "$OUTDIR" ]; then mkdir -p "$OUTDIR"; LOG="$OUTDIR/gpu_check.log"; fi
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

# 2. the Triton tests on the GPU (compiled, not interpreted). Tests that assert CPU-only
#    behaviour (what backend='auto' does with CPU tensors) are deselected. PSMC_AUTOTUNE=0: the
#    static launch configurations (one compile per test shape); the autotuner's tests turn it on.
say "Triton tests on CUDA (budget ${TEST_BUDGET}s)"
TLOG=/dev/null
[ -n "$OUTDIR" ] && TLOG="$OUTDIR/gpu_tests.log"
PSMC_TEST_DEVICE=cuda TRITON_INTERPRET=0 PSMC_AUTOTUNE=0 timeout -s INT -k 15 "$TEST_BUDGET" python -m pytest -q -p no:cacheprovider \
  tests/codegen/test_triton_scan.py tests/codegen/test_triton_matrix.py tests/codegen/test_triton_layers.py \
  tests/codegen/test_triton_varlen.py tests/codegen/test_triton_tree.py tests/codegen/test_triton_state.py tests/codegen/test_triton_autotune.py tests/codegen/test_triton.py tests/runtime/test_triton_chunk.py \
  tests/runtime/test_triton_delta.py \
  tests/runtime/test_triton_delta_step.py tests/runtime/test_triton_dplr.py tests/runtime/test_triton_dplr_step.py \
  -k "not backend_choice and not auto_chooses" 2>&1 | tee "$TLOG" | tail -25 | tee -a "$LOG"
say "tests done (pytest exit ${PIPESTATUS[0]}; 2 = interrupted at the budget: the summary above counts what ran)"

# 3. the benchmark
say "benchmark (budget ${BENCH_BUDGET}s)"
timeout -s INT -k 15 $(( BENCH_BUDGET + 25 )) python benchmarks/gpu.py --budget "$BENCH_BUDGET" 2>&1 | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
say "finished (benchmark exit $STATUS)"
exit "$STATUS"
