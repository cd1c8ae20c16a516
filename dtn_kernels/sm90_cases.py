"""The cases of the offline sm_90 check (``python -m dtn_kernels.sm90_check``): the shapes of every
op (the paper's, grouped mode's and the GPU tests'), in every precision, and the runners that call
each op's real launchers on ``meta`` tensors (inside ``_launch.capture`` they compile and record).

The GPU tests take their shapes from here too (through ``dtn_kernels.sm90_check``), so the check
compiles exactly what they launch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

PRECISIONS = {  # name -> (dtype name, allow_tf32)
    "fp32-ieee": ("float32", False),
    "fp32-tf32": ("float32", True),
    "bf16": ("bfloat16", None),
    "fp16": ("float16", None),
}

# ----------------------------------------------------------------------------- shapes

# (B, D, gated)
GATED_CROSS_PAPER = [(2048, 624, True), (4096, 624, True), (2048, 624, False)]
# (B, din, hidden, dv, do): the paper block, the serial second block, wider blocks
MASK_BLOCK_PAPER = [(2048, 624, 640, 624, 512), (4096, 624, 640, 624, 512), (2048, 624, 640, 512, 512),
                    (2048, 624, 640, 624, 1024), (2048, 624, 640, 624, 2048)]
# (B, S, H, books, N, d_c, d, deterministic)
HCNET_PAPER = [(2048, 32, 2, 1, 100_000, 16, 16, False), (4096, 32, 2, 1, 100_000, 16, 16, False),
               (2048, 32, 2, 1, 100_000, 16, 16, True)]
HCNET_WIDE = [(64, 400, 2, 1, 100_000, 16, 16, False)]  # 79,800 crosses: past the 65,535 grid-y limit
# (B, din, K, h, masked)
GATE_PAPER = [(2048, 624, 4, 512, False), (2048, 624, 6, 512, True), (4096, 624, 6, 512, False)]

# grouped mode at the paper's DTN configuration (two tasks: 3 MFI modules, 2 HCNets each; gates over 6
# candidates, 9 with the TSN): (G, shape of one member)
GROUPED_PAPER = {
    "gated_cross": [(3, (2048, 624, True)), (3, (4096, 624, True))],
    "mask_block": [(3, (2048, 624, 640, 624, 512)), (3, (4096, 624, 640, 624, 512))],
    "hcnet": [(6, (2048, 32, 2, 1, 100_000, 16, 16, False)), (6, (4096, 32, 2, 1, 100_000, 16, 16, False)),
              (6, (2048, 32, 2, 1, 100_000, 16, 16, True))],
    "softmax_mix": [(1, (2048, 6, 512)), (1, (2048, 9, 512)), (1, (4096, 9, 512))],
}

# the GPU tests' shapes (tests/test_triton_*.py import these)
GPU_TEST_SHAPES = {
    "gated_cross": [(67, 45, True), (67, 45, False)],
    "mask_block": [(129, 96, 80, 96, 64), (33, 40, 24, 40, 1030)],
    "hcnet": [(300, 8, 2, 1, 1000, 16, 16, False), (300, 8, 2, 2, 1000, 16, 16, True)],
    "softmax_gate": [(131, 47, 9, 65, True)],
}


@dataclass
class Case:
    op: str
    shape: tuple
    precision: str
    paper: bool
    run: Callable = field(repr=False)
    group: int = 0  # > 0: a group of that many modules in one launch (grouped mode)

    @property
    def label(self) -> str:
        return f"{self.op}{self.shape}{f' x{self.group} grouped' if self.group else ''} {self.precision}"


def _t(*shape, dtype="float32", group: int = 0):
    if group:
        shape = (group, *shape)
    return _t0(*shape, dtype=dtype)


def _t0(*shape, dtype="float32"):
    import torch

    return torch.empty(shape, device="meta", dtype=getattr(torch, dtype))


def _gated_cross(shape, dt, tf32, G=0):
    """One layer, or (G > 0) a group's first layer (x0 = xl = e shared) and a later one."""
    from .triton.triton_gated_cross import gated_cross_backward, gated_cross_forward

    B, D, gated = shape
    x0, w, b = _t(B, D, dtype=dt), _t(D, D, dtype=dt, group=G), _t(D, dtype=dt, group=G)
    wg = _t(D, D, dtype=dt, group=G) if gated else None
    for xl in ([x0] if not G else [x0, _t(B, D, dtype=dt, group=G)]):
        _, z, a = gated_cross_forward(x0, xl, w, b, wg, tf32)
        gated_cross_backward(_t(B, D, dtype=dt, group=G), x0, xl, w, b, wg, z, a, tf32)


