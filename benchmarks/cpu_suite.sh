#!/usr/bin/env bash
# The benchmark suite on CPU: reference vs torch.compile vs the C++ embedding bag, per op and
# for whole models, providers timed in interleaved rounds; Triton providers are skipped (with the
# reason) off CUDA, and so is bf16 (opt-in on CPU: DTN_BENCH_PRECISIONS=fp32,bf16).
#
#   bash benchmarks/cpu_suite.sh [OUT_DIR]        (default results/bench-cpu)
#
# Writes OUT_DIR/cases.jsonl (every group as it finishes), results.json (pytest-benchmark),
# report.md, speedups.png and suite.log. Budget: DTN_BENCH_BUDGET_S seconds (default 540); groups
# and compiles left when it runs out are skipped and listed in the report. DTN_BENCH_THREADS
# (default 1: on a machine with other work, more threads make the baselines' OpenMP regions wait
# on descheduled threads) sets torch's threads.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${1:-results/bench-cpu}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$OUT"
rm -f "$OUT/cases.jsonl"
start=$(date +%s)
export DTN_BENCH_DEVICE=cpu
export DTN_BENCH_PRESET="${DTN_BENCH_PRESET:-quick}"
export DTN_BENCH_THREADS="${DTN_BENCH_THREADS:-1}"
export DTN_BENCH_DEADLINE=$(( start + ${DTN_BENCH_BUDGET_S:-540} ))
export DTN_BENCH_LOG="$OUT/cases.jsonl"
export PYTHONUNBUFFERED=1
# every benchmarks/bench_*.py, whole models last
files=$(ls benchmarks/bench_*.py | grep -v '/bench_model\.py$'; ls benchmarks/bench_model.py)
# shellcheck disable=SC2086
"$PY" -m pytest $files -k "not test_embedding_bag_fwd_bwd" --benchmark-only -q -p no:cacheprovider -rs \
  --benchmark-json="$OUT/results.json" --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/suite.log"
# kernel launches per DTN training / inference step in each kernel mode (hardware-independent; about
# 3 minutes here): the report includes it
"$PY" benchmarks/count_launches.py --batch 2048 --markdown "$OUT/launches.md" --json "$OUT/launches.json" \
  2>&1 | grep -v '^USDT' | tee -a "$OUT/suite.log"
"$PY" benchmarks/report.py "$OUT/cases.jsonl" --out "$OUT" \
  --command "DTN_BENCH_THREADS=$DTN_BENCH_THREADS bash benchmarks/cpu_suite.sh $OUT"
echo "cpu suite finished in $(( $(date +%s) - start )) s"
