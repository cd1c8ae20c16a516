"""Embedding-bag training step on CPU: our op with the fused sparse optimizers against FBGEMM's TBE.

One step = forward + backward (+ the optimizer), same inputs and the same upstream gradient for
every provider, output [B, T*d]:

* ``op_dense``          -- ``dtn_kernels.ops.embedding_bag`` forward + backward: a dense [R, d]
  weight gradient (the op today);
* ``op_dense_sgd``      -- the same, then ``torch.optim.SGD.step`` over the whole table (today's training);
* ``op_fused_sgd``      -- the op's forward, then ``embedding_bag_backward_update`` with ``sgd``: the
  update of the touched rows inside the backward, no [R, d] gradient;
* ``op_fused_adagrad``  -- the same with ``rowwise_adagrad``;
* ``fbgemm_dense``      -- FBGEMM ``DenseTableBatchedEmbeddingBagsCodegen`` (dense gradient, like ``op_dense``);
* ``fbgemm_sgd``        -- FBGEMM ``SplitTableBatchedEmbeddingBagsCodegen`` with ``EXACT_SGD`` fused into its backward;
* ``fbgemm_adagrad``    -- the same with ``EXACT_ROWWISE_ADAGRAD``.

Workloads: ``census`` (the 32 categorical tables of Census-Income plus one multi-valued table of
10,000 rows, bags of 0-20 ids; B = 2048, d = 16; as benchmarks/bench_embedding_bag.py) and
``criteo`` (26 tables x 100,000 rows, d = 64, one id per bag, B = 2048). Same learning rate on both
sides; before timing, one step of ours and of FBGEMM's from the same weights is compared (the
updated rows must agree: a numerics check). The FBGEMM providers are skipped, with the reason, where
``fbgemm_gpu`` does not import.

Interleaved medians (the providers take turns every round), at each thread count asked for::

    .venv/bin/python benchmarks/bench_embedding_update.py --threads 1 2 --rounds 100 --criteo-rounds 15

writes benchmarks/results/embedding_update_cpu.md (``--out`` to change) with the medians and the
ratios ours / FBGEMM per workload.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import dtn_kernels
from dtn_kernels.ops import embedding_bag
from dtn_kernels.ops.embedding_update import embedding_bag_backward_update, state_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embedding_bag import CENSUS_CARDINALITIES, MULTI_MAX_LEN, MULTI_ROWS  # noqa: E402

LR = 0.01
EPS = 1e-8
PROVIDERS = ["op_dense", "op_dense_sgd", "op_fused_sgd", "op_fused_adagrad", "fbgemm_dense", "fbgemm_sgd",
             "fbgemm_adagrad"]
# ours / FBGEMM ratios reported (the acceptance: <= 1 on every CPU workload), and ours / today
RATIOS = [("op_fused_sgd", "fbgemm_sgd"), ("op_fused_adagrad", "fbgemm_adagrad"), ("op_dense", "fbgemm_dense"),
          ("op_fused_sgd", "op_dense_sgd")]


def fbgemm_or_reason():
    """(module namespace, None) when fbgemm_gpu imports, else (None, why not)."""
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                            DenseTableBatchedEmbeddingBagsCodegen,
                                                                            SplitTableBatchedEmbeddingBagsCodegen)
    except Exception as e:  # ImportError, or an undefined symbol of a mismatched build (OSError)
        return None, f"fbgemm_gpu is not importable ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return dict(EmbOptimType=EmbOptimType, EmbeddingLocation=EmbeddingLocation, PoolingMode=PoolingMode,
                ComputeDevice=ComputeDevice, Dense=DenseTableBatchedEmbeddingBagsCodegen,
                Split=SplitTableBatchedEmbeddingBagsCodegen), None


class Workload:
    """Tables, a batch, the upstream gradient and one step per provider."""

    def __init__(self, name: str, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.name, self.B = name, 2048
        if name == "census":
            self.d = 16
            cards = CENSUS_CARDINALITIES + [MULTI_ROWS]
            C = len(CENSUS_CARDINALITIES)
            cat = torch.stack([torch.randint(0, c, (self.B,), generator=g) for c in CENSUS_CARDINALITIES], 1)
            lengths = torch.randint(0, MULTI_MAX_LEN + 1, (self.B,), generator=g)
            multi = torch.randint(0, MULTI_ROWS, (int(lengths.sum()),), generator=g)
            self.indices = torch.cat([cat.t().reshape(-1), multi])
            self.offsets = torch.cat([torch.arange(C * self.B + 1), lengths.cumsum(0) + C * self.B])
            self.shape = (f"33 tables (32 Census-Income of 3-53 rows, 1 multi-valued of {MULTI_ROWS:,} rows, bags "
                          f"of 0-{MULTI_MAX_LEN} ids), B = {self.B}, d = {self.d}")
        elif name == "criteo":
            self.d = 64
            cards = [100_000] * 26
            self.indices = torch.cat([torch.randint(0, c, (self.B,), generator=g) for c in cards])
            self.offsets = torch.arange(len(cards) * self.B + 1)
            self.shape = f"26 tables x 100,000 rows, one id per bag, B = {self.B}, d = {self.d}"
        else:
            raise ValueError(f"unknown workload {name!r}")
        self.cards, self.T = cards, len(cards)
        self.table_offsets = torch.tensor([0] + cards).cumsum(0)
        R = int(self.table_offsets[-1])
        self.grad_out = torch.randn(self.B, self.T * self.d, generator=g)
        # ours (all our providers share it); FBGEMM's tables start as copies of it. One copy each,
        # no spare: the Criteo-like tables are 666 MB.
        self.weight = torch.nn.Parameter(torch.rand(R, self.d, generator=g) * 0.02 - 0.01)
        self.sgd = torch.optim.SGD([self.weight], lr=LR)
        self.adagrad_state = torch.zeros(state_shapes("rowwise_adagrad", R, self.d)[0])
        self.empty = torch.zeros(0)
        self.fbgemm, self.skip = fbgemm_or_reason()
        self.tbe = {}
        if self.fbgemm is not None:
            self.tbe = {p: self._make_tbe(p) for p in ("fbgemm_dense", "fbgemm_sgd", "fbgemm_adagrad")}

    def _make_tbe(self, provider):
        f = self.fbgemm
        if provider == "fbgemm_dense":
            tbe = f["Dense"]([(c, self.d) for c in self.cards], pooling_mode=f["PoolingMode"].SUM, use_cpu=True)
        else:
            opt = f["EmbOptimType"].EXACT_SGD if provider == "fbgemm_sgd" else f["EmbOptimType"].EXACT_ROWWISE_ADAGRAD
            specs = [(c, self.d, f["EmbeddingLocation"].HOST, f["ComputeDevice"].CPU) for c in self.cards]
            tbe = f["Split"](specs, optimizer=opt, learning_rate=LR, eps=EPS, pooling_mode=f["PoolingMode"].SUM)
        self._load(tbe, self.weight.detach())
        return tbe

    def _load(self, tbe, weight):
        with torch.no_grad():
            for t, w in enumerate(tbe.split_embedding_weights()):
                lo, hi = int(self.table_offsets[t]), int(self.table_offsets[t + 1])
                w.copy_(weight[lo:hi].view_as(w))

    # --- providers: one training step each
    def op_dense(self):
        self.weight.grad = None
        embedding_bag(self.weight, self.table_offsets, self.indices, self.offsets, "sum").backward(self.grad_out)
        self.weight.grad = None  # what a step leaves behind is not kept between rounds (memory)

    def op_dense_sgd(self):
        self.weight.grad = None
        embedding_bag(self.weight, self.table_offsets, self.indices, self.offsets, "sum").backward(self.grad_out)
        self.sgd.step()
        self.weight.grad = None

    def _fused(self, optimizer, state1):
        w = self.weight.detach()
        embedding_bag(w, self.table_offsets, self.indices, self.offsets, "sum")
        embedding_bag_backward_update(self.grad_out, w, self.table_offsets, self.indices, self.offsets, "sum", None,
                                      None, optimizer, state1, self.empty, LR, eps=EPS)

    def op_fused_sgd(self):
        self._fused("sgd", self.empty)

    def op_fused_adagrad(self):
        self._fused("rowwise_adagrad", self.adagrad_state)

    def _fbgemm(self, provider):
        tbe = self.tbe[provider]
        if provider == "fbgemm_dense":
            tbe.weights.grad = None
        tbe(self.indices, self.offsets).backward(self.grad_out)
        if provider == "fbgemm_dense":
            tbe.weights.grad = None

    def fbgemm_dense(self):
        self._fbgemm("fbgemm_dense")

    def fbgemm_sgd(self):
        self._fbgemm("fbgemm_sgd")

    def fbgemm_adagrad(self):
        self._fbgemm("fbgemm_adagrad")

    def providers(self):
        return [p for p in PROVIDERS if not p.startswith("fbgemm") or self.fbgemm is not None]

    def check(self):
        """One step of ours and of FBGEMM's from the same weights: outputs, and the updated rows of the
        fused optimizers, agree (and the rows the batch did not touch stay). Restores our weights and
        rebuilds FBGEMM's modules (fresh optimizer state) afterwards."""
        W = self.weight.detach()
        out = embedding_bag(W, self.table_offsets, self.indices, self.offsets, "sum")
        if self.fbgemm is None:
            return "FBGEMM numerics check skipped: " + self.skip
        table_of = torch.arange(self.T).repeat_interleave(self.B).repeat_interleave(self.offsets.diff())
        rows = torch.unique(self.indices + self.table_offsets[table_of])
        # the touched rows plus every 97th row (mostly untouched ones)
        probe = torch.unique(torch.cat([rows, torch.arange(0, W.shape[0], 97)]))
        before = W[probe].clone()
        lines = []
        for provider, optimizer in (("fbgemm_sgd", "sgd"), ("fbgemm_adagrad", "rowwise_adagrad")):
            tbe = self.tbe[provider]
            torch.testing.assert_close(tbe(self.indices, self.offsets), out, rtol=1e-5, atol=1e-6)
            self._fbgemm(provider)
            tables = tbe.split_embedding_weights()
            t_of = torch.searchsorted(self.table_offsets, probe, right=True) - 1
            theirs = torch.stack([tables[int(t)][int(r - self.table_offsets[t])].reshape(-1)
                                  for t, r in zip(t_of, probe)])
            s1 = torch.zeros(state_shapes(optimizer, *W.shape)[0])
            embedding_bag_backward_update(self.grad_out, W, self.table_offsets, self.indices, self.offsets, "sum",
                                          None, None, optimizer, s1, self.empty, LR, eps=EPS)
            ours = W[probe].clone()
            W[probe] = before  # every row the update can have moved is in probe
            err = (theirs - ours).abs().max().item()
            moved = int((ours != before).any(1).sum())
            torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-6)
            lines.append(f"{optimizer}: {moved:,} rows updated, max |FBGEMM - ours| = {err:.2e}")
            del tbe, tables
            self.tbe[provider] = None
            self.tbe[provider] = self._make_tbe(provider)  # fresh weights and optimizer state
        return "numerics check vs FBGEMM (one step from the same weights): " + "; ".join(lines)


