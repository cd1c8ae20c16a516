#!/usr/bin/env bash
# The tuned Table 3 on Census-Income (results/tune-cpu, results/table3-tuned), as committed.
#
#   DTN_CENSUS_DIR=/path/to/census-income scripts/table3_tuned.sh [results]
#
# Resumable: rerun it after an interruption. Finished studies and runs are reused, an interrupted
# study resumes (its cut-off trial runs again), an interrupted run resumes from its last.pt.
# Steps: (1) one Optuna study per model, 16 trials each, on 25% of the train split, at most 4
# epochs a trial, two studies at a time (one thread each); (2) every model with its tuned config
# on the full train split, seeds 1-5, in three processes (one thread each); (3) the table: reuses
# those runs, trims each seed's DTN, and tests DTN against every baseline (paired t / Wilcoxon
# over seeds, paired bootstrap over test rows).
set -euo pipefail
OUT=${1:-results}
PY=${PYTHON:-python}
SEEDS=1,2,3,4,5
# the committed runs train the embedding tables with the dense Adam (made before rowwise_adagrad became
# train.embedding_optimizer's default); the same config also keeps their fingerprints, so they are reused
ADAM=(--set train.embedding_optimizer=adam)

$PY -u -m dtn tune --models dtn,tfi,sfm,mmoe,ple,shared_bottom --config cpu --trials 16 --subsample 0.25 \
    --max-epochs 4 --jobs 2 --seed 0 "${ADAM[@]}" --out "$OUT/tune-cpu"

# three processes of one thread each (measured: DTN alone ~100 min, TFI ~55 min, the other four ~70 min)
mkdir -p "$OUT/table3-tuned"
lane() {
    local log=$1; shift
    for m in "$@"; do
        $PY -u -m dtn compare --tuned "$OUT/tune-cpu" --models "$m" --seeds $SEEDS --threads 1 "${ADAM[@]}" \
            --out "$OUT/table3-tuned" >> "$OUT/table3-tuned/$log" 2>&1 || return 1
    done
}
lane train-a.log dtn & a=$!
lane train-b.log tfi & b=$!
lane train-c.log sfm ple mmoe shared_bottom & c=$!
status=0
for p in $a $b $c; do wait $p || status=1; done
if [ $status -ne 0 ]; then
    echo "a training process failed: see $OUT/table3-tuned/train-{a,b,c}.log; rerun to resume" >&2
    exit 1
fi

$PY -u -m dtn table3 --tuned "$OUT/tune-cpu" --seeds $SEEDS --trim-threshold 0.08 --threads 1 "${ADAM[@]}" \
    --out "$OUT/table3-tuned"
