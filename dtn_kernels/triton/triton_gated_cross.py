"""GDCN gated cross layer (and its ungated DCN-v2 form) in Triton.

forward:  out = x0 * (xl W^T + b) * sigmoid(xl Wg^T) + xl
  tensor cores (bf16/fp16, TF32): one pass over xl against W and Wg together (two fp32
  accumulators per tile; wgmma on sm_90), the bias, the sigmoid gate, the x0 product and the
  residual in the epilogue; nothing but ``out`` is written.
  IEEE fp32: cuBLAS computes the pre-activations [z | a] = xl [W; Wg]^T + [b; 0] in one GEMM and
  the same kernel runs as an element-wise epilogue over them (``FROM_PRE``).
backward: the same kernel shape recomputes z and s = sigmoid(a) (or reads them from the cuBLAS
  pre-activations) and writes dx0 and the two pre-activation gradients [dz | da] side by side
  ([B, 2D]); the plain GEMMs go to cuBLAS: dxl = go + [dz | da] [W; Wg] (one addmm),
  dW = dz^T xl, dWg = da^T xl, db = sum_b dz. No atomics: deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import fused_gemm_in_triton, interpreting, resolve_tf32
from ._launch import Tiles, gemm_tiles, grid_1d, launch, pow2
from .triton_linear import GROUP_M, _tile_of, precision


@triton.jit
def _gated_cross_pre(xl_ptr, w_ptr, b_ptr, wg_ptr, pre_ptr, rm, rn, B, D,
                     FROM_PRE: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """z = xl W^T + b and the gate pre-activation a = xl Wg^T for one [BM, BN] tile (fp32)."""
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    if FROM_PRE:  # [z | a] computed by cuBLAS, bias included
        width = 2 * D if GATED else D
        off = rm64[:, None] * width + rn64[None, :]
        msk = (rm[:, None] < B) & (rn[None, :] < D)
        z = tl.load(pre_ptr + off, mask=msk, other=0.0).to(tl.float32)
        g = z
        if GATED:
            g = tl.load(pre_ptr + off + D, mask=msk, other=0.0).to(tl.float32)
        return z, g
    rk = tl.arange(0, BK)
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
def _gated_cross_fwd_kernel(x0_ptr, xl_ptr, w_ptr, b_ptr, wg_ptr, pre_ptr, out_ptr, B, D,
                            FROM_PRE: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    pid_m, pid_n = _tile_of(tl.program_id(0), B, D, BM, BN, GROUP)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    z, g = _gated_cross_pre(xl_ptr, w_ptr, b_ptr, wg_ptr, pre_ptr, rm, rn, B, D, FROM_PRE, GATED, PRECISION,
                            BM, BN, BK)
    if GATED:
        z = z * tl.sigmoid(g)
    off = rm.to(tl.int64)[:, None] * D + rn[None, :]
    msk = (rm[:, None] < B) & (rn[None, :] < D)
    x0 = tl.load(x0_ptr + off, mask=msk, other=0.0).to(tl.float32)
    xl = tl.load(xl_ptr + off, mask=msk, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, (x0 * z + xl).to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _gated_cross_bwd_kernel(x0_ptr, xl_ptr, w_ptr, b_ptr, wg_ptr, pre_ptr, go_ptr, dx0_ptr, dzda_ptr, B, D,
                            FROM_PRE: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    pid_m, pid_n = _tile_of(tl.program_id(0), B, D, BM, BN, GROUP)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    z, g = _gated_cross_pre(xl_ptr, w_ptr, b_ptr, wg_ptr, pre_ptr, rm, rn, B, D, FROM_PRE, GATED, PRECISION,
                            BM, BN, BK)
    rm64 = rm.to(tl.int64)
    off = rm64[:, None] * D + rn[None, :]
    msk = (rm[:, None] < B) & (rn[None, :] < D)
    x0 = tl.load(x0_ptr + off, mask=msk, other=0.0).to(tl.float32)
    go = tl.load(go_ptr + off, mask=msk, other=0.0).to(tl.float32)
    width = 2 * D if GATED else D
    dz_off = rm64[:, None] * width + rn[None, :]
    if GATED:
        s = tl.sigmoid(g)
        tl.store(dx0_ptr + off, (go * z * s).to(dx0_ptr.dtype.element_ty), mask=msk)
        gx = go * x0
        tl.store(dzda_ptr + dz_off, (gx * s).to(dzda_ptr.dtype.element_ty), mask=msk)
        tl.store(dzda_ptr + dz_off + D, (gx * z * s * (1.0 - s)).to(dzda_ptr.dtype.element_ty), mask=msk)
    else:
        tl.store(dx0_ptr + off, (go * z).to(dx0_ptr.dtype.element_ty), mask=msk)
        tl.store(dzda_ptr + dz_off, (go * x0).to(dzda_ptr.dtype.element_ty), mask=msk)


def _plan(xl, weight, bias, gate_weight, allow_tf32):
    """(tiles, precision, pre): fused tensor-core tiles, or cuBLAS pre-activations + element-wise tiles."""
    B, D = xl.shape
    tf32 = resolve_tf32(allow_tf32)
    if fused_gemm_in_triton(xl.dtype, tf32):
        return gemm_tiles(B, D, D, xl.dtype, xl.device, two_acc=True), precision(tf32), None
    if gate_weight is not None:
        pre = torch.addmm(torch.cat([bias, bias.new_zeros(D)]), xl, torch.cat([weight, gate_weight]).t())
    else:
        pre = torch.addmm(bias, xl, weight.t())
    if interpreting():
        return Tiles(16, min(32, pow2(D)), 16, 1, 1), "ieee", pre
    return Tiles(64, min(64, pow2(D)), 16, 4, 1), "ieee", pre


def _launch(kernel, tiles, prec, pre, gated, B, D, *args):
    grid = grid_1d(triton.cdiv(B, tiles.BM) * triton.cdiv(D, tiles.BN))
    launch(kernel, grid, *args, B, D, FROM_PRE=pre is not None, GATED=gated, PRECISION=prec,
           BM=tiles.BM, BN=tiles.BN, BK=tiles.BK, GROUP=GROUP_M, num_warps=tiles.warps, num_stages=tiles.stages,
           dot_m=None if pre is not None else tiles.BM)


def gated_cross_forward(x0, xl, weight, bias, gate_weight=None, allow_tf32=None) -> torch.Tensor:
    B, D = xl.shape
    x0, xl, weight, bias = x0.contiguous(), xl.contiguous(), weight.contiguous(), bias.contiguous()
    gated = gate_weight is not None
    wg = gate_weight.contiguous() if gated else weight
    out = torch.empty_like(xl)
    if B == 0 or D == 0:
        return out
    tiles, prec, pre = _plan(xl, weight, bias, gate_weight, allow_tf32)
    _launch(_gated_cross_fwd_kernel, tiles, prec, pre, gated, B, D,
            x0, xl, weight, bias, wg, pre if pre is not None else xl, out)
    return out


def gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight=None, allow_tf32=None):
    """Returns (dx0, dxl, dW, db, dWg) (dWg None when ungated)."""
    B, D = xl.shape
    x0, xl, weight, bias = x0.contiguous(), xl.contiguous(), weight.contiguous(), bias.contiguous()
    go = grad_out.contiguous().to(xl.dtype)
    gated = gate_weight is not None
    wg = gate_weight.contiguous() if gated else weight
    dx0 = torch.empty_like(x0)
    dzda = torch.empty((B, 2 * D if gated else D), device=xl.device, dtype=xl.dtype)
    if B > 0 and D > 0:
        tiles, prec, pre = _plan(xl, weight, bias, gate_weight, allow_tf32)
        _launch(_gated_cross_bwd_kernel, tiles, prec, pre, gated, B, D,
                x0, xl, weight, bias, wg, pre if pre is not None else xl, go, dx0, dzda)
    else:
        dzda.zero_()
    # plain GEMMs: cuBLAS (tuned per card, split-K when the batch is the reduction)
    w_all = torch.cat([weight, wg]) if gated else weight  # [W; Wg]: 2D^2, small next to B*D
    dxl = torch.addmm(go, dzda, w_all.to(xl.dtype))
    dz = dzda[:, :D]
    dW = dz.t().mm(xl).to(weight.dtype)
    dWg = dzda[:, D:].t().mm(xl).to(wg.dtype) if gated else None
    return dx0, dxl, dW, dz.sum(0).to(bias.dtype), dWg
