#!/usr/bin/env bash
# The benchmark suite on CPU: reference vs torch.compile vs the C++ embedding bag, per op and
# for whole models; Triton providers are skipped (with the reason) off CUDA.
#
#   bash benchmarks/cpu_suite.sh [OUT_DIR]        (default results/bench-cpu)
#
# Writes OUT_DIR/results.json (pytest-benchmark), report.md, speedups.png and suite.log.
# Budget: DTN_BENCH_BUDGET_S seconds (default 540); cases left when it runs out are skipped
# and listed in the report. DTN_BENCH_THREADS (default 1: on a machine with other work, more
# threads make the baselines' OpenMP regions wait on descheduled threads) sets torch's threads.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${1:-results/bench-cpu}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$OUT"
start=$(date +%s)
export DTN_BENCH_DEVICE=cpu
export DTN_BENCH_PRESET="${DTN_BENCH_PRESET:-quick}"
export DTN_BENCH_THREADS="${DTN_BENCH_THREADS:-1}"
export DTN_BENCH_DEADLINE=$(( start + ${DTN_BENCH_BUDGET_S:-540} ))
export PYTHONUNBUFFERED=1
"$PY" -m pytest benchmarks/bench_embedding_bag.py benchmarks/bench_gated_cross.py benchmarks/bench_masknet.py \
  benchmarks/bench_hcnet.py benchmarks/bench_softmax_gate.py benchmarks/bench_model.py \
  -k "not test_embedding_bag_fwd_bwd" --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/results.json" --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/suite.log"
"$PY" benchmarks/report.py "$OUT/results.json" --out "$OUT" \
  --command "DTN_BENCH_THREADS=$DTN_BENCH_THREADS bash benchmarks/cpu_suite.sh $OUT"
echo "cpu suite finished in $(( $(date +%s) - start )) s"
