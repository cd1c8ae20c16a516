"""Table-batched embedding bag, forward + backward, on Census-Income's tables (CPU).

Providers (same inputs, same upstream gradient, output [B, T*d] in every case):

* ``dtn_op``       -- ``dtn_kernels.ops.embedding_bag`` (torch.ops.dtn.embedding_bag when built);
* ``module_loop``  -- one ``nn.EmbeddingBag`` per feature, then ``torch.cat`` (what
  torch-rechub / FuxiCTR-style input layers do);
* ``single_fbag``  -- one ``F.embedding_bag`` over the concatenated tables, ids already
  shifted by their table's row offset (precomputed, not timed), output permuted to [B, T*d].

Shapes: the 32 categorical inputs of Census-Income (KDD) plus one multi-valued feature
(10,000 rows, bag lengths uniform in 0..20), batch 2048, d = 16, sum pooling.
Every step sets the weight gradients to None first (as ``zero_grad(set_to_none=True)`` does).

Run with pytest-benchmark (ratios printed at the end by benchmarks/conftest.py)::

    DTN_BENCH_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_embedding_bag.py --benchmark-only

or as a script, which interleaves the providers round by round, so each one runs after the
others have churned the caches (harsher on the op, whose step is bound by memory traffic),
and prints medians and ratios; ``--repeat K`` runs K independent interleaved measurements
and prints the median of their ratios, so a noisy moment shows::

    .venv/bin/python benchmarks/bench_embedding_bag.py --threads 1 --rounds 200 --repeat 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtn_kernels
from dtn_kernels.ops import embedding_bag
from dtn_kernels.reference import pt_embedding_bag
from harness import environment as harness_environment
from harness import Case, SkipProvider, bench_device, compiled, group_grid, run_group

# Census-Income (KDD) categorical cardinalities, +1 for an out-of-vocabulary row each.
# Computed from /work/shared/data/census-income/census-income.data.xz (42 columns, no
# header): the number of distinct stripped values of every column except the numeric
# ones (0, 5, 16, 17, 18, 30, 39), instance_weight (24), the labels income_50k (41) and
# marital_stat (7); 32 columns remain, in column order.
CENSUS_CARDINALITIES = [10, 53, 48, 18, 4, 25, 16, 6, 11, 3, 4, 7, 9, 7, 7, 52,
                        39, 9, 11, 10, 11, 4, 5, 6, 44, 44, 44, 6, 4, 4, 4, 3]
MULTI_ROWS = 10_000
MULTI_MAX_LEN = 20
BATCH = 2048
DIM = 16
PROVIDERS = ["dtn_op", "module_loop", "single_fbag"]


class Workload:
    """Inputs and one fwd+bwd step per provider."""

    def __init__(self, batch=BATCH, dim=DIM, seed=0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.B, self.d = batch, dim
        cards = CENSUS_CARDINALITIES + [MULTI_ROWS]
        self.C, self.T = len(CENSUS_CARDINALITIES), len(cards)
        self.cat = torch.stack([torch.randint(0, c, (batch,), generator=g) for c in CENSUS_CARDINALITIES], 1)
        lengths = torch.randint(0, MULTI_MAX_LEN + 1, (batch,), generator=g)
        self.multi_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        self.multi_values = torch.randint(0, MULTI_ROWS, (int(self.multi_offsets[-1]),), generator=g)
        self.table_offsets = torch.tensor([0] + cards).cumsum(0)
        R = int(self.table_offsets[-1])
        # table-batched jagged input (what InputLayer builds): ids local to their table
        self.indices = torch.cat([self.cat.t().reshape(-1), self.multi_values])
        self.offsets = torch.cat([torch.arange(self.C * batch + 1), self.multi_offsets[1:] + self.C * batch])
        self.shifted = self.indices + self.table_offsets[:-1].repeat_interleave(batch).repeat_interleave(
            self.offsets.diff())
        self.weight = nn.Parameter(torch.randn(R, dim, generator=g) * 0.05)
        self.modules = [nn.EmbeddingBag(c, dim, mode="sum") for c in cards]
        with torch.no_grad():
            for m, lo, hi in zip(self.modules, self.table_offsets[:-1], self.table_offsets[1:]):
                m.weight.copy_(self.weight[lo:hi])
        self.grad_out = torch.randn(batch, self.T * dim, generator=g)
        if torch.device(device).type != "cpu":
            for name in ("cat", "multi_offsets", "multi_values", "table_offsets", "indices", "offsets", "shifted",
                         "grad_out"):
                setattr(self, name, getattr(self, name).to(device))
            self.weight = nn.Parameter(self.weight.detach().to(device))
            self.modules = [m.to(device) for m in self.modules]

    # --- the three providers: forward + backward, gradients reset first
    def dtn_op(self):
        self.weight.grad = None
        out = embedding_bag(self.weight, self.table_offsets, self.indices, self.offsets, "sum")
        out.backward(self.grad_out)
        return out

    def module_loop(self):
        for m in self.modules:
            m.weight.grad = None
        outs = [m(self.cat[:, j : j + 1]) for j, m in enumerate(self.modules[: self.C])]
        outs.append(self.modules[self.C](self.multi_values, self.multi_offsets[:-1]))
        out = torch.cat(outs, dim=1)
        out.backward(self.grad_out)
        return out

    def single_fbag(self):
        self.weight.grad = None
        out = F.embedding_bag(self.shifted, self.weight, self.offsets, mode="sum", include_last_offset=True)
        out = out.view(self.T, self.B, self.d).transpose(0, 1).reshape(self.B, self.T * self.d)
        out.backward(self.grad_out)
        return out

    def check(self):
        """All providers compute the same output and weight gradient."""
        ref = self.single_fbag().detach()
        ref_grad = self.weight.grad.clone()
        out = self.dtn_op().detach()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # fp32 sums of ~2048 terms in different orders
        torch.testing.assert_close(self.weight.grad, ref_grad, rtol=1e-4, atol=1e-4)  # fp32 sums of ~2048 terms in different orders
        out = self.module_loop().detach()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # fp32 sums of ~2048 terms in different orders
        loop_grad = torch.cat([m.weight.grad for m in self.modules])
        torch.testing.assert_close(loop_grad, ref_grad, rtol=1e-4, atol=1e-4)  # fp32 sums of ~2048 terms in different orders


def bench_threads() -> int:
    """DTN_BENCH_THREADS, else torch's current thread count."""
    return int(os.environ.get("DTN_BENCH_THREADS", torch.get_num_threads()))


