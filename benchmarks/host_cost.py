"""What one DTN training step costs the host, per kernel mode, measured on the CPU (no GPU needed),
beside the roofline's GPU time for the same step.

    python benchmarks/host_cost.py [--batch 2048] [--aten-launch-us 3] [--triton-launch-us 10]
                                   [--steps 15] [--markdown FILE] [--json FILE]

**Host time** = the step's Python + dispatcher + autograd time, measured, plus its kernel count times
a stated launch cost:

* *measured*: one training step (zero_grad, forward, BCE over both tasks, backward) run the way a GPU
  runs it -- ``dtn_kernels.triton._launch.count_launches()``: the ops take their GPU path, with the
  same wrappers, launchers and tile choices, and every Triton launch is recorded instead of run;
  the reference embedding bag takes its device path (no value checks) -- on CPU tensors made so small
  that the arithmetic is negligible next to the dispatch: the paper's model with every width shrunk
  (d = 4, FIM width 8, hidden layers of 8, 37 MemoNet buckets; same fields, tasks, layer counts and
  modules) at batch 16. The host does the same work per op at any size: the script checks that the
  shrunk step issues the kernels of the paper's widths (the same Triton launches; aten kernels
  within 5%: some wrappers take a size-dependent route, e.g. grouped mode's shrunk step issues 214
  aten kernels where the paper's widths issue 205, fused 308 against 306, so the measured dispatch
  is if anything high; the launch term uses the paper's counts). The median CPU time
  of this process over ``--steps`` interleaved rounds (each runs every mode once, the first mode
  rotating), one thread: an upper bound of the dispatch cost (what CPU
  arithmetic is left is counted too). (Meta tensors were tried first: their shape functions run in
  Python, about 2 ms an op here, so they measure the meta kernels, not the dispatcher; the paper's
  widths at batch 16 on CPU tensors measure about 50 ms of weight-sized arithmetic per step.)
* *launches*: aten kernels (counted as ``benchmarks/count_launches.py`` counts them) times
  ``--aten-launch-us`` (default 3 µs: ``cudaLaunchKernel`` from ATen's CUDA path, on top of the
  dispatch measured above) and Triton launches times ``--triton-launch-us`` (default 10 µs: Triton's
  Python launcher -- argument binding, specialisation key, cache lookup -- plus the driver call).
  Both are stated assumptions, not measurements; change them with the flags.

The optimizer step is left out of the measured part (Adam's update of about 10 M parameters is
arithmetic on the CPU, one fused multi-tensor kernel on a GPU, the same in every mode); its launch
is in the kernel count.

**GPU time** (``benchmarks/roofline.py``, H100 SXM): reference = the reference model's forward +
backward dispatched on ``meta`` tensors at ``--batch`` (paper config, 100,000 buckets), each aten
op's own roofline time summed (launch gaps excluded); fused / grouped = that minus, for every fused
module of the step, its eager floor minus its fused floor at the suite's op shapes (the modules of a
step have those shapes; the gates' candidate count is the suite's 6). Grouped mode does the same
arithmetic as fused, in fewer launches, so it gets the same floor.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import count_launches as CL  # noqa: E402
import dtn_kernels  # noqa: E402
from dtn_kernels.reference.pt_embedding_bag import device_path  # noqa: E402
from dtn_kernels.triton._launch import count_launches  # noqa: E402

MODES = CL.MODES
SMALL_BATCH = 16
# the fused modules of a step and the roofline op each stands for
FUSED_MODULES = {"CrossNetwork": "gated_cross", "MaskBlock": "mask_block", "HCNet": "hcnet",
                 "SoftmaxGate": "softmax_gate"}


def build(batch: int, shrunk: bool):
    from bench_model import batch_of, schema

    from dtn.config import load_config
    from dtn.models import build_model

    cfg = load_config("paper").model
    if shrunk:  # same modules and layer counts, every width tiny
        cfg = copy.deepcopy(cfg)
        cfg.embed_dim, cfg.fim_dim = 4, 8
        cfg.tower_hidden = [8] * len(cfg.tower_hidden)
        cfg.expert_hidden = [8] * len(cfg.expert_hidden)
        cfg.bottom_hidden = [8] * len(cfg.bottom_hidden)
        cfg.masknet = dict(cfg.masknet, mask_hidden=10, block_dim=8)
        cfg.memonet = dict(cfg.memonet, num_buckets=37, codebook_dim=4)
    torch.manual_seed(0)
    model = build_model("dtn", schema(), cfg)
    model.input_layer.validate = False  # on a GPU the host batch is checked before the copy
    return model, *batch_of(batch)


def measure(models: dict, batch, labels, steps: int) -> dict:
    """{mode: median / min CPU ms of this process per forward + backward} on the GPU path (see the
    docstring), the modes interleaved: round r runs every mode once, the first mode rotating."""
    def step(model):
        model.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(batch), labels).backward()

    names = list(models)
    times: dict = {m: [] for m in names}
    with device_path(), count_launches():
        for m in names:
            step(models[m])
            step(models[m])
        for r in range(steps):
            for m in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.process_time()
                step(models[m])
                times[m].append(time.process_time() - t0)
    return {m: {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3} for m, ts in times.items()}


def custom_op_share(model, batch, labels) -> dict:
    """{op: CPU ms} of one forward + backward under the torch profiler, by outermost ``dtn::`` custom
    op (its Python implementation, launchers and wrapper aten ops included), and ``-`` for the rest
    (the profiler's own overhead inflates both alike)."""
    from torch.profiler import ProfilerActivity, profile

    with device_path(), count_launches():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(batch), labels).backward()
    share: dict = {}
    total = 0.0
    for ev in prof.events():
        if ev.cpu_parent is None:
            total += ev.cpu_time_total
        if not ev.name.startswith("dtn::"):
            continue
        p = ev.cpu_parent
        while p is not None and not p.name.startswith("dtn::"):
            p = p.cpu_parent
        if p is None:  # outermost custom op
            share[ev.name] = share.get(ev.name, 0.0) + ev.cpu_time_total / 1e3
    share["-"] = total / 1e3 - sum(share.values())
    return dict(sorted(share.items(), key=lambda kv: -kv[1]))


