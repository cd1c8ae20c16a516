"""Shared machinery of the benchmark suite: shapes, providers, timing, memory, environment.

Every ``bench_<op>.py`` builds a :class:`Case` per (provider, mode, batch size) and hands it to
:func:`run_case`, which

* times it through pytest-benchmark's ``pedantic`` (untimed ``setup`` before every round, so a
  backward-only round never times its forward);
* on CUDA also times it with CUDA events around the timed part only (L2 flushed before every
  repetition, as ``triton.testing.do_bench`` does), and reports that median; on CPU the reported
  median is pytest-benchmark's wall-clock median;
* records the peak memory of one round (CUDA: the caching allocator's peak; CPU: the profiler's
  allocation events), the device name, torch / triton / CUDA versions and the dtype in
  ``benchmark.extra_info``, which ``--benchmark-json`` saves and ``benchmarks/report.py`` reads.

Providers: ``eager`` (the pure-PyTorch reference), ``fused`` (ours), ``compile`` (torch.compile of
the reference), ``compile_fused`` (torch.compile of ours); benchmark files may add baselines (the
embedding bag adds ``loop``, one nn.EmbeddingBag per feature). Modes: ``fwd``, ``bwd``, ``fwd+bwd``.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

import dtn_kernels

PROVIDERS = ("eager", "fused", "compile", "compile_fused")
EXTRA_PROVIDERS = ("loop",)  # baselines some files add (the embedding bag's per-feature loop)
MODES = ("fwd", "bwd", "fwd+bwd")

# The paper's shapes: 39 fields of d = 16 (624 inputs), FIM width h = 512, batch 2048 and 4096.
NUM_FIELDS = 39
EMBED_DIM = 16
HIDDEN = 512
PAPER_BATCHES = (2048, 4096)


# ----------------------------------------------------------------------------- configuration

if os.environ.get("DTN_BENCH_THREADS"):  # CPU threads for every provider (default: torch's choice)
    torch.set_num_threads(int(os.environ["DTN_BENCH_THREADS"]))


def bench_device() -> torch.device:
    """``DTN_BENCH_DEVICE`` (cpu / cuda), else CUDA when present."""
    name = os.environ.get("DTN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DTN_BENCH_DEVICE=cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def preset() -> str:
    """``DTN_BENCH_PRESET``: ``full`` (default on CUDA), ``quick`` (default on CPU) or ``smoke``."""
    p = os.environ.get("DTN_BENCH_PRESET") or ("full" if bench_device().type == "cuda" else "quick")
    if p not in ("full", "quick", "smoke"):
        raise ValueError(f"DTN_BENCH_PRESET must be full, quick or smoke, got {p!r}")
    return p


def shape_grid(paper: tuple = PAPER_BATCHES, sweep: tuple = (512, 8192, 16384)) -> list[tuple[int, str]]:
    """(batch, mode) pairs: every mode at the paper's batch sizes, forward + backward over the sweep.

    ``quick`` keeps every mode at the first paper batch and forward + backward at the second;
    ``smoke`` is one tiny forward + backward case (for the suite's own tests).
    """
    p = preset()
    if p == "smoke":
        return subset([(64, "fwd+bwd")], core=[(64, "fwd+bwd")])
    if p == "quick":
        grid = [(paper[0], m) for m in MODES] + [(b, "fwd+bwd") for b in paper[1:]]
    else:
        grid = [(b, m) for b in paper for m in MODES] + [(b, "fwd+bwd") for b in sweep if b not in paper]
    return subset(grid, core=[(paper[0], "fwd+bwd")])


def subset(grid: list, core: list) -> list:
    """``DTN_BENCH_SUBSET=core``: only the headline cases (forward + backward at B = 2048, the DTN
    training step); ``rest``: everything else; unset: all. The GPU script runs core first, so a
    tight time budget still measures what the targets are about."""
    which = os.environ.get("DTN_BENCH_SUBSET", "")
    if which not in ("", "core", "rest"):
        raise ValueError(f"DTN_BENCH_SUBSET must be core or rest, got {which!r}")
    if which == "core":
        return [g for g in grid if g in core]
    if which == "rest":
        return [g for g in grid if g not in core]
    return grid


def provider_list(extra: tuple = ()) -> list[str]:
    """Providers to run: ``DTN_BENCH_PROVIDERS`` (comma-separated) or all of them."""
    names = list(PROVIDERS) + list(extra)
    chosen = os.environ.get("DTN_BENCH_PROVIDERS")
    if not chosen:
        return names
    want = [c.strip() for c in chosen.split(",") if c.strip()]
    unknown = sorted(set(want) - set(PROVIDERS) - set(EXTRA_PROVIDERS))
    if unknown:
        raise ValueError(f"DTN_BENCH_PROVIDERS: unknown provider(s) {unknown}; known: "
                         f"{list(PROVIDERS) + list(EXTRA_PROVIDERS)}")
    return [n for n in names if n in want]


def rounds() -> int:
    p = preset()
    default = {"smoke": 3, "quick": 10, "full": 30}[p]
    return int(os.environ.get("DTN_BENCH_ROUNDS", default))


def triton_skip_reason(device: torch.device) -> Optional[str]:
    """Why the Triton-backed providers cannot be timed here, or None."""
    if device.type != "cuda":
        return ("Triton kernels run on CUDA devices only; on CPU they run through the interpreter, "
                "which is for correctness tests, not timing")
    if not dtn_kernels.HAS_TRITON:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set"
    return None


# ----------------------------------------------------------------------------- environment


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """What a result depends on: device, library versions, dtype, threads."""
    info = {
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).replace("torch.", ""),
        "compiled_ext": dtn_kernels.HAS_C_EXT,
        "cuda_ext": dtn_kernels.HAS_CUDA_EXT,
        "threads": torch.get_num_threads(),
        "preset": preset(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
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


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One timed thing.

    ``forward()`` returns the tensor(s) whose backward is timed; ``params`` are reset to
    ``grad=None`` before every round (as ``zero_grad(set_to_none=True)`` does); ``grad_like``
    maps the forward's output to the upstream gradient (a fixed random tensor by default).
    ``step`` (optional) replaces fwd / bwd entirely, e.g. a whole training step.
    """

    op: str
    provider: str
    mode: str
    batch: int
    forward: Optional[Callable[[], object]] = None
    params: list = field(default_factory=list)
    step: Optional[Callable[[], object]] = None
    shape: str = ""
    _grad: Optional[torch.Tensor] = None

    def _out(self, result):
        return result[0] if isinstance(result, (tuple, list)) else result

    def grad_for(self, out: torch.Tensor) -> torch.Tensor:
        if self._grad is None or self._grad.shape != out.shape:
            g = torch.Generator(device=out.device).manual_seed(0)
            self._grad = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)
        return self._grad

    def zero_grads(self):
        for p in self.params:
            p.grad = None

    def runner(self) -> tuple[Callable[[], object], Callable[[], object]]:
        """(setup, target): setup runs untimed before each round, target is what is timed."""
        if self.step is not None:
            return (lambda: None), self.step
        if self.mode == "fwd":  # a training forward: autograd records the graph, as in fwd+bwd
            return (lambda: None), self.forward
        if self.mode == "fwd+bwd":
            def fwd_bwd():
                self.zero_grads()
                out = self._out(self.forward())
                out.backward(self.grad_for(out))
            return (lambda: None), fwd_bwd
        if self.mode == "bwd":
            state = {}

            def setup():
                self.zero_grads()
                state["out"] = self._out(self.forward())
                self.grad_for(state["out"])

            def bwd():
                out = state.pop("out")
                out.backward(self.grad_for(out))
            return setup, bwd
        raise ValueError(f"unknown mode {self.mode!r}")


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


