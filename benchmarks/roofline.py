"""Roofline of the fused ops at the benchmark suite's shapes: the least a GPU must do, and the best
a fusion can gain over eager PyTorch.

    python benchmarks/roofline.py [--batch 2048 4096] [--markdown FILE]

For each op, forward + backward as the suite times it (``benchmarks/bench_<op>.py``: the module's
floating inputs and every parameter get gradients):

* **fused floor**: the fused design's memory traffic -- every input read once, every output and
  gradient written once, parameters read in the forward and again in the backward, their gradients
  written in fp32, plus what the design stores for its backward (the gated cross's pre-activations
  z and a) and HCNet's fp32 codebook as it is read (forward, backward) and its gradient zero-filled
  and written -- over the card's HBM bandwidth, or the op's FLOPs (no recomputation: the design
  recomputes nothing) over the card's peak for the precision, whichever is larger.
* **eager**: the reference module's forward + backward dispatched on ``meta`` tensors (no device,
  no data): every aten op that would launch a CUDA kernel is counted with the bytes of its
  tensor inputs and outputs and its FLOPs; each kernel's own roofline time summed gives eager's
  floor (launch gaps not included). ``eager floor / fused floor`` is the speed-up fusion can at
  best give.

Peak figures used (NVIDIA data sheets, dense, no sparsity): H100 SXM 3.35 TB/s HBM3, 989 TFLOP/s
bf16/fp16, 495 TFLOP/s TF32, 67 TFLOP/s fp32 (FMA); H200 SXM the same compute with 4.8 TB/s HBM3e;
H100 PCIe 2.0 TB/s, 756 / 378 / 51 TFLOP/s. ``floor_ms`` is what ``benchmarks/report.py`` divides
measured times by.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

CARDS = {  # name: (HBM bytes/s, {precision: FLOP/s})
    "H100 SXM": (3.35e12, {"bf16": 989e12, "fp16": 989e12, "fp32-tf32": 495e12, "fp32-ieee": 67e12}),
    "H200": (4.8e12, {"bf16": 989e12, "fp16": 989e12, "fp32-tf32": 495e12, "fp32-ieee": 67e12}),
    "H100 PCIe": (2.0e12, {"bf16": 756e12, "fp16": 756e12, "fp32-tf32": 378e12, "fp32-ieee": 51e12}),
}

# the suite's shapes (benchmarks/bench_*.py, benchmarks/harness.py)
NUM_FIELDS, EMBED_DIM, HIDDEN = 39, 16, 512
D = NUM_FIELDS * EMBED_DIM  # 624
GDCN_LAYERS = 2
MASK_HIDDEN = 640
HC_FIELDS, HC_HASHES, HC_BUCKETS, HC_DC = 32, 2, 100_000, 16
GATE_CANDIDATES = 6
EB_ROWS = 528 + 10_000  # the 32 Census-Income tables of bench_embedding_bag.py (528 rows) and the 10,000-row multi-valued table
EB_TABLES, EB_IDS_PER_SAMPLE = 33, 32 + 10  # one id per categorical table, 10 on average in the multi-valued one


def card_of(device_name: str) -> Optional[str]:
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name:
        return "H100 PCIe" if "PCIE" in name else "H100 SXM"
    return None


def _elt(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def minimum(op: str, batch: int, precision: str) -> tuple[float, float]:
    """(FLOPs, bytes) that forward + backward of ``op`` cannot avoid (see the module docstring)."""
    B, e = batch, _elt(precision)

    def params(n):  # read in forward and backward (compute dtype), gradient written in fp32
        return 2 * n * e + 4 * n

    if op == "gated_cross":
        # per layer: forward 4BD^2, backward 8BD^2 (dxl 4BD^2, [dW; dWg] 4BD^2): the design recomputes
        # nothing; it stores the pre-activations z, a (written forward, read backward: 4BD elements per
        # layer) because that is cheaper than the 4BD^2 FLOPs of recomputing them (see the module docs)
        flops = 12 * GDCN_LAYERS * B * D * D
        pre = GDCN_LAYERS * 4 * B * D * e
        return flops, 4 * B * D * e + pre + params(GDCN_LAYERS * (2 * D * D + D))
    if op == "mask_block":
        gemm = D * MASK_HIDDEN + MASK_HIDDEN * D + D * HIDDEN
        flops = 3 * 2 * B * gemm
        acts = B * (D + D + HIDDEN) * 2  # e, v, out forward; go, de, dv backward
        return flops, acts * e + params(gemm + MASK_HIDDEN + D + 2 * HIDDEN)
    if op == "hcnet":
        M = HC_FIELDS * (HC_FIELDS - 1) // 2
        hd = HC_HASHES * HC_DC
        # forward: weighted codeword sums (each cross for both its fields) and restoring; backward:
        # <codewords, g>, the codebook contributions, g = G W_o and the dW_o products
        flops = 2 * B * M * hd * 2 + 2 * B * HC_FIELDS * hd * EMBED_DIM + 2 * B * M * hd * 2 + 4 * B * M * hd * EMBED_DIM
        acts = 2 * B * NUM_FIELDS * EMBED_DIM + 2 * B * HC_FIELDS * EMBED_DIM  # E, dE, U, dU
        ids = B * HC_FIELDS * 8 * 2  # read forward and backward
        # the codebook stays fp32 (the kernels read it, and convert gathered rows, in registers): read
        # forward and backward, its dense fp32 gradient zero-filled then written (the atomics' rows)
        codebook = 4 * HC_BUCKETS * HC_DC * 4
        return flops, acts * e + ids + codebook + params(hd * EMBED_DIM)
    if op == "softmax_gate":
        K = GATE_CANDIDATES
        flops = 3 * 2 * B * D * K + 3 * 2 * B * K * HIDDEN
        acts = 2 * B * D + 2 * B * K * HIDDEN + B * HIDDEN * 2 + B * K  # x, dx, experts, dexp, out, go, weights
        return flops, acts * e + B * K * HIDDEN * e + params(K * D + K)  # experts read again by the backward
    if op == "embedding_bag":
        n = B * EB_IDS_PER_SAMPLE
        out = B * EB_TABLES * EMBED_DIM
        # ids + offsets read forward and backward, output written, its gradient read, dense grad written
        return 2 * n * EMBED_DIM * 2, 2 * (n + EB_TABLES * B) * 8 + 2 * out * e + EB_ROWS * EMBED_DIM * (e + 4)
    raise KeyError(op)


def floor_ms(op: str, mode: str, batch: int, precision: str, device_name: str) -> Optional[float]:
    """The fused floor in ms for the suite's ``op`` (forward + backward only), or None."""
    card = card_of(device_name or "")
    if card is None or mode != "fwd+bwd" or precision not in CARDS[card][1]:
        return None
    try:
        flops, nbytes = minimum(op, batch, precision)
    except KeyError:
        return None
    bw, peaks = CARDS[card]
    return max(nbytes / bw, flops / peaks[precision]) * 1e3