def gpu_floor_ms(batch: int, precision: str, card: str = "H100 SXM") -> dict:
    """The roofline's GPU time of one step per mode (see the docstring)."""
    import roofline as R
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    model, fb, labels = build(batch, False)
    counts = {op: 0 for op in FUSED_MODULES.values()}
    for m in model.modules():
        if type(m).__name__ in FUSED_MODULES:
            counts[FUSED_MODULES[type(m).__name__]] += 1
    dtype = {"bf16": torch.bfloat16}.get(precision, torch.float32)
    model = model.to(device="meta", dtype=dtype)
    fb = fb.to("meta")
    kernels: list = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            if name not in R._FREE and not name.startswith("_foreach_"):
                kernels.append(sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
                                   if isinstance(t, torch.Tensor)))
            return out

    flops = FlopCounterMode(display=False)
    with device_path(), flops, Count():
        logits = model(fb)
        logits.float().sum().backward()
    ref = R.eager_floor_ms({"per_kernel": [("k", b) for b in kernels], "flops": flops.get_total_flops()},
                           precision, card)
    saved = 0.0
    for op, n in counts.items():
        if n:
            eager = R.eager_floor_ms(R.eager_profile(op, batch, precision), precision, card)
            saved += n * (eager - R.floor_ms(op, "fwd+bwd", batch, precision, card))
    fused = ref - saved
    return {"reference": ref, "fused": fused, "grouped": fused, "modules": counts, "card": card}


def host_costs(batch: int, aten_us: float, triton_us: float, steps: int) -> dict:
    base, fb, labels = build(SMALL_BATCH, True)
    paper, pfb, plabels = build(SMALL_BATCH, False)  # the launch count does not depend on the batch size
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    torch.set_num_threads(1)
    out, models = {}, {}
    try:
        for mode in MODES:
            model = models[mode] = copy.deepcopy(base)
            dtn_kernels.set_kernels(model, mode)
            with device_path():
                counts = CL.count_step(model, fb, labels, train=True)
                full = copy.deepcopy(paper)
                dtn_kernels.set_kernels(full, mode)
                at_paper = CL.count_step(full, pfb, plabels, train=True)
            if abs(at_paper["aten"] - counts["aten"]) > 0.05 * at_paper["aten"] or at_paper["triton"] != counts["triton"]:
                raise RuntimeError(f"{mode}: the shrunk step issues {counts['aten']} + {counts['triton']} kernels, "
                                   f"the paper's widths {at_paper['aten']} + {at_paper['triton']}: not the same work")
            out[mode] = {"paper": at_paper, "shrunk_aten": counts["aten"]}
        measured = measure(models, fb, labels, steps)
        shares = {mode: custom_op_share(models[mode], fb, labels) for mode in MODES}
        for mode in MODES:
            at_paper, host = out[mode]["paper"], measured[mode]
            launch_ms = (at_paper["aten"] * aten_us + at_paper["triton"] * triton_us) / 1e3
            out[mode] = {"aten": at_paper["aten"], "triton": at_paper["triton"], "host_syncs": at_paper["host_syncs"],
                         "shrunk_aten": out[mode]["shrunk_aten"], "aten_by_custom_op": at_paper["aten_by_custom_op"],
                         "dispatch_ms": host["median_ms"], "dispatch_min_ms": host["min_ms"], "launch_ms": launch_ms,
                         "host_ms": host["median_ms"] + launch_ms, "cpu_ms_by_custom_op": shares[mode]}
    finally:
        torch.set_float32_matmul_precision(prev)
    return out


def markdown(host: dict, gpu: dict, batch: int, aten_us: float, triton_us: float) -> str:
    lines = [f"Host cost of one DTN training step (forward + backward; paper config) against the roofline's GPU "
             f"time at B = {batch} on an {gpu['bf16']['card']} (`python benchmarks/host_cost.py`; launch costs "
             f"assumed: {aten_us:g} µs an aten kernel, {triton_us:g} µs a Triton launch):", "",
             "| mode | kernels (aten + Triton) | host syncs | dispatch ms, median (min) | launches ms (assumed) | host ms "
             "| GPU floor ms bf16 | GPU floor ms TF32 | bound by (bf16) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for mode in MODES:
        h = host[mode]
        g16, g32 = gpu["bf16"][mode], gpu["fp32-tf32"][mode]
        lines.append(f"| {mode} | {h['aten'] + h['triton']} ({h['aten']} + {h['triton']}) | {h['host_syncs']} | "
                     f"{h['dispatch_ms']:.2f} ({h['dispatch_min_ms']:.2f}) | {h['launch_ms']:.2f} | {h['host_ms']:.2f} | "
                     f"{g16:.2f} | {g32:.2f} | "
                     f"{'host' if h['host_ms'] > g16 else 'GPU'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--aten-launch-us", type=float, default=3.0)
    ap.add_argument("--triton-launch-us", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    args = ap.parse_args()
    host = host_costs(args.batch, args.aten_launch_us, args.triton_launch_us, args.steps)
    gpu = {p: gpu_floor_ms(args.batch, p) for p in ("bf16", "fp32-tf32")}
    text = markdown(host, gpu, args.batch, args.aten_launch_us, args.triton_launch_us)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host, "gpu": gpu}, indent=1, default=str))


if __name__ == "__main__":
    main()
