"""Training step time with and without mixed precision, interleaved so both see the same machine load.

The cpu-config DTN's ``Trainer.train_step`` (forward, loss, backward, Adam) on the first STEPS
shuffled Census-Income training batches, one Trainer per ``train.amp`` mode (same seed, same
initial weights). Each round times STEPS steps of every mode, the order alternating between
rounds; the median over the rounds is the step time. On a machine shared with other jobs the
median of interleaved rounds is what can be compared, not two runs taken at different times.

    DTN_CENSUS_DIR=/path/to/census-income python scripts/amp_step_time.py --threads 1 --rounds 6 --steps 10
    python scripts/amp_step_time.py --device cuda --modes off,bf16,fp16
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from dtn.config import load_config
from dtn.data import load_dataset
from dtn.models import build_model
from dtn.train.trainer import Trainer, _EpochStats, batch_to_device, seed_everything


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--modes", default="off,bf16", help="train.amp values, comma-separated [off,bf16]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    data = load_dataset(cfg.data, progress=False)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    host = list(data.train.batches(cfg.train.batch_size, shuffle=True, generator=gen))[:args.steps]
    batches = [(batch_to_device(b, device), y.to(device)) for b, y in host]
    trainers = {}
    for amp in args.modes.split(","):
        seed_everything(cfg.train.seed)
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp=amp, num_threads=args.threads,
                                                               device=args.device))
        trainers[amp] = Trainer(build_model("dtn", data.schema, c.model, device=args.device), c)
        stats = _EpochStats(device, data.schema.num_tasks)
        for i, (b, y) in enumerate(batches[:2]):  # warm-up: allocations, optimizer state
            trainers[amp].train_step(b, y, i, stats)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for r in range(args.rounds):
        order = list(trainers.items())
        for amp, trainer in (order if r % 2 == 0 else order[::-1]):
            stats = _EpochStats(device, data.schema.num_tasks)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i, (b, y) in enumerate(batches):
                trainer.train_step(b, y, i, stats)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[amp].append((time.perf_counter() - t0) * 1000 / len(batches))
            print(f"round {r} {amp:>4}: {times[amp][-1]:8.1f} ms/step  (load average {_load()})", flush=True)
    cpu = os.cpu_count()
    print(f"\n{args.device}, {args.threads} thread(s) of {cpu} CPUs, torch {torch.__version__}, batch {cfg.train.batch_size}")
    for amp, t in times.items():
        print(f"{amp:>4}: median {statistics.median(t):.1f} ms/step (min {min(t):.1f}, max {max(t):.1f}) over "
              f"{args.rounds} rounds of {len(batches)} steps")


if __name__ == "__main__":
    main()