# ----------------------------------------------------------------------------- eager, on meta tensors

_FREE = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
         "select", "slice", "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "lift_fresh",
         "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "new_empty", "new_zeros", "_to_copy_noop",
         "_reshape_alias", "unsqueeze_", "view_as", "expand_as", "numpy_T", "diagonal", "clone_noop", "ones_like"}


def eager_profile(op: str, batch: int, precision: str) -> dict:
    """Kernels, bytes and FLOPs of the reference module's forward + backward (meta tensors, in the
    precision's dtype)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    kernels: list = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            if name not in _FREE and not name.startswith("_foreach_"):
                nbytes = 0
                for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
                    if isinstance(t, torch.Tensor):
                        nbytes += t.numel() * t.element_size()
                kernels.append((name, nbytes))
            return out

    module, inputs = _reference_case(op, batch)
    # in bf16 / fp16 the module and inputs are in that dtype: eager under autocast runs the same
    # kernels plus its casts (not counted here, so eager's bytes are if anything understated)
    module = module.to(dtype)
    inputs = tuple(t.detach().to(dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t
                   for t in inputs)
    flop_counter = FlopCounterMode(display=False)
    with flop_counter, Count():
        out = module(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.empty_like(out))
    return {"kernels": len(kernels), "bytes": sum(b for _, b in kernels), "flops": flop_counter.get_total_flops(),
            "per_kernel": kernels}


def _reference_case(op: str, batch: int):
    """The suite's reference module and inputs, on meta."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dtn.layers.gating import SoftmaxGate
    from dtn.layers.gdcn import CrossNetwork
    from dtn.layers.masknet import MaskBlock
    from dtn.layers.memonet import HCNet

    m = torch.device("meta")
    B = batch
    if op == "gated_cross":
        return CrossNetwork(D, GDCN_LAYERS, gated=True, device=m), (torch.empty(B, D, device=m, requires_grad=True),)
    if op == "mask_block":
        return MaskBlock(D, D, MASK_HIDDEN, HIDDEN, device=m), \
            (torch.empty(B, D, device=m, requires_grad=True), torch.empty(B, D, device=m, requires_grad=True))
    if op == "hcnet":
        net = HCNet(list(range(HC_FIELDS)), NUM_FIELDS, EMBED_DIM, num_hashes=HC_HASHES, num_buckets=HC_BUCKETS,
                    codebook_dim=HC_DC, device=m)
        return net, (torch.empty(B, NUM_FIELDS, EMBED_DIM, device=m, requires_grad=True),
                     torch.zeros(B, HC_FIELDS, device=m, dtype=torch.long))
    if op == "softmax_gate":
        return SoftmaxGate(D, GATE_CANDIDATES, device=m), \
            (torch.empty(B, D, device=m, requires_grad=True),
             torch.empty(B, GATE_CANDIDATES, HIDDEN, device=m, requires_grad=True))
    raise KeyError(op)