def interleaved_medians(work: Workload, rounds: int, warmup: int = 3) -> tuple[dict, dict]:
    """Median wall-clock seconds and median process CPU seconds (all threads) per provider."""
    fns = {p: getattr(work, p) for p in work.providers()}
    for _ in range(warmup):
        for f in fns.values():
            f()
    wall = {p: [] for p in fns}
    cpu = {p: [] for p in fns}
    for _ in range(rounds):
        for p, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            cpu[p].append(time.process_time() - c0)
            wall[p].append(time.perf_counter() - t0)
    return ({p: statistics.median(ts) for p, ts in wall.items()}, {p: statistics.median(ts) for p, ts in cpu.items()})


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown(results: dict, notes: list, args, command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# Embedding-bag training step on CPU: fused sparse optimizers vs FBGEMM TBE", "",
           f"Measured {now} on {cpu_name()} ({os.cpu_count()} vCPUs), torch {torch.__version__}, "
           f"compiled op {dtn_kernels.HAS_C_EXT}. Interleaved medians (the providers take turns every round); "
           "forward + backward (+ optimizer) per step, B = 2048, fp32. Wall: median wall-clock time; CPU: "
           "median CPU time of the process (all its threads), which a machine loaded by other processes "
           "inflates less than the wall clock (with 2 threads it is the sum over both).", "", f"`{command}`", ""]
    out += [f"- {n}" for n in notes] + [""]
    for (wl, threads), (med, cpu, rounds, load0, load1) in results.items():
        out += [f"## {wl}, {threads} thread{'s' if threads > 1 else ''} ({rounds} rounds; load average "
                f"{load0:.1f} before, {load1:.1f} after)", "", "| provider | wall ms | CPU ms |", "|---|---|---|"]
        out += [f"| {p} | {med[p] * 1e3:.3f} | {cpu[p] * 1e3:.3f} |" for p in med]
        out += ["", "| ratio | wall | CPU |", "|---|---|---|"]
        for a, b in RATIOS:
            if a in med and b in med:
                out.append(f"| {a} / {b} | {med[a] / med[b]:.2f}x | {cpu[a] / cpu[b]:.2f}x |")
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=100, help="interleaved rounds, Census workload")
    ap.add_argument("--criteo-rounds", type=int, default=15, help="interleaved rounds, Criteo-like workload")
    ap.add_argument("--workloads", nargs="+", default=["census", "criteo"], choices=["census", "criteo"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "embedding_update_cpu.md"))
    args = ap.parse_args()
    command = "python benchmarks/bench_embedding_update.py " + " ".join(sys.argv[1:])
    results, notes = {}, []
    for wl in args.workloads:
        work = Workload(wl)
        note = work.check()
        notes.append(f"{wl} ({work.shape}): {note}")
        print(notes[-1], flush=True)
        for threads in args.threads:
            torch.set_num_threads(threads)
            rounds = args.rounds if wl == "census" else args.criteo_rounds
            load0 = os.getloadavg()[0]
            med, cpu = interleaved_medians(work, rounds)
            results[(wl, threads)] = (med, cpu, rounds, load0, os.getloadavg()[0])
            print(f"-- {wl}, {threads} thread(s), {rounds} rounds (wall ms, process CPU ms)")
            for p, v in med.items():
                print(f"{p:<18}{v * 1e3:>10.3f}{cpu[p] * 1e3:>10.3f}")
            for a, b in RATIOS:
                if a in med and b in med:
                    print(f"{a + ' / ' + b:<36}{med[a] / med[b]:>7.2f}x{cpu[a] / cpu[b]:>7.2f}x")
            sys.stdout.flush()
        del work
    text = markdown(results, notes, args, command)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
