#!/usr/bin/env bash
# Table 3 (the paper's quality table) at the paper's configuration on a GPU, for a device session
# with time left: Shared-Bottom, MMoE, PLE, TFI, DTN on Census-Income, seed 1 for every model
# first, then seeds 2, 3, ... while the time budget allows. The table is rewritten after every
# finished model / seed, so a run cut short keeps everything that finished.
#
#   bash benchmarks/gpu_quality.sh [OUT_DIR]          (default results/table3-gpu)
#
# Writes OUT_DIR/table3.md (Markdown, mean ± std over the seeds each model got), table3.json
# (the summary, seeds per model, config, device, timings), quality.log, and per run
# OUT_DIR/<model>/seed<k>/{metrics.json,history.csv}. Checkpoints are deleted after each run
# (DTN_QUALITY_KEEP_CHECKPOINTS=1 keeps them) so the folder stays small enough to bring back as
# one tarball; finished runs already in OUT_DIR are reused, so a second session continues.
#
# Significance, as in `dtn table3 --tuned` (docs/tuning.md): once DTN and a baseline share two or
# more seeds, table3.md gets DTN's test-AUC difference against each baseline with a paired t-test
# and Wilcoxon test over those seeds and a paired bootstrap over the test rows. Each run's test
# predictions are kept (test_predictions.npz, ~0.4 MB) before its checkpoints are deleted.
#
# Settings: DTN_QUALITY_BUDGET_S (default 420: no new run starts after it; a run still training
# is stopped 60 s later), DTN_QUALITY_RESAMPLES (bootstrap resamples, default 1000; 0: none),
# DTN_QUALITY_SEEDS (default 1,2,3,4,5), DTN_QUALITY_MODELS (default
# shared_bottom,mmoe,ple,tfi,dtn; sfm also works), DTN_QUALITY_ROWS (subsample the training rows,
# validation and test to half as many each), DTN_QUALITY_DATA (census, default, or synthetic),
# DTN_CENSUS_DIR, PYTHON. The Census-Income files are looked up in $DTN_CENSUS_DIR when it is set,
# else in shared/data/census-income and ../shared/data/census-income relative to the repository;
# the GPU machine has no network, so the script stops with a clear message when they are missing.
#
# DTN_SUITE_CHECK=1: a CPU dry run that proves the script works: a 3,000-row subsample of the
# data, the paper configuration shrunk (d = 8, widths 32, 1,000 buckets), one epoch, seeds 1 and 2.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
CHECK="${DTN_SUITE_CHECK:-0}"
OUT="${1:-results/table3-gpu}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
say() { echo "[gpu_quality] $*" | tee -a "$OUT/quality.log"; }

if [ "$CHECK" = 1 ]; then
  BUDGET="${DTN_QUALITY_BUDGET_S:-240}"
  export DTN_QUALITY_SEEDS="${DTN_QUALITY_SEEDS:-1,2}" DTN_QUALITY_ROWS="${DTN_QUALITY_ROWS:-3000}" QUALITY_DEVICE=cpu
else
  BUDGET="${DTN_QUALITY_BUDGET_S:-420}"
  export QUALITY_DEVICE=cuda
fi
export QUALITY_DEADLINE=$(( $(date +%s) + BUDGET )) CHECK

DATA_KIND="${DTN_QUALITY_DATA:-census}"
if [ "$DATA_KIND" = census ]; then
  CENSUS_DIR=""
  # an explicit DTN_CENSUS_DIR must hold the files; otherwise the shared folder next to or above the repo
  if [ -n "${DTN_CENSUS_DIR:-}" ]; then cands=("$DTN_CENSUS_DIR")
  else cands=("$ROOT/shared/data/census-income" "$ROOT/../shared/data/census-income"); fi
  for cand in "${cands[@]}"; do
    if ls "$cand"/census-income.data* > /dev/null 2>&1 && ls "$cand"/census-income.test* > /dev/null 2>&1; then
      CENSUS_DIR="$(cd "$cand" && pwd)"; break
    fi
  done
  if [ -z "$CENSUS_DIR" ]; then
    say "Census-Income data NOT FOUND: looked for census-income.data[.xz|.gz] and census-income.test[.xz|.gz] in" \
        "${cands[*]}."
    say "The GPU machine has no network: copy the two files into shared/data/census-income (carried with the" \
        "working tree) or set DTN_CENSUS_DIR. Nothing was trained."
    exit 3
  fi
  export CENSUS_DIR
  say "Census-Income: $CENSUS_DIR"
