"""GDCN gated cross layer (and its ungated DCN-v2 form) in Triton, for one module or a group of G.

forward:  out[g] = x0[g] * (xl[g] W[g]^T + b[g]) * sigmoid(xl[g] Wg[g]^T) + xl[g]
  tensor cores (bf16/fp16, TF32): one pass over xl against W and Wg together (two fp32
  accumulators per tile; wgmma on sm_90), the bias, the sigmoid gate, the x0 product and the
  residual in the epilogue; nothing but ``out`` is written.
  IEEE fp32: cuBLAS computes the pre-activations [z | a] = xl [W; Wg]^T + [b; 0] in one (batched)
  GEMM and the same kernel runs as an element-wise epilogue over them (``FROM_PRE``).
backward: the same kernel shape recomputes z and s = sigmoid(a) (or reads them from the cuBLAS
  pre-activations) and writes dx0 and the two pre-activation gradients [dz | da] side by side
  ([G, B, 2D]); the plain GEMMs go to cuBLAS: dxl = go + [dz | da] [W; Wg] (one baddbmm),
  dW = dz^T xl, dWg = da^T xl (bmm), db = sum_b dz. No atomics: deterministic.
Groups: the G modules of one kind in DTN's MFI modules run in one launch (grid = G x tiles). An
input shared by all of them (the first layer's x0 = xl = e) is an expanded view with group stride
0: it is read, not copied.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import fused_gemm_in_triton, interpreting, resolve_tf32
from ._launch import Tiles, gemm_tiles, grid_1d, launch, pow2
from .triton_linear import GROUP_M, _tile_of, precision, rows_contiguous


@triton.jit
def _gated_cross_pre(xl_ptr, w_ptr, b_ptr, wg_ptr, pre_ptr, rm, rn, B, D,
                     FROM_PRE: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """z = xl W^T + b and the gate pre-activation a = xl Wg^T for one [BM, BN] tile (fp32); the
    pointers are already offset to this program's group."""
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
def _group_tile(B, D, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """(group g, row offsets, column offsets) of this program."""
    tiles = tl.cdiv(B, BM) * tl.cdiv(D, BN)
    pid = tl.program_id(0)
    g = pid // tiles
    pid_m, pid_n = _tile_of(pid % tiles, B, D, BM, BN, GROUP)
    return g.to(tl.int64), pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)


