#!/usr/bin/env bash
# The tuned Table 3 on Census-Income (results/tune-cpu, results/table3-tuned), as committed.
#
#   DTN_CENSUS_DIR=/path/to/census-income scripts/table3_tuned.sh [results]
#
# Resumable: rerun it after an interruption. Finished studies and runs are reused, an interrupted
# study resumes (its cut-off trial runs again), an interrupted run resumes from its last.pt.
# Steps: (1) one Optuna study per model, 16 trials each, on 25% of the train split, at most 4
# epochs a trial, two studies at a time (one thread each); (2) every model with its tuned config
# on the full train split, seeds 1-5, in two processes (one thread each); (3) the table: reuses
# those runs, trims each seed's DTN, and tests DTN against every baseline (paired t / Wilcoxon
# over seeds, paired bootstrap over test rows).
set -euo pipefail
OUT=${1:-results}
PY=${PYTHON:-python}
SEEDS=1,2,3,4,5

$PY -u -m dtn tune --models dtn,tfi,sfm,mmoe,ple,shared_bottom --config cpu --trials 16 --subsample 0.25 \
    --max-epochs 4 --jobs 2 --seed 0 --out "$OUT/tune-cpu"

# the expensive models first in each half, so the two processes take about as long
mkdir -p "$OUT/table3-tuned"
$PY -u -m dtn compare --tuned "$OUT/tune-cpu" --models dtn,mmoe,shared_bottom --seeds $SEEDS --threads 1 \
    --out "$OUT/table3-tuned" > "$OUT/table3-tuned/train-a.log" 2>&1 & a=$!
$PY -u -m dtn compare --tuned "$OUT/tune-cpu" --models tfi,sfm,ple --seeds $SEEDS --threads 1 \
    --out "$OUT/table3-tuned" > "$OUT/table3-tuned/train-b.log" 2>&1 & b=$!
status=0
wait $a || status=$?
wait $b || status=$?
if [ $status -ne 0 ]; then
    echo "a training process failed (status $status): see $OUT/table3-tuned/train-a.log and train-b.log; rerun to resume" >&2
    exit $status
fi

$PY -u -m dtn table3 --tuned "$OUT/tune-cpu" --seeds $SEEDS --trim-threshold 0.08 --threads 1 \
    --out "$OUT/table3-tuned"
