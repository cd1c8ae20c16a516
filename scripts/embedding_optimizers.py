"""Census-Income quality of each embedding optimizer (``train.embedding_optimizer``), DTN and MMoE.

Every run is the CLI (``dtn train --config cpu --model M --set train.embedding_optimizer=O
--set train.seed=S ...``, 1 thread, niced) in its own folder under ``--out``; a folder whose
metrics.json exists is reused and an interrupted one continues from its last.pt (``--resume``), so
the script resumes where it stopped. Two phases:

* ``sweep``: the embedding lr of ``sgd`` and ``rowwise_adagrad`` (one seed, the **validation** AUC
  only; the test split is never looked at to choose) -> ``sweep.md``;
* ``grid``: every model x optimizer x seed at the default embedding lr
  (``dtn.train.embedding_optim.DEFAULT_EMBEDDING_LR``, written out explicitly in each run's --set)
  -> ``README.md``: mean +- std (over seeds) of the test and validation AUC per task.

    DTN_CENSUS_DIR=/work/shared/data/census-income PYTHONPATH=$PWD \\
        .venv/bin/python scripts/embedding_optimizers.py grid --jobs 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dtn.train.embedding_optim import DEFAULT_EMBEDDING_LR  # noqa: E402

OPTIMIZERS = ("adam", "sgd", "rowwise_adagrad", "lazy_adam")
MODELS = ("mmoe", "dtn")
SEEDS = (2024, 2025, 2026)
SWEEP = {"sgd": (0.1, 1.0), "rowwise_adagrad": (0.01, 0.1)}
SWEEP_MODEL, SWEEP_SEED = "mmoe", 2024


def run_dir(out: str, model: str, opt: str, lr, seed: int) -> str:
    return os.path.join(out, "runs", f"{model}-{opt}-lr{'default' if lr is None else f'{lr:g}'}-s{seed}")


def default_lr(opt: str):
    """The lr written into a grid run's --set (None: train.lr, nothing to set)."""
    return DEFAULT_EMBEDDING_LR[opt]


def kept_metrics(out: str, model: str, opt: str, lr, seed: int) -> str:
    """The copy of a finished run's metrics.json that is kept in git (run folders are not)."""
    return os.path.join(out, "metrics", os.path.basename(run_dir(out, model, opt, lr, seed)) + ".json")


