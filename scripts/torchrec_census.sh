#!/usr/bin/env bash
# Census-Income (the cpu config): our own input layer against the TorchRec backend, one process, 3 seeds
# each; then the TorchRec backend sharded over 2 processes (DistributedModelParallel, gloo). Resumable:
# a run with its metrics.json is kept, an interrupted one continues from its last.pt (dtn train --resume).
# Writes results/torchrec-census/table.md (and table.json).
#   DTN_CENSUS_DIR=/path/to/census-income bash scripts/torchrec_census.sh
#   MODEL=dtn SEEDS="1 2 3" OUT=results/x bash scripts/torchrec_census.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-results/torchrec-census}
MODEL=${MODEL:-mmoe}
SEEDS=${SEEDS:-1 2 3}
# the sharded run's tables: FBGEMM's CPU kernels fuse sgd / adagrad / rowwise_adagrad into the backward (not adam)
SHARDED=${SHARDED:---set train.embedding_optimizer=rowwise_adagrad --set train.embedding_lr=0.05}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
run() {  # run <folder> <dtn train args...>
  local dir=$1; shift
  if [ -f "$dir/metrics.json" ]; then echo "kept $dir"; return; fi
  echo "== $dir"
  "$@" --out "$dir" --resume
}
for seed in $SEEDS; do
  run "$OUT/own/seed$seed" "$PY" -m dtn train --model "$MODEL" --config cpu --threads 1 --set train.progress=false \
      --set "train.seed=$seed" --set train.embedding_optimizer=adam
  run "$OUT/torchrec/seed$seed" "$PY" -m dtn train --model "$MODEL" --config cpu --threads 1 --set train.progress=false \
      --set "train.seed=$seed" --set train.embedding_optimizer=adam --set model.embeddings=torchrec
done
seed=${SEEDS%% *}
# shellcheck disable=SC2086
run "$OUT/sharded-1proc/seed$seed" "$PY" -m dtn train --model "$MODEL" --config cpu --threads 1 \
    --set train.progress=false --set "train.seed=$seed" --set model.embeddings=torchrec --set model.torchrec.shard=always $SHARDED
# shellcheck disable=SC2086
run "$OUT/sharded-2proc/seed$seed" "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m dtn train \
    --model "$MODEL" --config cpu --threads 1 --set train.progress=false --set "train.seed=$seed" \
    --set model.embeddings=torchrec $SHARDED
"$PY" scripts/torchrec_census_table.py "$OUT"
