"""Table-batched embedding bag with hot rows, forward + backward: dtn's op against F.embedding_bag.

A backward that gives each distinct row to one thread group walks a hot row's ids one after
another; the op's CUDA backward splits long runs of one row across groups (a chunked
reduction, docs/embedding_bag.md). These cases are where that matters:

* ``zipf``  -- the 32 Census-Income tables plus a 10,000-row multi-valued table (0..20 ids per
  bag), every id drawn from a Zipf law (P(row r) ~ 1 / (r + 1)^1.2) over its table's rows: a few
  ids carry most of the batch;
* ``equal`` -- the same tables with every id equal (row 0 of its table): each table's one row
  takes all of its ids (B, or about 10 B for the multi-valued table).

Providers (same inputs, same upstream gradient, output [B, T*d]):

* ``fused`` -- ``dtn_kernels.ops.embedding_bag`` (the CUDA kernels on GPU, C++ on CPU);
* ``eager`` -- one ``F.embedding_bag`` over the ids shifted by their table's row offset
  (shifted once, outside the timing), output permuted to [B, T*d]: ATen's kernel and its
  sort-based backward.

Modes: forward + backward at B = 2048 and 4096 (the paper's batches); the ``full`` preset adds
the backward alone at 4096. d = 16, fp32, sum pooling, gradients reset to None every round.
Built on benchmarks/harness.py (CUDA-event medians with L2 flushed on GPU)::

    DTN_BENCH_DEVICE=cuda python -m pytest benchmarks/bench_embedding_bag_skew.py --benchmark-only \\
        --benchmark-json results/skew.json

or as a script that prints medians and ratios (CUDA events on GPU, wall clock on CPU)::

    python benchmarks/bench_embedding_bag_skew.py [--batch 4096] [--reps 50]
"""
from __future__ import annotations

import argparse
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench_embedding_bag import CENSUS_CARDINALITIES, DIM, MULTI_MAX_LEN, MULTI_ROWS, require_op_extension
from dtn_kernels.ops import embedding_bag
from harness import (PAPER_BATCHES, Case, SkipProvider, bench_device, cuda_event_times, environment, preset,
                     run_group, subset, sync)

KINDS = ("zipf", "equal")
ZIPF_EXPONENT = 1.2
SKEW_PROVIDERS = ("eager", "fused")


