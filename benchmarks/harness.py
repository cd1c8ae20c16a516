"""Shared machinery of the benchmark suite: shapes, providers, precision policy, interleaved timing.

A benchmark file defines one pytest test per **group** -- (op, mode, batch, precision) -- and hands
:func:`run_group` a ``make_case(provider)`` callback. ``run_group``

* builds a :class:`Case` per provider (``eager``, ``fused``, ``compile``, ``compile_fused``, plus
  any baselines the file adds, e.g. the embedding bag's ``loop``) and records why any provider is
  left out (Triton off CUDA, torch.compile over the time budget, ...);
* runs every provider's first call untimed (compilation; a compile's first call under a hard
  limit, see :func:`compile_limit_s`), then compares every provider's forward output and gradients
  with the eager reference's once (:class:`NumericsGate`, per-precision tolerances in
  :data:`TOLERANCES`): a mismatch is FAILED -- its records say so, the test fails, the report shows
  no time and no speed-up for it (its median stays in the log, to judge the verdict) -- then times
  the providers in
  **interleaved rounds**: round r runs every provider once, in turn, the starting provider rotating
  with r, so each provider runs after the others have churned the caches and none owns a position.
  The reported median of a provider is over its rounds; ratios come from those medians. On CUDA each
  call is timed with CUDA events, the L2 flushed and the device idle before the start event (so the
  host's launch gaps are counted); on CPU with ``time.perf_counter``;
* drives the rounds through pytest-benchmark's ``pedantic`` (its statistics are those of a whole
  round), and stores every provider's result in ``benchmark.extra_info["cases"]`` and, line by
  line, in the ``DTN_BENCH_LOG`` JSONL file, which survives a run cut short. Groups with compile
  providers first log an eager/fused-only interleaved result (``final: false``), so a compile that
  runs into the stage's timeout still leaves the group's other providers measured.

Precision (the ``precision`` dimension, recorded in every result):

* ``fp32``: fp32 modules and inputs under torch's float32 matmul policy. On CUDA the harness sets
  ``torch.set_float32_matmul_precision(DTN_BENCH_FP32_MATMUL)`` (default ``"high"``: TF32 for eager,
  compile and fused alike); on CPU it leaves torch's policy alone. The policy in force is recorded.
* ``bf16``: the same fp32 modules and inputs, the forward (and loss) under
  ``torch.autocast(device, dtype=torch.bfloat16)``; the backward and optimizer outside it.
  On CPU bf16 runs in the ``smoke`` preset or when ``DTN_BENCH_PRECISIONS`` names it; otherwise
  its groups are skipped with that reason (it would double the CPU suite past its budget, and the
  project's bf16 targets are GPU targets).

Modes: ``fwd`` (a training forward: autograd records), ``bwd`` (the forward runs untimed before
every timed backward), ``fwd+bwd``; whole models add ``train`` and ``infer``.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import pytest
import torch

import dtn_kernels
from numerics_gate import REFERENCE_PROVIDER, TOLERANCES, NumericsGate, compare_outputs, numerics_reason, tolerance  # noqa: F401

PROVIDERS = ("eager", "fused", "compile", "compile_fused", "fused_graph")
# providers some files add: the embedding bag's per-feature loop; the fused ops with their GEMMs forced
# onto cuBLAS (DTN_FUSED_GEMM=torch: the route A/B that decides where each GEMM runs); whole models in
# grouped mode (dtn_kernels.set_kernels(model, "grouped")) and compiled so; *_graph: the fused / grouped
# call captured whole in one CUDA graph (graph_case)
EXTRA_PROVIDERS = ("loop", "fused_cublas", "grouped", "compile_grouped", "grouped_graph")
FUSED_PROVIDERS = ("fused", "compile_fused", "fused_cublas", "grouped", "compile_grouped", "fused_graph",
                   "grouped_graph")  # need Triton
MODES = ("fwd", "bwd", "fwd+bwd")
PRECISIONS = ("bf16", "fp32")  # also the run order on GPU: bf16 autocast is the headline case
FP32_MATMUL_POLICIES = ("highest", "high", "medium")

# The paper's shapes: 39 fields of d = 16 (624 inputs), FIM width h = 512, batch 2048 and 4096.
NUM_FIELDS = 39
EMBED_DIM = 16
HIDDEN = 512
PAPER_BATCHES = (2048, 4096)
SMOKE_BATCH = 64

# Compile estimates (seconds) before any compile was seen in this process; afterwards 1.5x the
# slowest compile seen for that kind (op / model). A compile provider starts only if the estimate
# fits in what is left of DTN_BENCH_DEADLINE.
DEFAULT_COMPILE_S = {"op": 45.0, "model": 120.0}
# Hard limit (seconds) on one compile provider's first call (compilation): over it, the compile is
# interrupted, recorded as overrun, and no later group compiles that kind again (not retried).
# DTN_BENCH_COMPILE_LIMIT_S / DTN_BENCH_MODEL_COMPILE_LIMIT_S override.
COMPILE_LIMIT_S = {"op": 60.0, "model": 90.0}
MIN_GROUP_S = 10.0  # a group needs at least this much of the budget to start


# ----------------------------------------------------------------------------- configuration

if os.environ.get("DTN_BENCH_THREADS"):  # CPU threads for every provider (default: torch's choice)
    torch.set_num_threads(int(os.environ["DTN_BENCH_THREADS"]))

def fp32_matmul_policy() -> str:
    """``DTN_BENCH_FP32_MATMUL`` (torch's float32 matmul precision on CUDA), default ``high``."""
    policy = os.environ.get("DTN_BENCH_FP32_MATMUL", "high")
    if policy not in FP32_MATMUL_POLICIES:
        raise ValueError(f"DTN_BENCH_FP32_MATMUL must be one of {FP32_MATMUL_POLICIES}, got {policy!r}")
    return policy


def bench_device() -> torch.device:
    """``DTN_BENCH_DEVICE`` (cpu / cuda), else CUDA when present. On CUDA the fp32 matmul policy
    is set here, once, for every provider alike."""
    name = os.environ.get("DTN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DTN_BENCH_DEVICE=cuda but torch.cuda.is_available() is False")
    device = torch.device(name)
    if device.type == "cuda":
        torch.set_float32_matmul_precision(fp32_matmul_policy())
    return device


def preset() -> str:
    """``DTN_BENCH_PRESET``: ``full`` (default on CUDA), ``quick`` (default on CPU) or ``smoke``."""
    p = os.environ.get("DTN_BENCH_PRESET") or ("full" if bench_device().type == "cuda" else "quick")
    if p not in ("full", "quick", "smoke"):
        raise ValueError(f"DTN_BENCH_PRESET must be full, quick or smoke, got {p!r}")
    return p


def precisions() -> list[str]:
    """``DTN_BENCH_PRECISIONS`` (comma-separated, in run order), default bf16 then fp32."""
    chosen = os.environ.get("DTN_BENCH_PRECISIONS")
    if not chosen:
        return list(PRECISIONS)
    want = [c.strip() for c in chosen.split(",") if c.strip()]
    unknown = sorted(set(want) - set(PRECISIONS))
    if unknown or not want:
        raise ValueError(f"DTN_BENCH_PRECISIONS: unknown precision(s) {unknown or want}; known: {list(PRECISIONS)}")
    return want


def precision_skip_reason(precision: str, device: torch.device) -> Optional[str]:
    """Why a precision is not timed here (bf16 on CPU outside the smoke preset unless asked for)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {list(PRECISIONS)}")
    if precision == "bf16" and device.type == "cpu" and preset() != "smoke" \
            and "bf16" not in (os.environ.get("DTN_BENCH_PRECISIONS") or ""):
        return ("bf16 on CPU is opt-in (DTN_BENCH_PRECISIONS=fp32,bf16): it would double the CPU suite "
                "past its budget, and the bf16 targets are GPU targets")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this CUDA device does not support bf16"
    return None


def autocast(precision: str, device: torch.device, cache_enabled: bool = True):
    """The context the timed forward runs in: bf16 autocast, or nothing for fp32. A step captured in
    a CUDA graph runs it with ``cache_enabled=False`` (torch's notes on autocast and graphs)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision {precision!r}; known: {list(PRECISIONS)}")


def precision_record(precision: str, device: torch.device) -> dict:
    """The precision policy a result was measured under.

    ``roofline_precision`` is the name ``benchmarks/roofline.py`` takes: ``bf16``, ``fp32-tf32``
    (CUDA, policy high) or ``fp32-ieee`` (policy highest, or CPU); ``medium`` lets fp32 matmuls use
    bf16 internally, which the roofline has no entry for.
    """
    policy = torch.get_float32_matmul_precision()
    if precision == "bf16":
        roof = "bf16"
    elif device.type != "cuda" or policy == "highest":
        roof = "fp32-ieee"
    else:
        roof = "fp32-tf32" if policy == "high" else f"fp32-{policy}"
    return {"precision": precision, "fp32_matmul": policy,
            "autocast": f"{device.type}/bfloat16" if precision == "bf16" else None, "roofline_precision": roof}


def _shapes(paper: tuple, sweep: tuple) -> list[tuple[int, str]]:
    p = preset()
    if p == "smoke":
        return [(SMOKE_BATCH, "fwd+bwd")]
    if p == "quick":
        return [(paper[0], m) for m in MODES] + [(b, "fwd+bwd") for b in paper[1:]]
    return [(b, m) for b in paper for m in MODES] + [(b, "fwd+bwd") for b in sweep if b not in paper]


def group_grid(paper: tuple = PAPER_BATCHES, sweep: tuple = (512, 8192, 16384)) -> list[tuple[int, str, str]]:
    """(batch, mode, precision) groups: every mode at the paper's batch sizes, forward + backward
    over the sweep, each in every precision.

    ``quick`` keeps every mode at the first paper batch and forward + backward at the second;
    ``smoke`` is one tiny forward + backward group per precision (for the suite's own checks; its
    core is the first precision, so a check run exercises both the core and the rest stage).
    Core (``DTN_BENCH_SUBSET=core``): forward + backward at the first paper batch, every precision.
    """
    precs = precisions()
    grid = [(b, m, p) for b, m in _shapes(paper, sweep) for p in precs]
    if preset() == "smoke":
        return subset(grid, core=[(SMOKE_BATCH, "fwd+bwd", precs[0])])
    return subset(grid, core=[(paper[0], "fwd+bwd", p) for p in precs])


def shape_grid(paper: tuple = PAPER_BATCHES, sweep: tuple = (512, 8192, 16384)) -> list[tuple[int, str]]:
    """(batch, mode) pairs without the precision dimension (files still on :func:`run_case`)."""
    core = [(SMOKE_BATCH if preset() == "smoke" else paper[0], "fwd+bwd")]
    return subset(_shapes(paper, sweep), core=core)


def subset(grid: list, core: list, headline: list = ()) -> list:
    """``DTN_BENCH_SUBSET``: ``headline`` (the DTN training step at the paper's batch sizes in every
    precision; only bench_model.py has such groups), ``core`` (every op's forward + backward at
    B = 2048 in every precision), ``rest`` (everything else); unset: all. The GPU suite runs them in
    that order, so a tight time budget still measures what the targets are about."""
    which = os.environ.get("DTN_BENCH_SUBSET", "")
    if which not in ("", "headline", "core", "rest"):
        raise ValueError(f"DTN_BENCH_SUBSET must be headline, core or rest, got {which!r}")
    if which == "headline":
        return [g for g in grid if g in headline]
    if which == "core":
        return [g for g in grid if g in core and g not in headline]
    if which == "rest":
        return [g for g in grid if g not in core and g not in headline]
    return grid


def priority(params: dict, model: bool = False) -> tuple:
    """Run-order key of a group (benchmarks/conftest.py sorts the collected tests by it, stably):
    paper batch sizes before the sweep, ops before whole models, then precision in
    :func:`precisions` order; file order otherwise. So the core stage measures every op in bf16,
    then in fp32, then the DTN step in bf16 and fp32: a whole-model compile, the slowest and least
    predictable step, comes last, where a timeout cuts off the least."""
    batch = params.get("batch")
    paper = batch is None or batch in PAPER_BATCHES or batch == SMOKE_BATCH
    precs = precisions()
    prec = params.get("precision")
    return (0 if paper else 1, 1 if model else 0, precs.index(prec) if prec in precs else len(precs))


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


def rounds(override: Optional[int] = None) -> int:
    """Timed rounds a group gets: ``DTN_BENCH_ROUNDS``, else ``override`` (a file's own count), else
    the preset's default."""
    if override is not None and not os.environ.get("DTN_BENCH_ROUNDS"):
        return override
    default = {"smoke": 3, "quick": 10, "full": 30}[preset()]
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


def provider_skip_reason(provider: str, device: torch.device, op: str = "",
                         fused_on_cpu: Union[bool, tuple] = False) -> Optional[str]:
    """Why ``provider`` is not timed for ``op`` here, or None. ``fused_on_cpu``: True (or the
    providers it names) when the fused provider has a CPU kernel (the C++ embedding bag)."""
    if provider.endswith(GRAPH_SUFFIX) and device.type != "cuda":
        return "CUDA graphs need a CUDA device (torch.cuda.CUDAGraph)"
    on_cpu = fused_on_cpu if isinstance(fused_on_cpu, bool) else provider in fused_on_cpu
    if provider in FUSED_PROVIDERS and not on_cpu:
        reason = triton_skip_reason(device)
        if reason:
            return reason
    if provider.startswith("compile"):
        if os.environ.get("DTN_BENCH_NO_COMPILE") == "1":
            return "DTN_BENCH_NO_COMPILE=1"
        only = os.environ.get("DTN_BENCH_COMPILE_OPS")
        if only and op not in [o.strip() for o in only.split(",")]:
            return f"DTN_BENCH_COMPILE_OPS={only} leaves {op} out"
    return None


class SkipProvider(Exception):
    """Raised by a ``make_case`` callback: this provider cannot run here (the message says why)."""


# ----------------------------------------------------------------------------- environment


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


def tf32_allowed() -> Optional[bool]:
    """Whether fp32 matmuls may use TF32 on CUDA, read as ``dtn_kernels/triton/_dispatch.py`` reads
    it: torch >= 2.9's ``fp32_precision`` first; the legacy ``allow_tf32`` raises RuntimeError when
    the two APIs were mixed, and then the global float32 matmul precision answers."""
    matmul = torch.backends.cuda.matmul
    new = getattr(matmul, "fp32_precision", None)
    if new in ("tf32", "ieee"):
        return new == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return torch.get_float32_matmul_precision() != "highest"


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

    ``forward()`` returns the tensor(s) whose backward is timed; it runs under the precision's
    autocast. ``params`` are reset to ``grad=None`` before every call (as
    ``zero_grad(set_to_none=True)`` does). ``step`` (optional) replaces fwd / bwd entirely, e.g. a
    whole training step, and applies the precision itself (see :func:`autocast`).
    """

    op: str
    provider: str
    mode: str
    batch: int
    forward: Optional[Callable[[], object]] = None
    params: list = field(default_factory=list)
    step: Optional[Callable[[], object]] = None
    shape: str = ""
    precision: str = "fp32"
    device_type: str = "cpu"
    env: dict = field(default_factory=dict)  # environment set around every call (e.g. DTN_FUSED_GEMM)
    # the numerics gate: ``check()`` returns {name: tensor} (forward output, gradients) of one call
    # without changing what is timed; forward cases have a default (:meth:`outputs`), ``step`` cases
    # give their own. ``compare_grads=False``: only the forward output is comparable (the embedding
    # bag's per-feature loop has other parameters than the reference).
    check: Optional[Callable[[], dict]] = None
    compare_grads: bool = True
    compiled: Optional["Compiled"] = None  # compile providers: fullgraph / graph-break record
    _grad: Optional[torch.Tensor] = None

    def _out(self, result):
        return result[0] if isinstance(result, (tuple, list)) else result

    def grad_for(self, out: torch.Tensor) -> torch.Tensor:
        if self._grad is None or self._grad.shape != out.shape or self._grad.dtype != out.dtype:
            g = torch.Generator(device=out.device).manual_seed(0)
            self._grad = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)
        return self._grad

    def zero_grads(self):
        for p in self.params:
            p.grad = None

    def outputs(self) -> Optional[dict]:
        """{name: tensor} of one forward + backward at the benchmarked shape and precision (the
        numerics gate compares it with the eager reference's); None when the case has no check."""
        if self.check is not None:
            return _with_env(self.env, self.check)() if self.env else self.check()
        if self.step is not None:
            return None

        def fwd_bwd():
            self.zero_grads()
            out = self._out(self._fwd())
            out.backward(self.grad_for(out))
            res = {"output": out.detach()}
            if self.compare_grads:
                res.update({f"grad[{i}]": p.grad for i, p in enumerate(self.params) if p.grad is not None})
            self.zero_grads()
            return res
        return _with_env(self.env, fwd_bwd)() if self.env else fwd_bwd()

    def _fwd(self):
        with autocast(self.precision, torch.device(self.device_type)):
            return self.forward()

    def runner(self) -> tuple[Callable[[], object], Callable[[], object]]:
        """(setup, target): setup runs untimed before each call, target is what is timed."""
        setup, target = self._runner()
        if not self.env:
            return setup, target
        return _with_env(self.env, setup), _with_env(self.env, target)

    def _runner(self) -> tuple[Callable[[], object], Callable[[], object]]:
        if self.step is not None:
            return (lambda: None), self.step
        if self.mode == "fwd":  # a training forward: autograd records the graph, as in fwd+bwd
            return self.zero_grads, self._fwd
        if self.mode == "fwd+bwd":
            def fwd_bwd():
                self.zero_grads()
                out = self._out(self._fwd())
                out.backward(self.grad_for(out))
            return (lambda: None), fwd_bwd
        if self.mode == "bwd":
            state = {}

            def setup():
                self.zero_grads()
                state["out"] = self._out(self._fwd())
                self.grad_for(state["out"])

            def bwd():
                out = state.pop("out")
                out.backward(self.grad_for(out))
            return setup, bwd
        raise ValueError(f"unknown mode {self.mode!r}")


def _with_env(env: dict, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return call


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


# ----------------------------------------------------------------------------- CUDA graphs

GRAPH_SUFFIX = "_graph"  # fused_graph, grouped_graph: benchmarks/graphs.py's graph_case


# ----------------------------------------------------------------------------- budget


def seconds_left() -> float:
    """Seconds until ``DTN_BENCH_DEADLINE`` (a Unix time the suite scripts set), inf without one."""
    deadline = os.environ.get("DTN_BENCH_DEADLINE")
    return float(deadline) - time.time() if deadline else float("inf")


_COMPILE_SEEN: dict = {}


def compile_kind(op: str) -> str:
    return "model" if op.startswith("model:") else "op"


def compile_estimate_s(op: str) -> float:
    """Seconds a compile provider's first call of ``op`` is expected to take (see DEFAULT_COMPILE_S;
    ``DTN_BENCH_COMPILE_S`` / ``DTN_BENCH_MODEL_COMPILE_S`` override the defaults)."""
    kind = compile_kind(op)
    seen = _COMPILE_SEEN.get(kind)
    if seen:
        return 1.5 * max(seen)
    env = os.environ.get("DTN_BENCH_MODEL_COMPILE_S" if kind == "model" else "DTN_BENCH_COMPILE_S")
    return float(env) if env else DEFAULT_COMPILE_S[kind]


def note_compile(op: str, seconds: float) -> None:
    _COMPILE_SEEN.setdefault(compile_kind(op), []).append(seconds)


_COMPILE_OVERRAN: dict = {}  # kind -> the limit an earlier compile of that kind overran


def compile_limit_s(op: str) -> float:
    kind = compile_kind(op)
    env = os.environ.get("DTN_BENCH_MODEL_COMPILE_LIMIT_S" if kind == "model" else "DTN_BENCH_COMPILE_LIMIT_S")
    return float(env) if env else COMPILE_LIMIT_S[kind]


class CompileOverrun(Exception):
    """A compile provider's first call ran past its limit (raised by the timer's signal)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`CompileOverrun` in this (main) thread after ``seconds``; no limit elsewhere
    (signals reach the main thread only) or without SIGALRM."""
    import signal
    import threading

    if seconds == float("inf") or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise CompileOverrun(f"over its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- groups

SKIPPED: list = []  # provider-level skips of this session (benchmarks/conftest.py adds whole-test skips)


def log_line(record: dict) -> None:
    """Append ``record`` as one JSON line to ``DTN_BENCH_LOG`` (if set): every finished or skipped
    case is on disk at once, so a run cut short by a timeout keeps what it measured."""
    path = os.environ.get("DTN_BENCH_LOG")
    if not path:
        return
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def _skip(test: str, group: dict, provider: str, reason: str, **extra) -> None:
    rec = {"test": test, **group, "provider": provider, "reason": f"{provider}: {reason}", **extra}
    SKIPPED.append(rec)
    log_line({"kind": "skipped", **rec})


def _warm(setup, target, device) -> float:
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


def _records(group: dict, cases: dict, times: dict, first_call: dict, device: torch.device, base: dict,
             final: bool, memory: dict, numerics: Optional[dict] = None) -> list[dict]:
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


def run_group(benchmark, op: str, mode: str, batch: int, precision: str,
              make_case: Callable[[str], "Case"], device: torch.device, request=None, *,
              extra: tuple = (), fused_on_cpu: Union[bool, tuple] = False,
              rounds_override: Optional[int] = None) -> dict:
    """Time every provider of one (op, mode, batch, precision) group in interleaved rounds (see the
    module docstring). ``make_case(provider)`` returns the provider's :class:`Case` or raises
    :class:`SkipProvider`. Returns {provider: record}."""
    reason = precision_skip_reason(precision, device)
    if reason:
        pytest.skip(f"{precision}: {reason}")
    if seconds_left() < MIN_GROUP_S:
        pytest.skip("not enough of the suite's time budget (DTN_BENCH_DEADLINE) left for this group")
    test = request.node.nodeid if request is not None else f"{op} {mode} B={batch} {precision}"
    group = {"op": op, "mode": mode, "batch": batch, "group_id": uuid.uuid4().hex[:12],
             **precision_record(precision, device)}
    cases, skipped = {}, {}
    for p in provider_list(extra):
        why = provider_skip_reason(p, device, op, fused_on_cpu)
        if why is None:
            try:
                case = make_case(p)
                case.precision, case.device_type = precision, device.type
                if p.endswith(GRAPH_SUFFIX):
                    from graphs import graph_case

                    case = graph_case(case, device)
                cases[p] = case
            except SkipProvider as exc:
                why = str(exc)
        if why is not None:
            skipped[p] = why
    if not cases:  # benchmarks/conftest.py records the whole test's skip with this reason
        pytest.skip("no provider can run: " + "; ".join(f"{p}: {r}" for p, r in skipped.items()))
    base_env = environment(device)
    key = {k: group[k] for k in ("op", "mode", "batch", "precision")}
    runners = {p: c.runner() for p, c in cases.items()}
    n = rounds(rounds_override)
    first_call: dict = {}
    errors: dict = {}
    budget_note: dict = {}

    def warm(p, limit=float("inf")):  # a provider that raises is left out of the group (and fails the test)
        try:
            with time_limit(limit):
                first_call[p] = _warm(*runners[p], device)
            return True
        except CompileOverrun:
            kind = compile_kind(op)
            _COMPILE_OVERRAN[kind] = limit
            skipped[p] = f"its compile overran its {limit:.0f} s limit (interrupted; no later {kind} compile is tried)"
            budget_note[p] = {"compile_limit_s": round(limit, 1), "compile_overran": True}
            del runners[p]
            return False
        except Exception as exc:  # noqa: BLE001 -- the other providers still get measured
            errors[p] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            del runners[p]
            return False

    # the numerics gate: every provider against the eager reference, once, after its warm-up
    reference = cases.get(REFERENCE_PROVIDER)
    if reference is None and REFERENCE_PROVIDER not in errors:
        try:  # not timed here (DTN_BENCH_PROVIDERS), still the reference
            reference = make_case(REFERENCE_PROVIDER)
            reference.precision, reference.device_type = precision, device.type
        except Exception:  # noqa: BLE001 -- no reference: the verdicts say "unchecked"
            reference = None
    gate = NumericsGate(reference, group["roofline_precision"])
    numerics: dict = {}
    failed_numerics: dict = {}

    def gate_check(providers):
        for p in providers:
            if p not in runners:
                continue
            numerics[p] = gate.verdict(cases[p])
            if numerics[p]["status"] == "FAILED":  # timed still (its record says FAILED), never a speed-up
                errors[p] = numerics_reason(numerics[p])
                failed_numerics[p] = numerics[p]

    plain = [p for p in runners if not p.startswith("compile")]
    compiled_ = [p for p in runners if p.startswith("compile")]
    for p in plain:
        warm(p)
    gate_check(plain)
    plain = [p for p in plain if p in runners]
    if plain and compiled_:  # on disk before any compile: a compile killed by the timeout loses nothing else
        early = interleaved_times({p: runners[p] for p in plain}, device, max(3, n // 2))
        for rec in _records(group, cases, early, first_call, device, base_env, final=False, memory={},
                            numerics=numerics):
            log_line({"kind": "case", **rec})
    for p in compiled_:
        need, left = compile_estimate_s(op), seconds_left()
        overran = _COMPILE_OVERRAN.get(compile_kind(op))
        if overran is not None:  # not retried: the same kind of compile would overrun again
            skipped[p] = (f"an earlier {compile_kind(op)} compile overran its {overran:.0f} s limit in this run "
                          "(not retried)")
            del runners[p]
            continue
        if left < need + 5:  # the reason is the same text every time, so the report can count them
            skipped[p] = "its compile would not fit in what was left of the time budget (DTN_BENCH_DEADLINE)"
            budget_note[p] = {"compile_expected_s": round(need, 1), "left_s": round(max(left, 0.0), 1)}
            del runners[p]
            continue
        if warm(p, min(compile_limit_s(op), max(left - 5, 1.0))):
            note_compile(op, first_call[p])
            gate_check([p])
    if not runners:
        _log_errors(test, key, errors, failed_numerics)
        pytest.fail("every provider failed: " + "; ".join(f"{p}: {e}" for p, e in errors.items()))
    # one untimed interleaved round, then as many timed rounds as the budget allows (at least 3)
    t0 = time.perf_counter()
    interleaved_times(runners, device, 1)
    round_s = time.perf_counter() - t0
    if round_s > 0 and seconds_left() != float("inf"):
        n = max(3, min(n, int((seconds_left() - 5) / round_s)))
    times: dict = {p: [] for p in runners}
    state = {"r": 0}

    def one_round():
        for p in round_order(list(runners), state["r"]):
            times[p].append(time_call(*runners[p], device))
        state["r"] += 1

    benchmark.pedantic(one_round, rounds=n, iterations=1, warmup_rounds=0)
    memory = {}
    for p in runners:  # the last call's gradients must not sit in the baseline
        setup, target = runners[p]
        cases[p].zero_grads()
        try:
            memory[p] = round(peak_memory(setup, target, device) / 2**20, 2)
        except Exception as exc:  # noqa: BLE001 -- a memory probe must not cost the group its times
            memory[p] = None
            warnings.warn(f"{op} {p}: peak memory probe failed ({type(exc).__name__}: {exc})", RuntimeWarning)
    records = _records(group, cases, times, first_call, device, base_env, final=True, memory=memory,
                       numerics=numerics)
    for rec in records:
        log_line({"kind": "case", **rec})
    for p, why in skipped.items():
        _skip(test, key, p, why, **budget_note.get(p, {}))
    _log_errors(test, key, errors, failed_numerics)
    info = benchmark.extra_info
    info.update({**base_env, **group, "cases": records,
                 "skipped": [{"provider": p, "reason": r} for p, r in skipped.items()],
                 "errors": [{"provider": p, "reason": e} for p, e in errors.items()],
                 "numerics": numerics})
    if request is not None:
        request.config.__dict__.setdefault("dtn_bench_results", []).extend(dict(r) for r in records)
    if errors:  # measured what could be measured; the failure still shows
        pytest.fail("; ".join(f"{p} failed: {e}" for p, e in errors.items()))
    return {r["provider"]: r for r in records}


def _log_errors(test: str, key: dict, errors: dict, numerics: Optional[dict] = None) -> None:
    for p, e in errors.items():
        rec = {"test": test, **key, "provider": p, "reason": f"{p} failed: {e}", "error": True}
        if numerics and p in numerics:  # the report shows FAILED in the provider's cell
            rec["numerics"], rec["numerics_detail"] = "FAILED", numerics[p]
        SKIPPED.append(rec)
        log_line({"kind": "error", **rec})


def run_case(benchmark, case: Case, device: torch.device, dtype: torch.dtype = torch.float32, request=None,
             rounds_override: Optional[int] = None) -> dict:
    """One provider timed alone (the harness's earlier interface, kept for files not yet on
    :func:`run_group`). Its records say ``interleaved_with: [provider]``, and the report marks
    ratios built from them: they do not meet the project's interleaving rule."""
    case.device_type = device.type
    group = {"op": case.op, "mode": case.mode, "batch": case.batch, "group_id": uuid.uuid4().hex[:12],
             **precision_record(case.precision, device)}
    setup, target = case.runner()
    first = {case.provider: _warm(setup, target, device)}
    n = rounds(rounds_override)
    times: dict = {case.provider: []}
    benchmark.pedantic(lambda: times[case.provider].append(time_call(setup, target, device)),
                       rounds=n, iterations=1, warmup_rounds=0)
    case.zero_grads()
    memory = {case.provider: round(peak_memory(setup, target, device) / 2**20, 2)}
    (rec,) = _records(group, {case.provider: case}, times, first, device, environment(device), True, memory)
    log_line({"kind": "case", **rec})
    benchmark.extra_info.update(rec)
    if request is not None:
        request.config.__dict__.setdefault("dtn_bench_results", []).append(dict(rec))
    return rec


def skip_unless_available(provider: str, device: torch.device, fused_on_cpu: bool = False,
                          compile_s: float = 60.0, op: str = "") -> None:
    """Skip (with the reason) what cannot be timed here (the earlier interface; see run_case)."""
    if seconds_left() < (compile_s if provider.startswith("compile") else MIN_GROUP_S):
        pytest.skip(f"{provider}: not enough of the suite's time budget (DTN_BENCH_DEADLINE) left")
    reason = provider_skip_reason(provider, device, op, fused_on_cpu)
    if reason:
        pytest.skip(f"{provider}: {reason}")


class Compiled:
    """``torch.compile(fn, dynamic=False, fullgraph=True)``, falling back to ``fullgraph=False`` when
    the function does not trace as one graph. ``info`` (recorded with the provider's results):
    ``fullgraph`` (whether one graph held), ``graph_breaks`` (breaks counted by torch._dynamo in the
    first call) and the first break's reason."""

    def __init__(self, fn, backend: str = "inductor"):
        self.fn, self.info, self.backend = fn, {}, backend
        self._compiled = torch.compile(fn, dynamic=False, fullgraph=True, backend=backend)

    def __call__(self, *args, **kwargs):
        if self.info:
            return self._compiled(*args, **kwargs)
        import torch._dynamo
        from torch._dynamo.utils import counters

        try:
            out = self._compiled(*args, **kwargs)
            self.info.update(fullgraph=True, graph_breaks=0)
            return out
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as exc:
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        before = sum(counters["graph_break"].values())
        self._compiled = torch.compile(self.fn, dynamic=False, backend=self.backend)
        out = self._compiled(*args, **kwargs)
        self.info.update(fullgraph=False, graph_breaks=sum(counters["graph_break"].values()) - before,
                         break_reason=reason)
        return out


def compiled(fn, key: tuple, cache: dict) -> Compiled:
    """:class:`Compiled` ``fn`` (fullgraph where it traces as one graph, static shapes), once per key
    (op, provider, batch size, precision): every batch size gets its own static-shape graph, the
    strongest baseline torch.compile offers (a default compile would reuse a dynamic-shape graph
    from the second size on). The first call of each case, where compilation happens, is untimed."""
    if key not in cache:
        _raise_recompile_limit()
        cache[key] = Compiled(fn)
    return cache[key]


def _raise_recompile_limit() -> None:
    """torch.compile keeps one cache per code object: a module class's forward is shared by every
    instance, batch size and precision (static shapes: one graph each), and the default limit of 8
    would silently fall back to eager after the 8th graph. Done here, not at import: importing
    torch._dynamo imports triton, which must not happen before the Triton tests set
    TRITON_INTERPRET (tests/triton_env.py) when the suite's tests share their process."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
            break
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)


# ----------------------------------------------------------------------------- module cases

_MODULES: dict = {}
_COMPILED: dict = {}
_INPUTS: dict = {}


def module_case(op: str, provider: str, mode: str, batch: int, build: Callable[[], torch.nn.Module],
                make_inputs: Callable[[int], tuple], shape: str = "", precision: str = "fp32") -> Case:
    """A Case for a dtn layer: ``build()`` makes the reference module (fixed seed), the fused
    providers get a copy switched with ``dtn_kernels.set_kernels(..., "fused")`` (same weights),
    the compile providers ``torch.compile`` of either. ``make_inputs(batch)`` returns the forward's
    arguments (fp32 in every precision: bf16 is autocast around the same inputs); the floating ones
    require grad (they stand for embeddings)."""
    import copy

    key = (op, "fused" if provider in ("fused", "compile_fused", "fused_cublas", "fused_graph") else "reference")
    if key not in _MODULES:
        if (op, "reference") not in _MODULES:
            torch.manual_seed(0)
            _MODULES[(op, "reference")] = build()
        if key[1] == "fused":
            fused = copy.deepcopy(_MODULES[(op, "reference")])
            dtn_kernels.set_kernels(fused, "fused")
            _MODULES[key] = fused
    module = _MODULES[key]
    fn = compiled(module, (op, provider, batch, precision), _COMPILED) if provider.startswith("compile") else module
    if (op, batch) not in _INPUTS:
        torch.manual_seed(1)
        _INPUTS[(op, batch)] = make_inputs(batch)
    inputs = _INPUTS[(op, batch)]
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    env = {"DTN_FUSED_GEMM": "torch"} if provider == "fused_cublas" else {}
    return Case(op=op, provider=provider, mode=mode, batch=batch, forward=lambda: fn(*inputs),
                params=list(module.parameters()) + grads, shape=shape, precision=precision, env=env,
                compiled=fn if isinstance(fn, Compiled) else None)