def train(out: str, model: str, opt: str, lr, seed: int) -> dict:
    folder = run_dir(out, model, opt, lr, seed)
    metrics = os.path.join(folder, "metrics.json")
    kept = kept_metrics(out, model, opt, lr, seed)
    if not os.path.exists(metrics) and os.path.exists(kept):
        return _load(kept)
    lock = os.path.join(folder, ".running")
    if not os.path.exists(metrics) and os.path.exists(lock) and _alive(int(open(lock).read() or 0)):
        print(f"skip {folder}: another process runs it", flush=True)
        return {}
    if not os.path.exists(metrics):
        cmd = ["nice", "-n", "10", sys.executable, "-m", "dtn", "train", "--config", "cpu", "--model", model,
               "--threads", "1", "--set", f"train.embedding_optimizer={opt}", "--set", f"train.seed={seed}",
               "--set", "train.progress=false", "--out", folder, "--resume"]  # an interrupted run continues
        if lr is not None:
            cmd += ["--set", f"train.embedding_lr={lr}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
        os.makedirs(folder, exist_ok=True)
        with open(lock, "w") as fh:
            fh.write(str(os.getpid()))
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        finally:
            os.unlink(lock)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        print(f"done {folder}", flush=True)
    with open(metrics) as fh:
        result = json.load(fh)
    os.makedirs(os.path.dirname(kept), exist_ok=True)
    with open(kept, "w") as fh:
        json.dump(result, fh, indent=1)
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return pid > 0


def _mean_std(values) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _done(out: str, model: str, opt: str, lr, seed: int):
    """A finished run's metrics: its folder's metrics.json, else the copy kept in git (None: not run)."""
    path = os.path.join(run_dir(out, model, opt, lr, seed), "metrics.json")
    return _load(path if os.path.exists(path) else kept_metrics(out, model, opt, lr, seed))


def sweep(out: str, jobs: int, only=None) -> None:
    todo = [(SWEEP_MODEL, opt, lr, SWEEP_SEED) for opt, lrs in SWEEP.items() for lr in lrs]
    run = [a for a in todo if not only or a[1] in only]
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda a: train(out, *a), run))
    done = [(a, _done(out, *a)) for a in todo]
    todo, results = [a for a, r in done if r], [r for _, r in done if r]
    tasks = list(results[0]["valid"])
    lines = ["# Embedding lr sweep (validation AUC only)", "",
             f"Census-Income, `cpu` config, {SWEEP_MODEL}, seed {SWEEP_SEED}; `scripts/embedding_optimizers.py sweep`.",
             "", "| optimizer | embedding_lr | " + " | ".join(f"valid AUC {t}" for t in tasks) + " | mean | best epoch |",
             "|---|---|" + "---|" * (len(tasks) + 2)]
    for (m, opt, lr, s), r in zip(todo, results):
        aucs = [r["valid"][t]["auc"] for t in tasks]
        lines.append(f"| {opt} | {lr:g} | " + " | ".join(f"{a:.4f}" for a in aucs) +
                     f" | {statistics.mean(aucs):.4f} | {r['best_epoch']} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "sweep.md"), "w") as fh:
        fh.write(text)
    print(text)


def grid_runs(models=MODELS, optimizers=OPTIMIZERS, seeds=SEEDS) -> list[tuple]:
    """Model-major, then seed-major: a partial grid covers every optimizer of the first model."""
    return [(m, opt, default_lr(opt), s) for m in models for s in seeds for opt in optimizers]


def grid(out: str, jobs: int, run: bool = True) -> None:
    todo = grid_runs()
    if run:
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda a: train(out, *a), todo))
    done = [(a, _done(out, *a)) for a in todo]
    todo, results = [a for a, r in done if r], [r for _, r in done if r]
    if not results:
        print("no finished runs")
        return
    tasks = list(results[0]["test"])
    by = {}
    for (m, opt, lr, s), r in zip(todo, results):
        by.setdefault((m, opt, lr), []).append(r)
    lines = ["# Embedding optimizers on Census-Income", "",
             f"`cpu` config, seeds {', '.join(map(str, SEEDS))}, mean ± std over seeds; the embedding lr is each "
             "optimizer's default (`DEFAULT_EMBEDDING_LR`; adam and lazy_adam: train.lr = 0.002), the dense layers "
             "train with Adam in every row. Made by `scripts/embedding_optimizers.py grid`.", "",
             "| model | embedding optimizer | embedding lr | " + " | ".join(f"test AUC {t}" for t in tasks) + " | " +
             " | ".join(f"valid AUC {t}" for t in tasks) + " | seeds | best epochs | s / run |",
             "|---|---|---|" + "---|" * (2 * len(tasks) + 3)]
    for (m, opt, lr), rs in by.items():
        test = [_mean_std([r["test"][t]["auc"] for r in rs]) for t in tasks]
        valid = [_mean_std([r["valid"][t]["auc"] for r in rs]) for t in tasks]
        best = "/".join(str(r["best_epoch"]) for r in rs)
        secs = statistics.mean(r["train_seconds"] for r in rs)
        lines.append(f"| {m} | {opt} | {'train.lr' if lr is None else f'{lr:g}'} | " + " | ".join(test) + " | " +
                     " | ".join(valid) + f" | {len(rs)} | {best} | {secs:.0f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "README.md"), "w") as fh:
        fh.write(text)
    print(text)


def status(out: str) -> None:
    """Every run folder so far, finished or not: epochs done, the best epoch's validation AUCs (from
    history.csv) and, once finished, the test AUCs -> status.md."""
    import csv

    rows = []
    root = os.path.join(out, "runs")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        hist = os.path.join(root, name, "history.csv")
        if not os.path.exists(hist):
            continue
        with open(hist) as fh:
            h = list(csv.DictReader(fh))
        if not h:
            continue
        best = max(h, key=lambda r: float(r["score"]))
        tasks = [k[8:] for k in h[0] if k.startswith("val_auc/")]
        m = _load(os.path.join(root, name, "metrics.json"))
        test = " / ".join(f"{m['test'][t]['auc']:.4f}" for t in tasks) if m else "(running or stopped)"
        rows.append(f"| {name} | {len(h)} | {best['epoch']} | " +
                    " / ".join(f"{float(best['val_auc/' + t]):.4f}" for t in tasks) + f" | {test} |")
    lines = ["# Embedding optimizer runs: status", "",
             "Every run folder under `runs/` (finished or not): epochs done so far, the best epoch by the "
             "validation score, its validation AUCs (income / marital) and, for finished runs, the test AUCs of "
             "the best epoch. `scripts/embedding_optimizers.py status`.", "",
             "| run | epochs done | best epoch | valid AUC (best epoch) | test AUC |", "|---|---|---|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "status.md"), "w") as fh:
        fh.write(text)
    print(text)


def _load(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("sweep", "grid", "table", "status"),
                   help="table: the grid's table from the finished runs; status: every run so far")
    p.add_argument("--out", default=os.path.join(REPO, "results", "embedding-optimizers"))
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each 1 thread)")
    p.add_argument("--only", nargs="*", choices=OPTIMIZERS, help="these optimizers only (grid: no table)")
    p.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS), help="grid: these models")
    p.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS), help="grid: these seeds")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.phase == "sweep":
        sweep(a.out, a.jobs, a.only)
    elif a.phase == "status":
        status(a.out)
    elif a.phase == "table":
        grid(a.out, a.jobs, run=False)
    elif a.only or a.models != list(MODELS) or a.seeds != list(SEEDS):
        todo = grid_runs(a.models, a.only or OPTIMIZERS, a.seeds)
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda x: train(a.out, *x), todo))
    else:
        grid(a.out, a.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
