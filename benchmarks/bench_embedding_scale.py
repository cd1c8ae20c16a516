"""The training step against the vocabulary: MMoE and DTN with 26 categorical features of
{10^3, 10^5, 10^6} rows each, per embedding optimizer (``train.embedding_optimizer``).

Setup: the ``cpu`` config with ``model.embed_dim = 16``, 26 categorical features (no numeric
ones), two tasks, B = 2048, ids uniform over each table (seeded); four pre-drawn batches are
cycled so that consecutive steps touch different rows. One step is ``Trainer.train_step``: zero_grad,
forward, the loss, backward (with a fused optimizer: its update on the touched rows), the dense Adam
step. 1 thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), float32.

Each (model, rows, optimizer) runs in a subprocess of its own (its memory is its own). **Memory**
is resident memory (RSS, /proc/self/status), in two readings:

* *warm* (the acceptance reading): the process first pays what every training process pays once,
  whatever its tables: the imports, the library code the first steps page in, the first batches'
  caches -- by building the same model and trainer with 8-row tables and taking ``--warmup`` steps;
  it then frees them (``gc`` + ``malloc_trim``), reads its RSS and resets its peak (``VmHWM``, via
  ``/proc/self/clear_refs``), builds the real model and trainer and steps. Memory = peak RSS minus that
  RSS: the weights, the optimizer state, the dense layers and their Adam state, the gradients and
  every transient of building and stepping.
* *cold*: peak RSS (``getrusage`` ru_maxrss) minus the RSS after the imports and the batches, before
  any model was built (the earlier reading; it also counts about 90 MB of library code and 80 MB of
  lazily imported modules that are no table's cost).

Both are reported next to the bytes of the embedding weights alone (26 x rows x 16 x 4 bytes) and as a
ratio to them.

**Step time**: ``--rounds`` rounds; every round runs every configuration once, in the same order
(so the configurations alternate in time); the step time of a configuration is the median of its
timed steps over all rounds: wall time, and the process's CPU time (``time.process_time``; with one
thread, the time the step computed, which a machine shared with other jobs inflates less than the
wall time).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_embedding_scale.py --out benchmarks/results/embedding_scale_cpu.md

``--rows 1000 100000`` / ``--models mmoe`` / ``--optimizers ...`` select a part of the grid.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = 26
EMBED_DIM = 16
BATCH = 2048
N_BATCHES = 4
OPTIMIZERS = ("adam", "sgd", "rowwise_adagrad", "lazy_adam")
ROWS = (1_000, 100_000, 1_000_000)
MODELS = ("mmoe", "dtn")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The peak RSS since the process started or since ``reset_peak_rss`` (``VmHWM``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def release_freed_memory() -> None:
    """Collect garbage and hand freed memory back to the system (glibc's heap and, when the trainer runs
    it, the caching CPU allocator's free blocks), so that RSS is what is alive."""
    import ctypes
    import gc

    gc.collect()
    from dtn_kernels import cpu_allocator

    if cpu_allocator.enabled():
        cpu_allocator.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then keep freed blocks (the reading errs high)
        pass


def one(model_name: str, rows: int, optimizer: str, warmup: int, steps_n: int, allocator: str = "caching") -> dict:
    """One configuration, in this process: step times (s) and memory (bytes)."""
    import resource
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the twin's fallback warning
    torch.set_num_threads(1)
    sys.path.insert(0, REPO)
    from dtn.config import load_config
    from dtn.features import FeatureBatch, FeatureSpec, Schema
    from dtn.models import build_model
    from dtn.train import Trainer
    from dtn.train.trainer import _EpochStats

    schema = Schema([FeatureSpec(f"c{i}", cardinality=rows) for i in range(FEATURES)], labels=["t1", "t2"])
    gen = torch.Generator().manual_seed(0)
    batches = [(FeatureBatch(torch.randint(0, rows, (BATCH, FEATURES), generator=gen), torch.zeros(BATCH, 0)),
                torch.randint(0, 2, (BATCH, 2), generator=gen).float()) for _ in range(N_BATCHES)]
    cfg = load_config("cpu")
    cfg = cfg.replace(model=cfg.model.__class__(**{**cfg.model.__dict__, "embed_dim": EMBED_DIM}),
                      train=cfg.train.__class__(**{**cfg.train.__dict__, "embedding_optimizer": optimizer,
                                                   "cpu_allocator": allocator, "num_threads": 1, "progress": False}))
    base = rss_bytes()

    def steps(model, trainer, n, rows_cap=None, timed=None):
        stats = _EpochStats(trainer.device, 2)
        for i in range(n):
            batch, labels = batches[i % N_BATCHES]
            if rows_cap is not None:
                batch = FeatureBatch(batch.categorical % rows_cap, batch.numeric)
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step(batch, labels, i, stats)
            if timed is not None:
                timed[0].append(time.perf_counter() - t0)
                timed[1].append(time.process_time() - c0)
        stats.read()  # the losses were finite

    # warm-up: what every process pays once, whatever its tables (see the module docstring)
    tiny = Schema([FeatureSpec(f"c{i}", cardinality=8) for i in range(FEATURES)], labels=["t1", "t2"])
    torch.manual_seed(0)
    model = build_model(model_name, tiny, cfg.model)
    steps(model, Trainer(model, cfg), warmup, rows_cap=8)
    del model
    release_freed_memory()
    warm = rss_bytes()
    reset_peak_rss()

    torch.manual_seed(0)
    model = build_model(model_name, schema, cfg.model)
    trainer = Trainer(model, cfg)
    built = rss_bytes()
    times, cpu = [], []
    steps(model, trainer, warmup + steps_n, timed=(times, cpu))
    peak_warm = peak_rss_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weight_bytes = model.input_layer.weight.numel() * model.input_layer.weight.element_size()
    return {"torch": torch.__version__, "times": times[warmup:], "cpu_times": cpu[warmup:], "base": base, "warm": warm, "built": built, "peak": peak,
            "peak_warm": peak_warm, "weight_bytes": weight_bytes}


def run_one(args, model: str, rows: int, opt: str, allocator: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, os.path.abspath(__file__), "--one", model, str(rows), opt, "--cpu-allocators", allocator,
           "--warmup", str(args.warmup), "--steps", str(args.steps if rows < 10**6 or opt != "adam" else args.slow_steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. killed for memory (-9) on a machine shared with other jobs: recorded, skipped
        print(f"{' '.join(cmd[2:])} failed (exit {proc.returncode}): {proc.stderr[-500:]}", file=sys.stderr, flush=True)
        return {"failed": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=3, metavar=("MODEL", "ROWS", "OPTIMIZER"), help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--rows", nargs="+", type=int, default=list(ROWS))
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--cpu-allocators", nargs="+", default=["caching"], choices=("caching", "system"),
                   help="train.cpu_allocator: the trainer's caching CPU allocator (its default) and/or torch's own")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    p.add_argument("--slow-steps", type=int, default=2, help="timed steps of dense adam at 10^6 rows (seconds each)")
    p.add_argument("--adam-max-rows", type=int, help="leave out dense adam above this many rows per feature (its "
                   "weights, gradient and moments: 4x the weights' memory)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.one[2], args.warmup, args.steps, args.cpu_allocators[0])))
        return 0
    grid = [(m, r, o, a) for m in args.models for r in args.rows for o in args.optimizers for a in args.cpu_allocators
            if not (o == "adam" and args.adam_max_rows is not None and r > args.adam_max_rows)]
    results = {g: [] for g in grid}
    for rnd in range(args.rounds):
        for g in grid:
            res = run_one(args, *g)
            if "failed" in res:
                continue
            results[g].append(res)
            print(f"round {rnd + 1} {g}: median {1e3 * statistics.median(res['times']):.1f} ms, "
                  f"memory {_mb(res['peak_warm'] - res['warm'])} MB warm, {_mb(res['peak'] - res['base'])} MB cold "
                  f"(weights {_mb(res['weight_bytes'])} MB)", flush=True)
    version = next((r[0]["torch"] for r in results.values() if r), "?")
    lines = [f"# Training step against the vocabulary ({platform.processor() or platform.machine()}, torch "
             f"{version}, 1 thread)", "",
             f"`benchmarks/bench_embedding_scale.py` (its docstring: what is measured). {FEATURES} categorical "
             f"features x rows each, d = {EMBED_DIM}, B = {BATCH}; step = median over {args.rounds} interleaved rounds "
             f"of {args.steps} timed steps ({args.slow_steps} for dense adam at 10^6 rows). Memory (max over rounds), "
             "against the embedding weights' bytes: *warm* = peak RSS minus the RSS of the warmed process (the "
             "acceptance reading); *cold* = peak RSS minus the RSS before any model was built (it also counts "
             "library code and lazy imports).", "",
             "| model | rows per feature | embedding optimizer | CPU allocator | step wall (ms) | vs 10^3 rows | step CPU (ms) | "
             "vs 10^3 rows | weights (MB) | memory warm (MB) | warm / weights | memory cold (MB) | cold / weights |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failed = [g for g in grid if not results[g]]
    grid = [g for g in grid if results[g]]
    med = {g: statistics.median([t for r in results[g] for t in r["times"]]) for g in grid}
    cpu = {g: statistics.median([t for r in results[g] for t in r["cpu_times"]]) for g in grid}
    for g in grid:
        m, rows, opt, alloc = g
        warm = max(r["peak_warm"] - r["warm"] for r in results[g])
        cold = max(r["peak"] - r["base"] for r in results[g])
        wb = results[g][0]["weight_bytes"]
        small = (m, min(args.rows), opt, alloc)
        rel = f"{med[g] / med[small]:.2f}x" if small in med else ""
        rel_cpu = f"{cpu[g] / cpu[small]:.2f}x" if small in cpu else ""
        lines.append(f"| {m} | {rows:,} | {opt} | {alloc} | {1e3 * med[g]:,.1f} | {rel} | {1e3 * cpu[g]:,.1f} | {rel_cpu} | "
                     f"{_mb(wb)} | {_mb(warm)} | {warm / wb:.3f} | {_mb(cold)} | {cold / wb:.3f} |")
    if failed:
        lines += ["", "Failed in every round (e.g. killed for memory): " + ", ".join(f"{m} {r:,} {o} {a}" for m, r, o, a in failed)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