elif [ "$DATA_KIND" != synthetic ]; then
  say "DTN_QUALITY_DATA must be census or synthetic, got '$DATA_KIND'"; exit 2
fi
export DATA_KIND

missing=$("$PY" -c "
import importlib.util
print(' '.join(m for m in ('torch', 'numpy', 'pandas', 'yaml') if importlib.util.find_spec(m) is None))" 2>&1)
if [ -n "$missing" ]; then
  say "missing Python packages: $missing (dtn's data loading needs pandas, its configs yaml). Nothing was trained."
  exit 4
fi

say "$([ "$CHECK" = 1 ] && echo 'DTN_SUITE_CHECK=1: CPU dry run' || echo 'GPU run') · budget ${BUDGET}s · out $OUT"
timeout --kill-after=10 $(( BUDGET + 60 )) "$PY" - "$OUT" <<'PYEOF' 2>&1 | tee -a "$OUT/quality.log"
import dataclasses, glob, json, os, sys, time

import torch

from dtn.analysis.significance import significance_markdown
from dtn.analysis.table3 import significance, test_predictions
from dtn.compare import DISPLAY, summarize, to_markdown
from dtn.config import config_from_dict, load_config
from dtn.data import load_dataset
from dtn.models import canonical_name
from dtn.train import train_model, write_metrics
from dtn.train.checkpoint import atomic_write_text

out = sys.argv[1]
check = os.environ.get("CHECK") == "1"
device = os.environ["QUALITY_DEVICE"]
deadline = float(os.environ["QUALITY_DEADLINE"])
models = [canonical_name(m) for m in os.environ.get("DTN_QUALITY_MODELS", "shared_bottom,mmoe,ple,tfi,dtn").split(",") if m]
seeds = [int(s) for s in os.environ.get("DTN_QUALITY_SEEDS", "1,2,3,4,5").split(",") if s]
rows = int(os.environ.get("DTN_QUALITY_ROWS") or 0)
resamples = int(os.environ.get("DTN_QUALITY_RESAMPLES") or (100 if check else 1000))
t_start = time.time()
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch (use DTN_SUITE_CHECK=1 for the CPU dry run)")

over = {"train": {"device": device, "progress": False}}
if os.environ["DATA_KIND"] == "census":
    over["data"] = {"dataset": "census", "path": os.environ["CENSUS_DIR"]}
else:
    over["data"] = {"dataset": "synthetic", "synthetic_rows": max(rows * 2, 2000) if rows else 20000}
if check:  # the paper configuration, shrunk so the dry run takes seconds a model
    over["model"] = {"embed_dim": 8, "fim_dim": 32, "tower_hidden": [16], "expert_hidden": [32], "bottom_hidden": [32],
                     "masknet": {"mask_hidden": 32, "block_dim": 32},
                     "memonet": {"num_buckets": 1000, "codebook_dim": 8}}
    over["train"].update(epochs=1, batch_size=256, eval_batch_size=2048, num_threads=1)
cfg = config_from_dict(over, load_config("paper"))

t0 = time.time()
data = load_dataset(cfg.data, progress=False)
if rows:  # a fixed random subsample (the validation / test halves are already a random split)
    g = torch.Generator().manual_seed(0)
    pick = lambda split, n: split.take(torch.randperm(len(split), generator=g)[: min(n, len(split))])  # noqa: E731
    data = dataclasses.replace(data, train=pick(data.train, rows), valid=pick(data.valid, rows // 2),
                               test=pick(data.test, rows // 2))
tasks = list(data.schema.labels)
print(f"data: {len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test rows, "
      f"{data.schema.num_fields} fields, tasks {tasks} ({time.time() - t0:.1f}s)")
dev_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"

runs = {m: {} for m in models}  # model -> {seed: metrics}
wall = {}  # model -> seconds its first trained seed took (the estimate for the next seeds)
not_run = []


def run_dir(m, s):
    return os.path.join(out, m, f"seed{s}")


for m in models:  # finished runs of an earlier session are reused
    for s in seeds:
        p = os.path.join(run_dir(m, s), "metrics.json")
        if os.path.exists(p):
            with open(p) as fh:
                runs[m][s] = json.load(fh)
            wall.setdefault(m, runs[m][s].get("train_seconds", 0.0) + 5.0)  # + evaluation
            print(f"[{m} seed {s}] reusing {p}")


sig_cache = {}  # (models, common seeds) -> significance: recomputed only when either changes


def write_table():
    done = {m: [runs[m][s] for s in sorted(runs[m])] for m in models if runs[m]}
    if not done:
        return
    base = "shared_bottom" if "shared_bottom" in done else None
    summary = summarize(done, tasks, base=base)
    summary.update(seeds={m: sorted(runs[m]) for m in done}, device=dev_name, data=os.environ["DATA_KIND"],
                   data_rows={"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
                   elapsed_s=round(time.time() - t_start, 1), not_run=not_run, config=cfg.to_dict(),
                   torch=torch.__version__, check=check)
    common = sorted(set.intersection(*(set(runs[m]) for m in done)))  # seeds every finished model has
    key = (tuple(sorted(done)), tuple(common))
    if key not in sig_cache and "dtn" in done and len(done) > 1 and len(common) >= 2:
        try:
            sig_cache[key] = significance(data, out, {m: [runs[m][s] for s in common] for m in done}, common,
                                          resamples=resamples, log=print)
        except (OSError, ValueError, KeyError) as exc:  # a run without its predictions: say so once, keep the table
            print(f"significance skipped: {exc}")
            not_run.append(f"significance over seeds {common} ({exc})")
            sig_cache[key] = None
    sig = sig_cache.get(key)
    summary["significance"] = sig
    md = to_markdown(summary)
    if sig is not None:
        md += (f"\nSignificance of DTN's test AUC differences, over seeds {common} "
               f"({resamples} bootstrap resamples):\n\n" + significance_markdown(sig, DISPLAY))
    md += "\nSeeds per model: " + "; ".join(f"{DISPLAY.get(m, m)} {sorted(runs[m])}" for m in done) + ".\n"
    md += (f"Paper configuration{' (shrunk for the CPU dry run)' if check else ''}, {dev_name}, torch "
           f"{torch.__version__}, {summary['data_rows']['train']:,} training rows; "
           f"{summary['elapsed_s']:.0f} s so far.\n")
    if not_run:
        md += "Not run: " + "; ".join(not_run) + ".\n"
    write_metrics(summary, os.path.join(out, "table3.json"))
    atomic_write_text(md, os.path.join(out, "table3.md"))
    print(f"table written ({sum(len(v) for v in runs.values())} runs): {os.path.join(out, 'table3.md')}")


for si, seed in enumerate(seeds):
    for m in models:
        if seed in runs[m]:
            continue
        left = deadline - time.time()
        need = 1.2 * wall[m] + 5 if m in wall else None
        if left < 10 or (si > 0 and (need is None or need > left)):
            why = "budget spent" if left < 10 else (f"needs ~{need:.0f} s, {left:.0f} s left" if need else
                                                    "no earlier seed to estimate its time")
            not_run.append(f"{DISPLAY.get(m, m)} seed {seed} ({why})")
            print(f"[{m} seed {seed}] not run: {why}")
            continue
        t0 = time.time()
        scfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
        print(f"[{m} seed {seed}] training on {device}")
        _, result = train_model(m, data, scfg, out_dir=run_dir(m, seed), resume=True, log=print)
        wall.setdefault(m, time.time() - t0)
        runs[m][seed] = result
        if resamples:  # the bootstrap needs the test predictions; keep them before best.pt goes
            test_predictions(data, run_dir(m, seed), result, log=print)
        if os.environ.get("DTN_QUALITY_KEEP_CHECKPOINTS") != "1":
            for p in glob.glob(os.path.join(run_dir(m, seed), "*.pt")):
                os.remove(p)
        print(f"[{m} seed {seed}] done in {time.time() - t0:.1f}s: " +
              ", ".join(f"{t} AUC {result['test'][t]['auc']:.4f}" for t in tasks))
        write_table()
    if all(seed not in runs[m] for m in models):
        break  # nothing fitted in this seed: later seeds will not either
write_table()
print(f"finished in {time.time() - t_start:.0f}s")
PYEOF
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] || [ "$rc" = 137 ] && say "stopped by the time limit: the table keeps every run that finished"
[ -f "$OUT/table3.md" ] && { say "table:"; cat "$OUT/table3.md" | tee -a "$OUT/quality.log"; }
say "exit code $rc; everything is in $OUT"
parent=$(dirname "$OUT"); name=$(basename "$OUT")
echo "To bring it back as one file: tar -czf \"\$OUT/$name.tar.gz\" -C \"$parent\" \"$name\""
exit "$rc"
