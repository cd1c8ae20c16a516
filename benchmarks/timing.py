"""Timing: one call (CUDA events with the L2 flushed and the device idle before the start, or the CPU
clock), interleaved rounds of every provider, the first (compiling) call, and peak memory."""
from __future__ import annotations

import os
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH: dict = {}


def flush_l2(device: torch.device) -> None:
    """Overwrite a buffer larger than any GPU's L2 (as triton.testing.do_bench does)."""
    if device.type != "cuda":
        return
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    buf.zero_()


def time_call(setup: Callable, target: Callable, device: torch.device) -> float:
    """Seconds of one ``target()`` call; ``setup()`` runs untimed before it.

    CUDA: the setup's work and an L2 flush finish first, so the device is idle and cold when the
    start event is recorded; the events then count the host's launch gaps inside ``target`` too.
    CPU: wall clock around ``target``, or with ``DTN_BENCH_CPU_CLOCK=process`` the process's CPU time
    (on a machine shared with other work, time spent descheduled is not the provider's).
    """
    setup()
    if device.type == "cuda":
        sync(device)
        flush_l2(device)
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    clock = time.process_time if cpu_clock() == "process" else time.perf_counter
    t0 = clock()
    target()
    return clock() - t0


def cpu_clock() -> str:
    """``DTN_BENCH_CPU_CLOCK``: ``wall`` (default) or ``process`` (CPU time of this process)."""
    clock = os.environ.get("DTN_BENCH_CPU_CLOCK", "wall")
    if clock not in ("wall", "process"):
        raise ValueError(f"DTN_BENCH_CPU_CLOCK must be wall or process, got {clock!r}")
    return clock


def cuda_event_times(setup, target, device, reps: int, warmup: int = 5) -> list[float]:
    """Seconds per repetition of ``target`` (one provider alone; the bandwidth script uses it)."""
    for _ in range(warmup):
        setup()
        target()
    sync(device)
    return [time_call(setup, target, device) for _ in range(reps)]


def round_order(names: list, r: int) -> list:
    """Round ``r``'s provider order: every provider once, the start rotating with ``r``."""
    k = r % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def interleaved_times(runners: dict, device: torch.device, n_rounds: int, first_round: int = 0) -> dict:
    """Seconds per call of every provider over ``n_rounds`` interleaved rounds.

    ``runners`` maps provider -> (setup, target); round r runs them in :func:`round_order` order.
    """
    names = list(runners)
    times: dict = {p: [] for p in names}
    for r in range(first_round, first_round + n_rounds):
        for p in round_order(names, r):
            times[p].append(time_call(*runners[p], device))
    return times


def peak_memory(setup, target, device) -> int:
    """Peak bytes allocated above the starting point during one call of ``target``."""
    setup()
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        target()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        target()
    current = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += ev.self_cpu_memory_usage
        peak = max(peak, current)
    return int(peak)


def warm_up(setup, target, device) -> float:
    """The first call (where torch.compile / Triton compile) plus one more; seconds of the first."""
    t0 = time.perf_counter()
    setup()
    target()
    sync(device)
    first = time.perf_counter() - t0
    setup()
    target()
    sync(device)
    return first