def environment() -> dict:
    """The CPU ratio benchmark's environment: the suite's record (device, versions, threads)."""
    return harness_environment(torch.device("cpu"), torch.float32)


# ----------------------------------------------------------------------------- pytest-benchmark


@pytest.fixture(scope="module")
def workload():
    torch.set_num_threads(bench_threads())
    w = Workload()
    w.check()
    return w


@pytest.mark.benchmark(group="embedding_bag fwd+bwd (census, B=2048, d=16)")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.skipif(os.environ.get("DTN_BENCH_DEVICE", "cpu") != "cpu" or os.environ.get("DTN_BENCH_PRESET") == "smoke",
                    reason="the op's CPU ratio benchmark (README): CPU runs only")
def test_embedding_bag_fwd_bwd(benchmark, workload, provider, request):
    torch.set_num_threads(bench_threads())
    benchmark.extra_info.update(environment())
    benchmark.pedantic(getattr(workload, provider), rounds=60, iterations=1, warmup_rounds=5)
    request.config.__dict__.setdefault("dtn_bench_medians", {})[provider] = benchmark.stats.stats.median


# ----------------------------------------------------------------------------- the suite's providers
#
# eager: the pure-PyTorch twin (one F.embedding_bag over shifted ids, shifting included);
# fused: dtn_kernels.ops.embedding_bag (C++ on CPU, CUDA on GPU); compile / compile_fused:
# torch.compile of either; loop: one nn.EmbeddingBag per feature, then torch.cat.


SUITE_DEVICE = bench_device()
_WORK: dict = {}
_COMPILED: dict = {}


def require_op_extension(device: torch.device) -> None:
    """Raise :class:`SkipProvider` unless dtn_kernels._C can run the op on ``device``."""
    if not dtn_kernels.HAS_C_EXT:
        raise SkipProvider("dtn_kernels._C is not built")
    if device.type == "cuda" and not dtn_kernels.HAS_CUDA_EXT:
        raise SkipProvider("dtn_kernels._C was built without CUDA")


