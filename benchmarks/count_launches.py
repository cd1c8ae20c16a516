"""Kernel launches of one training step and one inference step, per kernel mode, at the paper's
configuration -- counted on the CPU, no GPU needed.

    python benchmarks/count_launches.py [--model dtn] [--batch 2048] [--markdown FILE] [--json FILE]

Modes: ``reference`` (every layer and the input layer on their PyTorch references), ``fused`` (the
fused ops, one module at a time) and ``grouped`` (the fused ops with the modules of one kind run as
one group, ``dtn_kernels.set_kernels(model, "grouped")``).

How it counts. Inside ``dtn_kernels.triton._launch.count_launches()`` the ops take their GPU path on
CPU tensors (same launchers and tile choices; the cuBLAS GEMMs and torch element-wise ops they issue
run as their CPU versions) and every Triton launch is recorded instead of run. The torch profiler
records every aten op of the step; an op that has no aten op below it and is not a view or a
metadata-only op (``view``, ``reshape`` without a copy, ``transpose``, ``empty``, ...) is counted as
one CUDA kernel, except that an op that is a single kernel or library call on CUDA (``sum``,
``addmm``, ``bmm``, ``cat``, ``native_layer_norm``, the fused optimizer, ...) counts once whatever
its CPU implementation calls below it. The input layer's host-side id check is off (on CUDA it
runs on the CPU batch before the copy, outside the step), and the reference embedding bag takes its
device path (``pt_embedding_bag.device_path``: no value checks, as for ids on a GPU). The compiled embedding bag (a C++ op, ``dtn::embedding_bag``) counts as one kernel
forward and one backward, although its CUDA backward launches a sort and a few reduction passes.
The optimizer is Adam with ``fused=True`` (one multi-tensor kernel on CUDA) in every mode. fp32
under torch's ``"high"`` matmul policy (TF32: the fused GEMMs take their tensor-core route, as in
bf16). Host synchronisations (``aten::item`` / ``_local_scalar_dense``, ``nonzero``) are reported
beside the counts: the ones the step's code asks for, as aten ops; a sync inside an ATen CUDA
kernel's own implementation has no aten op of its own and is not seen on the CPU. Triton kernels' outputs stay unset while counting, so the step computes nothing
meaningful: it only shows what it would issue.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dtn_kernels  # noqa: E402
from dtn_kernels.reference.pt_embedding_bag import device_path  # noqa: E402
from dtn_kernels.triton._launch import count_launches  # noqa: E402

MODES = ("reference", "fused", "grouped")
FREE = {  # aten ops that launch no kernel on CUDA (views, metadata, allocation)
    "view", "_unsafe_view", "reshape", "expand", "expand_as", "permute", "transpose", "t", "unsqueeze", "squeeze",
    "select", "slice", "as_strided", "detach", "detach_", "alias", "split", "split_with_sizes", "unbind", "chunk",
    "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "flatten",
    "unflatten", "view_as", "narrow", "diagonal", "_reshape_alias", "result_type", "contiguous", "to", "type_as",
    "numpy_T", "movedim", "unsqueeze_", "squeeze_", "t_", "transpose_", "_has_compatible_shallow_copy_type",
    "set_", "is_same_size", "_to_copy_noop", "requires_grad_", "retain_grad", "output_nr", "_version",
    "size", "stride", "dim", "is_floating_point", "is_complex", "resolve_conj", "resolve_neg", "conj",
    # the Python custom ops are boundaries, not kernels: their Triton launches and the aten ops their
    # launchers issue are counted on their own
    "gated_cross", "gated_cross_backward", "mask_block", "mask_block_backward", "hcnet", "hcnet_backward",
    "softmax_gate", "softmax_gate_backward", "softmax_mix", "softmax_mix_backward",
}
# ops that are one kernel (or one library call) on CUDA even where the CPU implementation calls other
# aten ops (a zero fill before a CPU reduction, a copy for addmm's bias, per-tensor foreach loops)
KERNEL_OPS = {
    "aten::sum", "aten::mean", "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::cat",
    "aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::_softmax", "aten::_softmax_backward_data",
    "aten::_fused_adam_", "aten::_foreach_add_", "aten::index_add_", "aten::_embedding_bag",
    "aten::_embedding_bag_backward", "aten::_embedding_bag_dense_backward", "aten::embedding_dense_backward",
    "aten::sort", "aten::index", "aten::gather", "aten::scatter_add_", "aten::triu_indices", "aten::searchsorted",
    "aten::var_mean", "dtn::embedding_bag", "dtn::embedding_bag_backward", "dtn::embedding_bag_backward_sparse",
}
SYNCS = {"item", "_local_scalar_dense", "nonzero", "is_nonzero", "equal", "unique_consecutive", "unique_dim",
         "_unique2", "masked_select"}


def _is_op(name: str) -> bool:
    return name.startswith("aten::") or name.startswith("dtn::")


def _kernel_ops(prof, by_custom_op: Optional[Counter] = None) -> tuple[Counter, int]:
    """(ops counted as one CUDA kernel each, by name; host syncs). An op counts when it is in
    KERNEL_OPS and no ancestor is, or when it is a leaf (no op below it), not free, and no ancestor
    is in KERNEL_OPS. ``by_custom_op`` (optional) gets the counted kernels by the innermost
    ``dtn::`` custom op they were issued from (its wrapper's aten ops; "-" outside any)."""
    counts: Counter = Counter()
    syncs = 0
    for ev in prof.events():
        name = ev.name
        if not _is_op(name):
            continue
        short = name.split("::", 1)[1]
        ancestors = []
        p = ev.cpu_parent
        while p is not None:
            ancestors.append(p.name)
            p = p.cpu_parent
        if short in SYNCS and not any(a in KERNEL_OPS for a in ancestors):
            syncs += 1
        if short in FREE or any(a in KERNEL_OPS for a in ancestors):
            continue
        if name in KERNEL_OPS or not any(_is_op(c.name) for c in ev.cpu_children):
            counts[name] += 1
            if by_custom_op is not None:
                owner = next((a for a in ancestors if a.startswith("dtn::") and a not in KERNEL_OPS), "-")
                by_custom_op[owner] += 1
    return counts, syncs


def count_step(model, batch, labels, train: bool) -> dict:
    """Kernels (aten ops + Triton launches) and host syncs of one step of ``model``. The input layer's
    host-side id check is off (on CUDA it runs on the CPU batch before the copy, not in the step)."""
    model.input_layer.validate = False
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True) if train else None

    def step():
        if train:
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(model(batch), labels)
            loss.backward()
            opt.step()
        else:
            model.eval()
            with torch.no_grad():
                model(batch)

    with device_path():  # the reference embedding bag as on a GPU: no value checks, no host sync
        step()  # warm-up: lazily created state (Adam's moments) is not part of the steady state
        with count_launches() as triton_launches:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
    by_op: Counter = Counter()
    aten, syncs = _kernel_ops(prof, by_op)
    triton = Counter(triton_launches)
    return {"aten": sum(aten.values()), "triton": sum(triton.values()), "kernels": sum(aten.values()) + sum(triton.values()),
            "host_syncs": syncs, "top_aten": aten.most_common(12), "triton_by_kernel": dict(triton),
            "aten_by_custom_op": dict(by_op.most_common())}


