#!/usr/bin/env bash
# One command for a fresh GPU machine (torch, triton, nvcc, pytest, pytest-benchmark and
# hypothesis preinstalled; no network needed): build the CUDA extension, run the GPU tests,
# measure the embedding bag's bandwidth, run the benchmark suite, write JSON + report.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        (default results/bench-gpu)
#
# Stays inside DTN_SUITE_BUDGET_S seconds (default 450, under 8 minutes): the build and the
# tests get fixed timeouts, and the benchmarks skip the cases left when the budget runs out
# (listed in the report). PYTHON picks the interpreter (default python3).
#
# DTN_SUITE_CHECK=1 runs every stage on a machine without a GPU, to check the script itself:
# the CUDA build for sm_90 (nvcc compiles, nothing runs), the same tests on CPU, the bandwidth
# script and a smoke-sized suite on CPU, and the report.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${1:-results/bench-gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
start=$(date +%s)
BUDGET="${DTN_SUITE_BUDGET_S:-450}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ "${DTN_SUITE_CHECK:-0}" = 1 ] || export TRITON_INTERPRET=0
elapsed() { echo $(( $(date +%s) - start )); }
say() { echo "[gpu_suite $(elapsed)s] $*" | tee -a "$OUT/suite.log"; }

CHECK="${DTN_SUITE_CHECK:-0}"
if [ "$CHECK" = 1 ]; then
  say "DTN_SUITE_CHECK=1: checking the script on CPU (no GPU numbers)"
  DEVICE=cpu; PRESET=smoke; cap=9.0
  export DTN_BENCH_THREADS=1
else
  DEVICE=cuda; PRESET="${DTN_BENCH_PRESET:-full}"
fi

say "environment"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/suite.log"
import importlib.util, sys
missing = [m for m in ("torch", "triton", "yaml", "pandas", "numpy", "sklearn", "matplotlib", "tqdm", "pytest",
                       "pytest_benchmark", "hypothesis") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {missing} (pip install them, or carry wheels)")
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
else:
    print("no CUDA device")
PYEOF
[ "${PIPESTATUS[0]}" = 0 ] || { say "environment check FAILED"; exit 1; }
nvcc --version 2>&1 | tail -2 | tee -a "$OUT/suite.log"

if [ "$CHECK" = 1 ]; then
  # a CPU torch has no libtorch_cuda to link: compile the CUDA sources for sm_90 without linking
  # (tests/test_cuda_compile.py), and build the extension for CPU
  say "build (check): nvcc compile-only of csrc/cuda for sm_90, then the CPU extension"
  timeout 600 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_compile.py > "$OUT/build.log" 2>&1 \
    || { say "CUDA compile check FAILED (see build.log)"; tail -30 "$OUT/build.log"; exit 1; }
  DTN_SKIP_CUDA=1 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || exit 1
else
  cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))") || exit 1
  say "build: dtn_kernels._C with CUDA for sm_$cap"
  if ! DTN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS="$(nproc)" timeout 240 \
      "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    say "build FAILED (see build.log)"; tail -30 "$OUT/build.log"; exit 1
  fi
  "$PY" -c "import dtn_kernels as k; assert k.HAS_CUDA_EXT, k.C_EXT_ERROR; print('HAS_CUDA_EXT', k.HAS_CUDA_EXT)" \
    2>&1 | tee -a "$OUT/suite.log" || exit 1
fi

say "GPU tests (CUDA embedding bag, Triton kernels on the GPU, kernel switch)"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_embedding_bag.py tests/test_triton_gated_cross.py \
  tests/test_triton_masknet.py tests/test_triton_hcnet.py tests/test_triton_softmax_gate.py \
  tests/test_kernel_switch.py -rs --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tail -5 "$OUT/gpu_tests.log" | tee -a "$OUT/suite.log"
say "GPU tests exit code $tests_rc"

say "embedding bag forward bandwidth vs copy bandwidth"
timeout 60 "$PY" benchmarks/embedding_bag_bandwidth.py --out "$OUT/bandwidth.json" 2>&1 | tee -a "$OUT/suite.log"

export DTN_BENCH_DEVICE=$DEVICE DTN_BENCH_PRESET=$PRESET
# ops first (each is cheap to compile), whole models last; within each, the headline cases first
# (every op's forward + backward at B = 2048, the DTN training step), then the rest. Every case is
# appended to cases.jsonl the moment it finishes or is skipped, so a timeout loses nothing measured.
BENCH_FILES="benchmarks/bench_embedding_bag.py benchmarks/bench_gated_cross.py benchmarks/bench_masknet.py
  benchmarks/bench_hcnet.py benchmarks/bench_softmax_gate.py benchmarks/bench_model.py"
rm -f "$OUT"/results_*.json "$OUT"/cases.jsonl
export DTN_BENCH_LOG="$OUT/cases.jsonl"
bench_rc=0
for part in core rest; do
  left=$(( BUDGET - $(elapsed) - 15 ))
  if [ "$left" -le 10 ]; then say "benchmarks: no time left for $part"; continue; fi
  say "benchmarks: $part ($left s left)"
  export DTN_BENCH_SUBSET=$part DTN_BENCH_DEADLINE=$(( $(date +%s) + left ))
  # shellcheck disable=SC2086
  timeout "$left" "$PY" -m pytest $BENCH_FILES -k "not test_embedding_bag_fwd_bwd" \
    --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/results_$part.json" \
    --benchmark-columns=median,iqr,rounds > "$OUT/bench_$part.log" 2>&1
  rc=$?
  say "benchmarks $part: exit code $rc"
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || bench_rc=$rc  # 5: nothing collected
done
"$PY" benchmarks/report.py "$OUT/cases.jsonl" --out "$OUT" --command "bash benchmarks/gpu_suite.sh $OUT" \
  2>&1 | tee -a "$OUT/suite.log"
say "done (tests exit code $tests_rc, benchmarks $bench_rc)"
[ "$tests_rc" = 0 ] && exit "$bench_rc"
exit "$tests_rc"
