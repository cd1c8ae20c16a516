"""What a result records and where it goes: the environment it was measured in, one record per
provider, and the ``DTN_BENCH_LOG`` JSON lines (cases, skips, errors) that survive a run cut short."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Optional

import torch

import dtn_kernels
from precision_policy import tf32_allowed
from suite_settings import preset
from timing import cpu_clock


def environment(device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """What a result depends on: device, library versions, dtype, threads, commit."""
    info = {
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).replace("torch.", ""),
        "compiled_ext": dtn_kernels.HAS_C_EXT,
        "cuda_ext": dtn_kernels.HAS_CUDA_EXT,
        "threads": torch.get_num_threads(),
        "preset": preset(),
        "commit": os.environ.get("DTN_COMMIT") or None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32"] = tf32_allowed()
    else:
        info["device"] = cpu_name()
        info["cuda"] = None
    return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model} ({os.cpu_count()} cores)"


SKIPPED: list = []  # provider-level skips of this session (benchmarks/conftest.py adds whole-test skips)


def log_line(record: dict) -> None:
    """Append ``record`` as one JSON line to ``DTN_BENCH_LOG`` (if set): every finished or skipped
    case is on disk at once, so a run cut short by a timeout keeps what it measured."""
    path = os.environ.get("DTN_BENCH_LOG")
    if not path:
        return
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def record_skip(test: str, group: dict, provider: str, reason: str, **extra) -> None:
    """A provider the group left out, with the reason (kept for the report and logged)."""
    rec = {"test": test, **group, "provider": provider, "reason": f"{provider}: {reason}", **extra}
    SKIPPED.append(rec)
    log_line({"kind": "skipped", **rec})


def record_errors(test: str, key: dict, errors: dict, numerics: Optional[dict] = None) -> None:
    """Providers that failed (an exception, or the numerics gate), kept for the report and logged."""
    for p, e in errors.items():
        rec = {"test": test, **key, "provider": p, "reason": f"{p} failed: {e}", "error": True}
        if numerics and p in numerics:  # the report shows FAILED in the provider's cell
            rec["numerics"], rec["numerics_detail"] = "FAILED", numerics[p]
        SKIPPED.append(rec)
        log_line({"kind": "error", **rec})


def case_records(group: dict, cases: dict, times: dict, first_call: dict, device: torch.device, base: dict,
                 final: bool, memory: dict, numerics: Optional[dict] = None) -> list[dict]:
    """One record per timed provider of a group: median, min, IQR over its rounds, what it was
    interleaved with, its first call, memory, compile and numerics verdicts, and the environment."""
    out = []
    for p, ts in times.items():
        c = cases[p]
        ms = sorted(t * 1e3 for t in ts)
        quartiles = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0], ms[0], ms[0]]
        q1, q3 = quartiles[0], quartiles[2]
        rec = {**base, **group, "provider": p, "shape": c.shape, "median_ms": statistics.median(ms),
               "min_ms": ms[0], "iqr_ms": q3 - q1, "rounds": len(ms), "interleaved_with": list(times),
               "first_call_s": round(first_call.get(p, float("nan")), 3), "final": final,
               "timer": "cuda_event" if device.type == "cuda" else ("process_time" if cpu_clock() == "process" else "perf_counter"),
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if p in memory:
            rec["peak_mem_mb"] = memory[p]
        if c.compiled is not None and c.compiled.info:
            rec["compile"] = dict(c.compiled.info)
        verdict = (numerics or {}).get(p)
        if verdict is not None:
            rec["numerics"], rec["numerics_detail"] = verdict["status"], verdict
        out.append(rec)
    return out
