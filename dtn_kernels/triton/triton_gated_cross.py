"""GDCN gated cross layer (and its ungated DCN-v2 form) in Triton.

forward:  out = x0 * (xl W^T + b) * sigmoid(xl Wg^T) + xl
  one pass over xl against W and Wg together (two fp32 accumulators per tile), the bias,
  the sigmoid gate, the x0 product and the residual in the epilogue; nothing but ``out``
  is written.
backward: one kernel recomputes z = xl W^T + b and s = sigmoid(xl Wg^T) tile by tile and
  writes dx0 plus the two pre-activation gradients [dz | da] side by side ([B, 2D]);
  then three GEMMs: dxl = go + [dz | da] @ [W; Wg], dW = dz^T xl (+ db as its row sums),
  dWg = da^T xl. No atomics: deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_linear import EPI_ADD, INTERPRET, gemm, pow2, precision


def _blocks(B: int, D: int):
    if INTERPRET:
        return 16, min(32, pow2(D)), min(32, pow2(D)), 1
    return min(64, pow2(B)), min(64, pow2(D)), min(32, pow2(D)), 4


@triton.jit
def _gated_cross_tile(xl_ptr, w_ptr, b_ptr, wg_ptr, rm, rn, B, D,
                      GATED: tl.constexpr, PRECISION: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """z = xl W^T + b and the gate pre-activation xl Wg^T for one [BM, BN] tile (fp32)."""
    rk = tl.arange(0, BK)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc_h = tl.zeros((BM, BN), dtype=tl.float32)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + rk
        x = tl.load(xl_ptr + rm64[:, None] * D + kk[None, :], mask=(rm[:, None] < B) & (kk[None, :] < D), other=0.0)
        w_off = rn64[None, :] * D + kk[:, None]  # W^T tile [BK, BN]
        w_msk = (kk[:, None] < D) & (rn[None, :] < D)
        acc_h = tl.dot(x, tl.load(w_ptr + w_off, mask=w_msk, other=0.0).to(x.dtype), acc_h, input_precision=PRECISION)
        if GATED:
            acc_g = tl.dot(x, tl.load(wg_ptr + w_off, mask=w_msk, other=0.0).to(x.dtype), acc_g,
                           input_precision=PRECISION)
    z = acc_h + tl.load(b_ptr + rn, mask=rn < D, other=0.0).to(tl.float32)[None, :]
    return z, acc_g


@triton.jit
def _gated_cross_fwd_kernel(x0_ptr, xl_ptr, w_ptr, b_ptr, wg_ptr, out_ptr, B, D,
                            GATED: tl.constexpr, PRECISION: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    z, g = _gated_cross_tile(xl_ptr, w_ptr, b_ptr, wg_ptr, rm, rn, B, D, GATED, PRECISION, BM, BN, BK)
    if GATED:
        z = z * (1.0 / (1.0 + tl.exp(-g)))
    off = rm.to(tl.int64)[:, None] * D + rn[None, :]
    msk = (rm[:, None] < B) & (rn[None, :] < D)
    x0 = tl.load(x0_ptr + off, mask=msk, other=0.0).to(tl.float32)
    xl = tl.load(xl_ptr + off, mask=msk, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, (x0 * z + xl).to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _gated_cross_bwd_kernel(x0_ptr, xl_ptr, w_ptr, b_ptr, wg_ptr, go_ptr, dx0_ptr, dzda_ptr, B, D,
                            GATED: tl.constexpr, PRECISION: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    z, g = _gated_cross_tile(xl_ptr, w_ptr, b_ptr, wg_ptr, rm, rn, B, D, GATED, PRECISION, BM, BN, BK)
    rm64 = rm.to(tl.int64)
    off = rm64[:, None] * D + rn[None, :]
    msk = (rm[:, None] < B) & (rn[None, :] < D)
    x0 = tl.load(x0_ptr + off, mask=msk, other=0.0).to(tl.float32)
    go = tl.load(go_ptr + off, mask=msk, other=0.0).to(tl.float32)
    width = 2 * D if GATED else D
    dz_off = rm64[:, None] * width + rn[None, :]
    if GATED:
        s = 1.0 / (1.0 + tl.exp(-g))
        tl.store(dx0_ptr + off, (go * z * s).to(dx0_ptr.dtype.element_ty), mask=msk)
        gx = go * x0
        tl.store(dzda_ptr + dz_off, (gx * s).to(dzda_ptr.dtype.element_ty), mask=msk)
        tl.store(dzda_ptr + dz_off + D, (gx * z * s * (1.0 - s)).to(dzda_ptr.dtype.element_ty), mask=msk)
    else:
        tl.store(dx0_ptr + off, (go * z).to(dx0_ptr.dtype.element_ty), mask=msk)
        tl.store(dzda_ptr + dz_off, (go * x0).to(dzda_ptr.dtype.element_ty), mask=msk)


def gated_cross_forward(x0, xl, weight, bias, gate_weight=None, allow_tf32: bool = False) -> torch.Tensor:
    B, D = xl.shape
    x0, xl, weight, bias = x0.contiguous(), xl.contiguous(), weight.contiguous(), bias.contiguous()
    gated = gate_weight is not None
    wg = gate_weight.contiguous() if gated else weight
    out = torch.empty_like(xl)
    if B == 0 or D == 0:
        return out
    BM, BN, BK, warps = _blocks(B, D)
    grid = (triton.cdiv(B, BM), triton.cdiv(D, BN))
    _gated_cross_fwd_kernel[grid](x0, xl, weight, bias, wg, out, B, D, GATED=gated,
                                  PRECISION=precision(allow_tf32), BM=BM, BN=BN, BK=BK, num_warps=warps)
    return out


def gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight=None, allow_tf32: bool = False):
    """Returns (dx0, dxl, dW, db, dWg) (dWg None when ungated)."""
    B, D = xl.shape
    x0, xl, weight, bias = x0.contiguous(), xl.contiguous(), weight.contiguous(), bias.contiguous()
    go = grad_out.contiguous().to(xl.dtype)
    gated = gate_weight is not None
    wg = gate_weight.contiguous() if gated else weight
    width = 2 * D if gated else D
    dx0 = torch.empty_like(x0)
    dzda = torch.empty((B, width), device=xl.device, dtype=xl.dtype)
    if B > 0 and D > 0:
        BM, BN, BK, warps = _blocks(B, D)
        grid = (triton.cdiv(B, BM), triton.cdiv(D, BN))
        _gated_cross_bwd_kernel[grid](x0, xl, weight, bias, wg, go, dx0, dzda, B, D, GATED=gated,
                                      PRECISION=precision(allow_tf32), BM=BM, BN=BN, BK=BK, num_warps=warps)
    w_all = torch.cat([weight, wg], dim=0) if gated else weight  # [W; Wg]: 2D^2, small next to B*D
    dxl = gemm(dzda, w_all.to(xl.dtype), aux=go, epilogue=EPI_ADD, allow_tf32=allow_tf32)
    dW, db = gemm(dzda[:, :D].t(), xl, rowsum=True, out_dtype=weight.dtype, allow_tf32=allow_tf32)
    dWg = gemm(dzda[:, D:].t(), xl, out_dtype=wg.dtype, allow_tf32=allow_tf32) if gated else None
    return dx0, dxl, dW, db.to(bias.dtype), dWg