def cuda_event_times(setup, target, device, reps: int, warmup: int = 5) -> list[float]:
    """Seconds per repetition of ``target`` between CUDA events (setup and L2 flush untimed)."""
    for _ in range(warmup):
        setup()
        target()
    sync(device)
    times = []
    for _ in range(reps):
        setup()
        flush_l2(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def peak_memory(setup, target, device) -> int:
    """Peak bytes allocated above the starting point during one round of ``target``."""
    setup()
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)  # gradients already None (see run_case)
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


def run_case(benchmark, case: Case, device: torch.device, dtype: torch.dtype, request=None,
             rounds_override: Optional[int] = None) -> dict:
    """Time ``case`` (see the module docstring) and record everything in ``benchmark.extra_info``."""
    setup, target = case.runner()
    t0 = time.perf_counter()
    setup()
    target()  # first call: compiles (torch.compile / Triton) outside the timed rounds
    sync(device)
    first_call_s = time.perf_counter() - t0

    def timed():
        target()
        sync(device)  # wall time of the whole GPU work, not of the launches

    n = rounds() if rounds_override is None or os.environ.get("DTN_BENCH_ROUNDS") else rounds_override
    def synced_setup():  # the setup's GPU work (e.g. bwd mode's forward) must not run into the timed part
        setup()
        sync(device)

    benchmark.pedantic(timed, setup=synced_setup, rounds=n, iterations=1, warmup_rounds=1 if n > 3 else 0)
    info = benchmark.extra_info
    info.update(environment(device, dtype))
    info.update({"op": case.op, "provider": case.provider, "mode": case.mode, "batch": case.batch,
                 "shape": case.shape, "first_call_s": round(first_call_s, 3),
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    wall = benchmark.stats.stats
    if device.type == "cuda":
        ev = cuda_event_times(setup, target, device, reps=max(n, 20))
        info.update({"timer": "cuda_event", "median_ms": statistics.median(ev) * 1e3,
                     "min_ms": min(ev) * 1e3, "wall_median_ms": wall.median * 1e3})
    else:
        info.update({"timer": "perf_counter", "median_ms": wall.median * 1e3, "min_ms": wall.min * 1e3})
    def setup_no_grads():  # the last round's gradients must not sit in the baseline of every mode
        case.zero_grads()
        setup()
    info["peak_mem_mb"] = round(peak_memory(setup_no_grads, target, device) / 2**20, 2)
    log_line({"kind": "case", **info})
    if request is not None:
        request.config.__dict__.setdefault("dtn_bench_results", []).append(dict(info))
    return info


def seconds_left() -> float:
    """Seconds until ``DTN_BENCH_DEADLINE`` (a Unix time the suite scripts set), inf without one."""
    deadline = os.environ.get("DTN_BENCH_DEADLINE")
    return float(deadline) - time.time() if deadline else float("inf")


def skip_unless_available(provider: str, device: torch.device, fused_on_cpu: bool = False,
                          compile_s: float = 60.0) -> None:
    """Skip what cannot be timed here (with the reason): Triton-backed providers off CUDA, and
    anything the suite's time budget cannot finish (a compile provider needs ``compile_s`` in
    hand, other cases 10 s)."""
    if seconds_left() < (compile_s if provider.startswith("compile") else 10):
        pytest.skip(f"{provider}: not enough of the suite's time budget (DTN_BENCH_DEADLINE) left")
    if provider in ("fused", "compile_fused") and not fused_on_cpu:
        reason = triton_skip_reason(device)
        if reason:
            pytest.skip(f"{provider}: {reason}")
    if provider in ("compile", "compile_fused") and os.environ.get("DTN_BENCH_NO_COMPILE") == "1":
        pytest.skip(f"{provider}: DTN_BENCH_NO_COMPILE=1")


def compiled(fn, key: tuple, cache: dict):
    """torch.compile(fn, dynamic=False), once per key (op, provider and batch size): every batch
    size gets its own static-shape graph, the strongest baseline torch.compile offers (a default
    compile would reuse a dynamic-shape graph from the second size on). The first call of each
    case, where compilation happens, is untimed."""
    if key not in cache:
        cache[key] = torch.compile(fn, dynamic=False)
    return cache[key]


def log_line(record: dict) -> None:
    """Append ``record`` as one JSON line to ``DTN_BENCH_LOG`` (if set): every finished or skipped
    case is on disk at once, so a run cut short by a timeout keeps what it measured."""
    path = os.environ.get("DTN_BENCH_LOG")
    if not path:
        return
    import json

    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


# ----------------------------------------------------------------------------- module cases

_MODULES: dict = {}
_COMPILED: dict = {}
_INPUTS: dict = {}


def module_case(op: str, provider: str, mode: str, batch: int, build: Callable[[], torch.nn.Module],
                make_inputs: Callable[[int], tuple], shape: str = "") -> Case:
    """A Case for a dtn layer: ``build()`` makes the reference module (fixed seed), the fused
    providers get a copy switched with ``dtn_kernels.set_kernels(..., "fused")`` (same weights),
    the compile providers ``torch.compile`` of either. ``make_inputs(batch)`` returns the forward's
    arguments; the floating ones require grad (they stand for embeddings)."""
    import copy

    key = (op, "fused" if provider in ("fused", "compile_fused") else "reference")
    if key not in _MODULES:
        if (op, "reference") not in _MODULES:
            torch.manual_seed(0)
            _MODULES[(op, "reference")] = build()
        if key[1] == "fused":
            fused = copy.deepcopy(_MODULES[(op, "reference")])
            dtn_kernels.set_kernels(fused, "fused")
            _MODULES[key] = fused
    module = _MODULES[key]
    fn = compiled(module, (op, provider, batch), _COMPILED) if provider.startswith("compile") else module
    if (op, batch) not in _INPUTS:
        torch.manual_seed(1)
        _INPUTS[(op, batch)] = make_inputs(batch)
    inputs = _INPUTS[(op, batch)]
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return Case(op=op, provider=provider, mode=mode, batch=batch, forward=lambda: fn(*inputs),
                params=list(module.parameters()) + grads, shape=shape)