def eager_floor_ms(profile: dict, precision: str, card: str) -> float:
    """Sum over eager's kernels of each one's own roofline time (bytes / BW; FLOPs are added for the GEMMs)."""
    bw, peaks = CARDS[card]
    return (sum(b for _, b in profile["per_kernel"]) / bw + profile["flops"] / peaks[precision]) * 1e3


OPS = ("gated_cross", "mask_block", "hcnet", "softmax_gate")


def table(batches=(2048, 4096), precisions=("bf16", "fp32-tf32", "fp32-ieee")) -> str:
    lines = ["| op | B | precision | min FLOPs (G) | min bytes (MB) | fused floor H100 SXM (µs) | fused floor H200 (µs) "
             "| eager kernels | eager bytes (MB) | eager floor H100 SXM (µs) | best speed-up (H100) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for op in OPS:
        for B in batches:
            for prec in precisions:
                flops, nbytes = minimum(op, B, prec)
                f100 = floor_ms(op, "fwd+bwd", B, prec, "NVIDIA H100 80GB HBM3") * 1e3
                f200 = floor_ms(op, "fwd+bwd", B, prec, "NVIDIA H200") * 1e3
                prof = eager_profile(op, B, prec)
                e100 = eager_floor_ms(prof, prec, "H100 SXM") * 1e3
                lines.append(f"| {op} | {B} | {prec} | {flops / 1e9:.2f} | {nbytes / 1e6:.1f} | {f100:.1f} | {f200:.1f} | "
                             f"{prof['kernels']} | {prof['bytes'] / 1e6:.0f} | {e100:.1f} | {e100 / f100:.1f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--markdown", help="write the table here too")
    args = ap.parse_args()
    text = table(tuple(args.batch))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
