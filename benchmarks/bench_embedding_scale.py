"""The training step against the vocabulary: MMoE and DTN with 26 categorical features of
{10^3, 10^5, 10^6} rows each, per embedding optimizer (``train.embedding_optimizer``).

Setup: the ``cpu`` config with ``model.embed_dim = 16``, 26 categorical features (no numeric
ones), two tasks, B = 2048, ids uniform over each table (seeded); four pre-drawn batches are
cycled so that consecutive steps touch different rows. One step is ``Trainer.train_step``: zero_grad,
forward, the loss, backward (with a fused optimizer: its update on the touched rows), the dense Adam
step. 1 thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), float32.

Each (model, rows, optimizer) runs in a subprocess of its own (its memory is its own): it reads
its resident set size (RSS, /proc/self/statm) after the imports and the batches are built, builds
the model and the trainer, takes ``--warmup`` steps and then ``--steps`` timed steps, and reports
the step times and its peak RSS (``getrusage`` ru_maxrss). **Memory** = peak RSS minus the RSS
before the model was built: the weights, the optimizer state, the gradients and every transient
of building and stepping; it is reported next to the bytes of the embedding weights alone
(26 x rows x 16 x 4 bytes) and as a ratio to them. The last column keeps only what grows with the
vocabulary: (memory - the memory of the same model and optimizer at 10^3 rows + the 10^3-row weights)
/ weights; the part it removes (the dense layers, their Adam state, activations and the allocator's
cache at B = 2048, about 220 MB for MMoE) does not depend on the tables.

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


def one(model_name: str, rows: int, optimizer: str, warmup: int, steps: int) -> dict:
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
                                                   "num_threads": 1, "progress": False}))
    base = rss_bytes()
    torch.manual_seed(0)
    model = build_model(model_name, schema, cfg.model)
    trainer = Trainer(model, cfg)
    built = rss_bytes()
    stats = _EpochStats(trainer.device, 2)
    times, cpu = [], []
    for i in range(warmup + steps):
        batch, labels = batches[i % N_BATCHES]
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(batch, labels, i, stats)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats.read()  # the losses were finite
    weight_bytes = model.input_layer.weight.numel() * model.input_layer.weight.element_size()
    return {"torch": torch.__version__, "times": times[warmup:], "cpu_times": cpu[warmup:], "base": base, "built": built, "peak": peak, "weight_bytes": weight_bytes}


def run_one(args, model: str, rows: int, opt: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, os.path.abspath(__file__), "--one", model, str(rows), opt,
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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    p.add_argument("--slow-steps", type=int, default=2, help="timed steps of dense adam at 10^6 rows (seconds each)")
    p.add_argument("--adam-max-rows", type=int, help="leave out dense adam above this many rows per feature (its "
                   "weights, gradient and moments: 4x the weights' memory)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.one[2], args.warmup, args.steps)))
        return 0
    grid = [(m, r, o) for m in args.models for r in args.rows for o in args.optimizers
            if not (o == "adam" and args.adam_max_rows is not None and r > args.adam_max_rows)]
    results = {g: [] for g in grid}
    for rnd in range(args.rounds):
        for g in grid:
            res = run_one(args, *g)
            if "failed" in res:
                continue
            results[g].append(res)
            print(f"round {rnd + 1} {g}: median {1e3 * statistics.median(res['times']):.1f} ms, "
                  f"memory {_mb(res['peak'] - res['base'])} MB (weights {_mb(res['weight_bytes'])} MB)", flush=True)
    version = next((r[0]["torch"] for r in results.values() if r), "?")
    lines = [f"# Training step against the vocabulary ({platform.processor() or platform.machine()}, torch "
             f"{version}, 1 thread)", "",
             f"`benchmarks/bench_embedding_scale.py` (its docstring: what is measured). {FEATURES} categorical "
             f"features x rows each, d = {EMBED_DIM}, B = {BATCH}; step = median over {args.rounds} interleaved rounds "
             f"of {args.steps} timed steps ({args.slow_steps} for dense adam at 10^6 rows); memory = peak RSS minus "
             "RSS before the model was built (max over rounds), and its ratio to the embedding weights' bytes.", "",
             "| model | rows per feature | embedding optimizer | step wall (ms) | vs 10^3 rows | step CPU (ms) | "
             "vs 10^3 rows | memory (MB) | weights (MB) | memory / weights | (memory - memory at 10^3) / weights |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    failed = [g for g in grid if not results[g]]
    grid = [g for g in grid if results[g]]
    med = {g: statistics.median([t for r in results[g] for t in r["times"]]) for g in grid}
    cpu = {g: statistics.median([t for r in results[g] for t in r["cpu_times"]]) for g in grid}
    for g in grid:
        m, rows, opt = g
        mem = max(r["peak"] - r["base"] for r in results[g])
        wb = results[g][0]["weight_bytes"]
        small = (m, min(args.rows), opt)
        rel = f"{med[g] / med[small]:.2f}x" if small in med else ""
        rel_cpu = f"{cpu[g] / cpu[small]:.2f}x" if small in cpu else ""
        # what grows with the vocabulary: the memory beyond the 10^3-row run's (whose weights are kilobytes)
        mem_small = max(r["peak"] - r["base"] for r in results[small]) if small in results else None
        grow = "" if mem_small is None or small == g else \
            f"{(mem - mem_small + results[small][0]['weight_bytes']) / wb:.2f}"
        lines.append(f"| {m} | {rows:,} | {opt} | {1e3 * med[g]:,.1f} | {rel} | {1e3 * cpu[g]:,.1f} | {rel_cpu} | "
                     f"{_mb(mem)} | {_mb(wb)} | {mem / wb:.2f} | {grow} |")
    if failed:
        lines += ["", "Failed in every round (e.g. killed for memory): " + ", ".join(f"{m} {r:,} {o}" for m, r, o in failed)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
