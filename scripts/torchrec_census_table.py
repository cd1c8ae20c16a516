"""The table of scripts/torchrec_census.sh: test AUCs of each run folder, side by side (mean ± std over seeds)."""
import glob
import json
import os
import sys

import numpy as np

out = sys.argv[1] if len(sys.argv) > 1 else "results/torchrec-census"
ROWS = [("own", "own input layer (InputLayer), Adam, 1 process"),
        ("torchrec", "TorchRec EmbeddingBagCollection, Adam, 1 process"),
        ("sharded-1proc", "TorchRec sharded (DMP), fused rowwise Adagrad tables, 1 process"),
        ("sharded-2proc", "TorchRec sharded (DMP), fused rowwise Adagrad tables, 2 processes (gloo)")]
table, lines = {}, []
tasks = None
for key, what in ROWS:
    runs = []
    for path in sorted(glob.glob(os.path.join(out, key, "seed*", "metrics.json"))):
        m = json.load(open(path))
        runs.append({"seed": int(os.path.basename(os.path.dirname(path))[4:]), "world_size": m.get("world_size", 1),
                     "best_epoch": m["best_epoch"], "train_seconds": m["train_seconds"],
                     "test": {t: d["auc"] for t, d in m["test"].items()}})
    if not runs:
        continue
    tasks = tasks or list(runs[0]["test"])
    table[key] = {"what": what, "runs": runs}
    cells = []
    for t in tasks:
        v = np.array([r["test"][t] for r in runs])
        cells.append(f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f}")
    per_seed = "; ".join(f"seed {r['seed']}: " + ", ".join(f"{r['test'][t]:.4f}" for t in tasks) for r in runs)
    lines.append(f"| {what} | {len(runs)} | " + " | ".join(cells) + f" | {per_seed} |")
head = f"| backend | seeds | " + " | ".join(f"test AUC {t}" for t in tasks or []) + " | per seed |"
md = "\n".join([head, "|" + "---|" * (3 + len(tasks or [])), *lines]) + "\n"
with open(os.path.join(out, "table.md"), "w") as fh:
    fh.write(md)
with open(os.path.join(out, "table.json"), "w") as fh:
    json.dump(table, fh, indent=2)
print(md)
