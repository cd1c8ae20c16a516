"""The benchmark suite's settings: providers, shapes and grids, presets, run order, and why a provider
is left out -- everything a ``DTN_BENCH_*`` variable chooses (docs/benchmarks.md lists them).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

import dtn_kernels

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
GRAPH_SUFFIX = "_graph"  # fused_graph, grouped_graph: benchmarks/graphs.py's graph_case

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