def build(name: str, batch_size: int):
    from bench_model import batch_of, schema  # the suite's Census-shaped 39-field input, two tasks

    from dtn.config import load_config
    from dtn.models import build_model

    torch.manual_seed(0)
    model = build_model(name, schema(), load_config("paper").model)
    batch, labels = batch_of(batch_size)
    return model, batch, labels


def count_all(name: str = "dtn", batch_size: int = 2048) -> dict:
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        base, batch, labels = build(name, batch_size)
        out = {}
        for mode in MODES:
            model = copy.deepcopy(base)
            dtn_kernels.set_kernels(model, mode)
            out[mode] = {"train": count_step(model, batch, labels, True),
                         "infer": count_step(model, batch, labels, False)}
        return out
    finally:
        torch.set_float32_matmul_precision(prev)


def markdown(name: str, batch_size: int, counts: dict) -> str:
    ref = counts["reference"]
    lines = [f"Kernels per step, {name} at the paper's configuration, B = {batch_size} "
             "(`python benchmarks/count_launches.py`):", "",
             "| mode | training step: kernels (aten + Triton) | vs reference | host syncs | inference: kernels "
             "(aten + Triton) | vs reference |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        tr, inf = counts[mode]["train"], counts[mode]["infer"]
        lines.append(f"| {mode} | {tr['kernels']} ({tr['aten']} + {tr['triton']}) | "
                     f"{tr['kernels'] / ref['train']['kernels']:.2f} | {tr['host_syncs']} | "
                     f"{inf['kernels']} ({inf['aten']} + {inf['triton']}) | {inf['kernels'] / ref['infer']['kernels']:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dtn", choices=["dtn", "mmoe", "ple"])
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--markdown", help="write the table here too")
    ap.add_argument("--json", help="write the counts (with the most frequent aten ops) as JSON")
    args = ap.parse_args()
    counts = count_all(args.model, args.batch)
    text = markdown(args.model, args.batch, counts)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=1, default=str))


if __name__ == "__main__":
    main()