@triton.jit
def _gated_cross_fwd_kernel(x0_ptr, xl_ptr, w_ptr, b_ptr, wg_ptr, pre_ptr, out_ptr, B, D, s_x0, s_xl,
                            FROM_PRE: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    g, rm, rn = _group_tile(B, D, BM, BN, GROUP)
    bd = B.to(tl.int64) * D
    z, a = _gated_cross_pre(xl_ptr + g * s_xl, w_ptr + g * D * D, b_ptr + g * D, wg_ptr + g * D * D,
                            pre_ptr + g * bd * (2 if GATED else 1), rm, rn, B, D, FROM_PRE, GATED, PRECISION,
                            BM, BN, BK)
    if GATED:
        z = z * tl.sigmoid(a)
    off = rm.to(tl.int64)[:, None] * D + rn[None, :]
    msk = (rm[:, None] < B) & (rn[None, :] < D)
    x0 = tl.load(x0_ptr + g * s_x0 + off, mask=msk, other=0.0).to(tl.float32)
    xl = tl.load(xl_ptr + g * s_xl + off, mask=msk, other=0.0).to(tl.float32)
    tl.store(out_ptr + g * bd + off, (x0 * z + xl).to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _gated_cross_bwd_kernel(x0_ptr, xl_ptr, w_ptr, b_ptr, wg_ptr, pre_ptr, go_ptr, dx0_ptr, dzda_ptr, B, D,
                            s_x0, s_xl,
                            FROM_PRE: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    g, rm, rn = _group_tile(B, D, BM, BN, GROUP)
    bd = B.to(tl.int64) * D
    width = 2 * D if GATED else D
    z, a = _gated_cross_pre(xl_ptr + g * s_xl, w_ptr + g * D * D, b_ptr + g * D, wg_ptr + g * D * D,
                            pre_ptr + g * B.to(tl.int64) * width, rm, rn, B, D, FROM_PRE, GATED, PRECISION,
                            BM, BN, BK)
    rm64 = rm.to(tl.int64)
    off = rm64[:, None] * D + rn[None, :]
    msk = (rm[:, None] < B) & (rn[None, :] < D)
    x0 = tl.load(x0_ptr + g * s_x0 + off, mask=msk, other=0.0).to(tl.float32)
    go = tl.load(go_ptr + g * bd + off, mask=msk, other=0.0).to(tl.float32)
    dz_off = g * B.to(tl.int64) * width + rm64[:, None] * width + rn[None, :]
    if GATED:
        s = tl.sigmoid(a)
        tl.store(dx0_ptr + g * bd + off, (go * z * s).to(dx0_ptr.dtype.element_ty), mask=msk)
        gx = go * x0
        tl.store(dzda_ptr + dz_off, (gx * s).to(dzda_ptr.dtype.element_ty), mask=msk)
        tl.store(dzda_ptr + dz_off + D, (gx * z * s * (1.0 - s)).to(dzda_ptr.dtype.element_ty), mask=msk)
    else:
        tl.store(dx0_ptr + g * bd + off, (go * z).to(dx0_ptr.dtype.element_ty), mask=msk)
        tl.store(dzda_ptr + dz_off, (go * x0).to(dzda_ptr.dtype.element_ty), mask=msk)


def _grouped(x0, xl, weight, bias, gate_weight):
    """Everything in group form ([G, B, D], [G, D, D], [G, D]); returns (..., was_grouped)."""
    grouped = weight.dim() == 3
    if not grouped:
        x0, xl, weight, bias = x0[None], xl[None], weight[None], bias[None]
        gate_weight = gate_weight[None] if gate_weight is not None else None
    G, D = weight.shape[0], weight.shape[-1]
    B = xl.shape[-2]
    x0, xl = x0.expand(G, B, D), xl.expand(G, B, D)
    return (rows_contiguous(x0), rows_contiguous(xl), weight.contiguous(), bias.contiguous(),
            gate_weight.contiguous() if gate_weight is not None else None, grouped)


def _plan(xl, weight, bias, gate_weight, allow_tf32):
    """(tiles, precision, pre): fused tensor-core tiles, or cuBLAS pre-activations + element-wise tiles."""
    G, B, D = xl.shape
    tf32 = resolve_tf32(allow_tf32)
    if fused_gemm_in_triton(xl.dtype, tf32):
        return gemm_tiles(B, D, D, xl.dtype, xl.device, two_acc=True, groups=G), precision(tf32), None
    w_all = torch.cat([weight, gate_weight], dim=1) if gate_weight is not None else weight  # [G, 2D, D]
    b_all = torch.cat([bias, torch.zeros_like(bias)], dim=1) if gate_weight is not None else bias
    pre = torch.baddbmm(b_all[:, None, :], xl, w_all.transpose(1, 2))
    if interpreting():
        return Tiles(16, min(32, pow2(D)), 16, 1, 1), "ieee", pre
    return Tiles(64, min(64, pow2(D)), 16, 4, 1), "ieee", pre


def _launch(kernel, tiles, prec, pre, gated, x0, xl, *args):
    G, B, D = xl.shape
    grid = grid_1d(G * triton.cdiv(B, tiles.BM) * triton.cdiv(D, tiles.BN))
    launch(kernel, grid, *args, B, D, x0.stride(0), xl.stride(0), FROM_PRE=pre is not None, GATED=gated,
           PRECISION=prec, BM=tiles.BM, BN=tiles.BN, BK=tiles.BK, GROUP=GROUP_M, num_warps=tiles.warps,
           num_stages=tiles.stages, dot_m=None if pre is not None else tiles.BM)


def gated_cross_forward(x0, xl, weight, bias, gate_weight=None, allow_tf32=None) -> torch.Tensor:
    """out [B, D] for one layer (weight [D, D]) or [G, B, D] for a group (weight [G, D, D]; x0 / xl
    [G, B, D] or a shared [B, D])."""
    x0, xl, weight, bias, gate_weight, grouped = _grouped(x0, xl, weight, bias, gate_weight)
    G, B, D = xl.shape
    gated = gate_weight is not None
    wg = gate_weight if gated else weight
    out = torch.empty((G, B, D), device=xl.device, dtype=xl.dtype)
    if B > 0 and D > 0 and G > 0:
        tiles, prec, pre = _plan(xl, weight, bias, gate_weight, allow_tf32)
        _launch(_gated_cross_fwd_kernel, tiles, prec, pre, gated, x0, xl,
                x0, xl, weight, bias, wg, pre if pre is not None else xl, out)
    return out if grouped else out[0]


def gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight=None, allow_tf32=None):
    """Returns (dx0, dxl, dW, db, dWg) in the inputs' shapes (dWg None when ungated); for a shared
    x0 / xl ([B, D] with a grouped weight) the gradients are summed over the group."""
    shapes = (x0.shape, xl.shape)
    x0, xl, weight, bias, gate_weight, grouped = _grouped(x0, xl, weight, bias, gate_weight)
    G, B, D = xl.shape
    go = grad_out.to(xl.dtype).reshape(G, B, D).contiguous()  # the kernel reads members packed: g * B * D
    gated = gate_weight is not None
    wg = gate_weight if gated else weight
    dx0 = torch.empty((G, B, D), device=xl.device, dtype=xl.dtype)
    dzda = torch.empty((G, B, 2 * D if gated else D), device=xl.device, dtype=xl.dtype)
    if B > 0 and D > 0 and G > 0:
        tiles, prec, pre = _plan(xl, weight, bias, gate_weight, allow_tf32)
        _launch(_gated_cross_bwd_kernel, tiles, prec, pre, gated, x0, xl,
                x0, xl, weight, bias, wg, pre if pre is not None else xl, go, dx0, dzda)
    else:
        dx0.zero_()
        dzda.zero_()
    # plain GEMMs: cuBLAS (tuned per card, split-K when the batch is the reduction)
    w_all = torch.cat([weight, wg], dim=1) if gated else weight  # [G, 2D, D]: small next to B*D
    dxl = torch.baddbmm(go, dzda, w_all.to(xl.dtype))
    dz = dzda[..., :D]
    dW = torch.bmm(dz.transpose(1, 2), xl).to(weight.dtype)
    dWg = torch.bmm(dzda[..., D:].transpose(1, 2), xl).to(wg.dtype) if gated else None
    db = dz.sum(1).to(bias.dtype)
    if not grouped:
        dx0, dxl, dW, db, dWg = dx0[0], dxl[0], dW[0], db[0], (dWg[0] if gated else None)
    else:  # a group input shared by every member ([B, D]) gets the sum of the members' gradients
        dx0 = dx0.sum(0) if len(shapes[0]) == 2 else dx0
        dxl = dxl.sum(0) if len(shapes[1]) == 2 else dxl
    return dx0, dxl, dW, db, dWg