def _mask_block(shape, dt, tf32, G=0):
    from .triton.triton_masknet import mask_block_backward, mask_block_forward

    B, din, hm, dv, do = shape
    e, v = _t(B, din, dtype=dt), _t(B, dv, dtype=dt, group=G)
    w1, b1 = _t(hm, din, dtype=dt, group=G), _t(hm, dtype=dt, group=G)
    w2, b2 = _t(dv, hm, dtype=dt, group=G), _t(dv, dtype=dt, group=G)
    w3, gamma, beta = _t(do, dv, dtype=dt, group=G), _t(do, dtype=dt, group=G), _t(do, dtype=dt, group=G)
    out, hid, mask, z, mean, rstd = mask_block_forward(e, v, w1, b1, w2, b2, w3, gamma, beta, 1e-5, tf32)
    mask_block_backward(_t(B, do, dtype=dt, group=G), e, v, w1, w2, w3, gamma, beta, hid, mask, z, mean, rstd,
                        tf32)


def _hcnet(shape, dt, tf32, G=0):
    from .triton.triton_hcnet import hcnet_backward, hcnet_forward

    B, S, H, books, N, dc, d, det = shape
    M = S * (S - 1) // 2
    ids, salts, seeds = _t(B, S, dtype="int64"), _t(S, dtype="int64"), _t(H, dtype="int64", group=G)
    cb, wr = _t(books, N, dc, dtype=dt, group=G), _t(d, H * dc, dtype=dt, group=G)
    attn = _t(B, M, dtype=dt, group=G)
    hcnet_forward(ids, salts, seeds, cb, wr, attn, tf32)
    hcnet_backward(_t(B, S, d, dtype=dt, group=G), ids, salts, seeds, cb, wr, attn, det, tf32)


def _softmax_gate(shape, dt, tf32):
    from .triton.triton_softmax_gate import softmax_gate_backward, softmax_gate_forward

    B, din, K, h, masked = shape
    x, experts, w, b = _t(B, din, dtype=dt), _t(B, K, h, dtype=dt), _t(K, din, dtype=dt), _t(K, dtype=dt)
    mask = _t(K, dtype="bool") if masked else None
    _, wts = softmax_gate_forward(x, experts, w, b, mask, tf32)
    softmax_gate_backward(_t(B, h, dtype=dt), _t(B, K, dtype=dt), x, experts, w, wts, tf32)


def _softmax_mix(shape, dt, tf32, G=0):
    """A gate from given logits: a column slice of every task's logits from one GEMM."""
    from .triton.triton_softmax_gate import softmax_gate_backward, softmax_gate_forward

    B, K, h = shape
    logits, experts = _t(B, 2 * K, dtype=dt)[:, :K], _t(B, K, h, dtype=dt)
    _, wts = softmax_gate_forward(logits, experts, None, None, None, tf32)
    softmax_gate_backward(_t(B, h, dtype=dt), None, logits, experts, None, wts, tf32)


RUNNERS = {"gated_cross": _gated_cross, "mask_block": _mask_block, "hcnet": _hcnet, "softmax_gate": _softmax_gate,
           "softmax_mix": _softmax_mix}


def cases() -> list[Case]:
    out = []
    paper = {"gated_cross": GATED_CROSS_PAPER, "mask_block": MASK_BLOCK_PAPER, "hcnet": HCNET_PAPER,
             "softmax_gate": GATE_PAPER}
    for op, shapes in paper.items():
        for shape in shapes:
            for prec in PRECISIONS:
                out.append(Case(op, shape, prec, True, RUNNERS[op]))
    for op, entries in GROUPED_PAPER.items():
        for G, shape in entries:
            for prec in PRECISIONS:
                out.append(Case(op, shape, prec, True, RUNNERS[op], group=G))
    for shape in HCNET_WIDE:
        out.append(Case("hcnet", shape, "bf16", False, _hcnet))
    for op, shapes in GPU_TEST_SHAPES.items():
        for shape in shapes:
            for prec in PRECISIONS:
                out.append(Case(op, shape, prec, False, RUNNERS[op]))
    return out