def suite_case(provider: str, mode: str, batch: int, precision: str = "fp32") -> Case:
    if batch not in _WORK:
        _WORK[batch] = Workload(batch=batch, device=SUITE_DEVICE)
    w = _WORK[batch]
    args = (w.weight, w.table_offsets, w.indices, w.offsets)
    shape = f"B={batch} tables={w.T} (32 Census-Income + 1 multi-valued) d={w.d}"
    if provider == "loop":
        def loop():
            outs = [m(w.cat[:, j: j + 1]) for j, m in enumerate(w.modules[: w.C])]
            outs.append(w.modules[w.C](w.multi_values, w.multi_offsets[:-1]))
            return torch.cat(outs, dim=1)
        params = [m.weight for m in w.modules]
        # its gradients are per-table weights: only the forward output is compared with the reference's
        return Case("embedding_bag", provider, mode, batch, forward=loop, params=params, shape=shape,
                    compare_grads=False)
    if provider in ("fused", "compile_fused", "fused_graph"):
        require_op_extension(SUITE_DEVICE)
    fn = {"eager": pt_embedding_bag, "fused": embedding_bag, "fused_graph": embedding_bag,
          "compile": pt_embedding_bag, "compile_fused": embedding_bag}[provider]
    if provider.startswith("compile"):
        fn = compiled(fn, (provider, batch, precision), _COMPILED)
    return Case("embedding_bag", provider, mode, batch, forward=lambda: fn(*args, "sum"), params=[w.weight],
                shape=shape, compiled=fn if provider.startswith("compile") else None)


@pytest.mark.parametrize("batch,mode,precision", group_grid(), ids=lambda v: str(v))
def test_embedding_bag(benchmark, batch, mode, precision, request):
    run_group(benchmark, "embedding_bag", mode, batch, precision,
              lambda provider: suite_case(provider, mode, batch, precision), SUITE_DEVICE, request,
              extra=("loop",), fused_on_cpu=True)


# ----------------------------------------------------------------------------- script


def interleaved_medians(work: Workload, rounds: int, warmup: int = 10) -> dict:
    """Median seconds per provider, timing the providers in turn every round."""
    fns = {p: getattr(work, p) for p in PROVIDERS}
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {p: [] for p in PROVIDERS}
    for _ in range(rounds):
        for p, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(ts) for p, ts in times.items()}


# Acceptance targets of the interleaved measurement (README): median(provider) / median(dtn_op).
TARGETS = {"module_loop": 10.0, "single_fbag": 6.0}


def format_ratios(medians: dict) -> str:
    ours = medians["dtn_op"]
    lines = [f"{'provider':<14}{'median ms':>11}{'vs dtn_op':>11}"]
    for p in PROVIDERS:
        lines.append(f"{p:<14}{medians[p] * 1e3:>11.3f}{medians[p] / ours:>10.2f}x")
    return "\n".join(lines)


def summarize(runs: list) -> str:
    """Median (and range) over independent interleaved measurements of each ratio."""
    lines = [f"{'ratio':<24}{'median':>9}{'min':>9}{'max':>9}{'target':>9}"]
    for p in PROVIDERS[1:]:
        r = [m[p] / m["dtn_op"] for m in runs]
        target = TARGETS[p]
        mark = "met" if statistics.median(r) >= target else "NOT met"
        lines.append(f"{p + ' / dtn_op':<24}{statistics.median(r):>8.2f}x{min(r):>8.2f}x{max(r):>8.2f}x"
                     f"{target:>8.1f}x  {mark}")
    ms = [m["dtn_op"] * 1e3 for m in runs]
    lines.append(f"{'dtn_op ms':<24}{statistics.median(ms):>9.3f}{min(ms):>9.3f}{max(ms):>9.3f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=bench_threads())
    ap.add_argument("--rounds", type=int, default=200, help="interleaved rounds per measurement")
    ap.add_argument("--repeat", type=int, default=1,
                    help="independent interleaved measurements; the summary gives the median of their ratios")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Workload()
    work.check()
    env = environment()
    load = os.getloadavg()
    print(f"threads {torch.get_num_threads()} | CPU {env['device']} | torch {env['torch']} | "
          f"compiled op {env['compiled_ext']} | B={work.B} d={work.d} tables={work.T} | rounds {args.rounds} | "
          f"load average (1/5/15 min) {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    runs = []
    for r in range(args.repeat):
        runs.append(interleaved_medians(work, args.rounds))
        print(f"-- measurement {r + 1}/{args.repeat}")
        print(format_ratios(runs[-1]))
    load = os.getloadavg()
    print(f"-- summary over {args.repeat} measurement(s); load average now {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(summarize(runs))


if __name__ == "__main__":
    main()