class SkewWorkload:
    """Inputs of one case, and one forward per provider (autograd records it)."""

    def __init__(self, kind: str, batch: int, dim: int = DIM, seed: int = 0, device="cpu"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        g = torch.Generator().manual_seed(seed)
        cards = CENSUS_CARDINALITIES + [MULTI_ROWS]
        self.kind, self.B, self.d, self.T = kind, batch, dim, len(cards)
        C = len(CENSUS_CARDINALITIES)
        lengths = torch.cat([torch.ones(C * batch, dtype=torch.long),
                             torch.randint(0, MULTI_MAX_LEN + 1, (batch,), generator=g)])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        ids = []
        for t, card in enumerate(cards):
            n = int(lengths[t * batch:(t + 1) * batch].sum())
            if kind == "equal":
                ids.append(torch.zeros(n, dtype=torch.long))
            else:
                p = 1.0 / torch.arange(1, card + 1, dtype=torch.float64) ** ZIPF_EXPONENT
                ids.append(torch.multinomial(p, n, replacement=True, generator=g))
        self.indices = torch.cat(ids)
        self.table_offsets = torch.tensor([0] + cards).cumsum(0)
        self.shifted = self.indices + self.table_offsets[:-1].repeat_interleave(batch).repeat_interleave(lengths)
        counts = torch.bincount(self.shifted)
        self.hottest_share = float(counts.max()) / max(self.indices.numel(), 1)  # of all ids, on one row
        self.weight = nn.Parameter(torch.randn(int(self.table_offsets[-1]), dim, generator=g) * 0.05)
        if torch.device(device).type != "cpu":
            for name in ("offsets", "indices", "table_offsets", "shifted"):
                setattr(self, name, getattr(self, name).to(device))
            self.weight = nn.Parameter(self.weight.detach().to(device))

    def shape(self) -> str:
        return (f"{self.kind} ids, B={self.B} tables={self.T} (32 Census-Income + 1 multi-valued) d={self.d} "
                f"N={self.indices.numel()} hottest row {100 * self.hottest_share:.1f}% of ids")

    def fused(self) -> torch.Tensor:
        return embedding_bag(self.weight, self.table_offsets, self.indices, self.offsets, "sum")

    def eager(self) -> torch.Tensor:
        out = F.embedding_bag(self.shifted, self.weight, self.offsets, mode="sum", include_last_offset=True)
        return out.view(self.T, self.B, self.d).transpose(0, 1).reshape(self.B, self.T * self.d)

    def check(self) -> None:
        """Both providers give the same output and weight gradient."""
        go = torch.randn(self.B, self.T * self.d, generator=torch.Generator().manual_seed(1)).to(self.weight.device)
        results = []
        for fn in (self.eager, self.fused):
            self.weight.grad = None
            out = fn()
            out.backward(go)
            results.append((out.detach(), self.weight.grad.clone()))
        self.weight.grad = None
        (a, ga), (b, gb) = results
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        # a hot row sums up to ~10 B upstream values: fp32 sums in different orders
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- pytest-benchmark

SUITE_DEVICE = bench_device()
_WORK: dict = {}


def workload(kind: str, batch: int) -> SkewWorkload:
    if (kind, batch) not in _WORK:
        w = SkewWorkload(kind, batch, device=SUITE_DEVICE)
        w.check()
        _WORK[(kind, batch)] = w
    return _WORK[(kind, batch)]


def skew_grid() -> list[tuple[int, str]]:
    """(batch, mode): forward + backward at the paper's batches, the backward alone too in ``full``."""
    p = preset()
    if p == "smoke":
        return subset([(64, "fwd+bwd")], core=[(64, "fwd+bwd")])
    grid = [(b, "fwd+bwd") for b in PAPER_BATCHES]
    if p == "full":
        grid.append((PAPER_BATCHES[-1], "bwd"))
    return subset(grid, core=[(PAPER_BATCHES[0], "fwd+bwd")])


def skew_case(provider: str, kind: str, mode: str, batch: int) -> Case:
    w = workload(kind, batch)
    return Case(f"embedding_bag_{kind}", provider, mode, batch, forward=getattr(w, provider), params=[w.weight],
                shape=w.shape())


def skew_make(kind: str, mode: str, batch: int):
    def make(provider: str) -> Case:
        if provider not in SKEW_PROVIDERS:
            raise SkipProvider("the skew benchmark compares the op with one F.embedding_bag call only")
        if provider == "fused":
            require_op_extension(SUITE_DEVICE)
        return skew_case(provider, kind, mode, batch)
    return make


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,mode", skew_grid(), ids=lambda v: str(v))
def test_embedding_bag_skew(benchmark, kind, batch, mode, request):
    """Our op against one F.embedding_bag (its CUDA backward sorts and splits long segments too),
    interleaved rounds, fp32 (the op has no precision policy: it gathers and sums)."""
    run_group(benchmark, f"embedding_bag_{kind}", mode, batch, "fp32", skew_make(kind, mode, batch), SUITE_DEVICE,
              request, fused_on_cpu=True)


# ----------------------------------------------------------------------------- script


def median_ms(case: Case, device: torch.device, reps: int) -> float:
    """Median ms of ``reps`` calls after a warm-up, timed by the harness (CUDA events / CPU clock)."""
    setup, target = case.runner()
    warmup = 5 if device.type == "cuda" else 3
    return statistics.median(cuda_event_times(setup, target, device, reps, warmup=warmup)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=PAPER_BATCHES[-1])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    device = SUITE_DEVICE
    print(environment(device, torch.float32))
    print(f"{'case':<8}{'mode':<9}{'F.embedding_bag ms':>20}{'dtn op ms':>12}{'speed-up':>10}  shape")
    for kind in KINDS:
        for mode in ("fwd+bwd", "bwd"):
            ms = {p: median_ms(skew_case(p, kind, mode, args.batch), device, args.reps) for p in SKEW_PROVIDERS}
            sync(device)
            print(f"{kind:<8}{mode:<9}{ms['eager']:>20.3f}{ms['fused']:>12.3f}{ms['eager'] / ms['fused']:>9.2f}x  "
                  f"{workload(kind, args.batch).shape()}")


if __name__ == "__main__":
    main()
