"""GDCN gated cross layer (and its ungated DCN-v2 form) in Triton, for one module or a group of G.

forward:  out[g] = x0[g] * z[g] * sigmoid(a[g]) + xl[g],   z = xl W^T + b,  a = xl Wg^T
  tensor cores (bf16/fp16, TF32): one pass over xl against W and Wg together (two fp32
  accumulators per tile; wgmma on sm_90), the bias, the sigmoid gate, the x0 product and the
  residual in the epilogue, which also writes the pre-activations z and a (compute dtype) for the
  backward when a gradient will be needed (``save_pre``).
  IEEE fp32: cuBLAS computes z (addmm with the bias) and a (mm) -- two GEMMs on the separate
  weights, no concatenation -- and the same kernel runs as an element-wise epilogue over them
  (``FROM_PRE``).
backward: no GEMM is recomputed. Storing z and a costs 2BD elements written and read (10 MB in bf16
  at B = 2048, D = 624: 3 us of HBM on an H100) where recomputing them is 4BD^2 FLOPs (3.2 GFLOP:
  3.2 us at bf16 peak, 6.4 us at TF32 peak, 48 us in IEEE fp32), so the roofline says store
  (benchmarks/roofline.py counts it). An element-wise kernel reads z, a, x0 and the upstream
  gradient and writes dx0 and the two pre-activation gradients side by side, [dz | da]
  ([G, B, 2D]); then cuBLAS: dxl = go + dz W + da Wg (two accumulating GEMMs into one output),
  [dW; dWg] = [dz | da]^T xl (ONE GEMM, [G, 2D, D]; dW and dWg are its two halves, views), db =
  sum_b dz. No atomics: deterministic. FLOPs: 4BD^2 forward + 8BD^2 backward, the minimum.
Groups: the G modules of one kind in DTN's MFI modules run in one launch (grid = G x tiles). An
input shared by all of them (the first layer's x0 = xl = e) is an expanded view with group stride
0: it is read, not copied.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..precision import fused_gemm_in_triton, interpreting, resolve_tf32
from ._launch import cdiv, Tiles, gemm_tiles, grid_1d, launch, pow2
from .triton_linear import GROUP_M, _tile_of, precision, rows_contiguous


@triton.jit
def _group_tile(B, D, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """(group g, row offsets, column offsets) of this program."""
    tiles = tl.cdiv(B, BM) * tl.cdiv(D, BN)
    pid = tl.program_id(0)
    g = pid // tiles
    pid_m, pid_n = _tile_of(pid % tiles, B, D, BM, BN, GROUP)
    return g.to(tl.int64), pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)


@triton.jit
def _gated_cross_fwd_kernel(x0_ptr, xl_ptr, w_ptr, b_ptr, wg_ptr, z_ptr, a_ptr, out_ptr, B, D, s_x0, s_xl,
                            FROM_PRE: tl.constexpr, SAVE_PRE: tl.constexpr, GATED: tl.constexpr,
                            PRECISION: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    g, rm, rn = _group_tile(B, D, BM, BN, GROUP)
    bd = B.to(tl.int64) * D
    rm64 = rm.to(tl.int64)
    off = rm64[:, None] * D + rn[None, :]
    msk = (rm[:, None] < B) & (rn[None, :] < D)
    if FROM_PRE:  # z (bias included) and a computed by cuBLAS
        z = tl.load(z_ptr + g * bd + off, mask=msk, other=0.0).to(tl.float32)
        a = z
        if GATED:
            a = tl.load(a_ptr + g * bd + off, mask=msk, other=0.0).to(tl.float32)
    else:  # one pass over xl against W and Wg: two accumulators (wgmma on sm_90)
        xl_g = xl_ptr + g * s_xl
        w_g = w_ptr + g * D * D
        wg_g = wg_ptr + g * D * D
        rn64 = rn.to(tl.int64)
        rk = tl.arange(0, BK)
        acc_h = tl.zeros((BM, BN), dtype=tl.float32)
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + rk
            x = tl.load(xl_g + rm64[:, None] * D + kk[None, :], mask=(rm[:, None] < B) & (kk[None, :] < D),
                        other=0.0)
            w_off = rn64[None, :] * D + kk[:, None]  # W^T tile [BK, BN]
            w_msk = (kk[:, None] < D) & (rn[None, :] < D)
            acc_h = tl.dot(x, tl.load(w_g + w_off, mask=w_msk, other=0.0).to(x.dtype), acc_h,
                           input_precision=PRECISION)
            if GATED:
                acc_g = tl.dot(x, tl.load(wg_g + w_off, mask=w_msk, other=0.0).to(x.dtype), acc_g,
                               input_precision=PRECISION)
        z = acc_h + tl.load(b_ptr + g * D + rn, mask=rn < D, other=0.0).to(tl.float32)[None, :]
        a = acc_g
        if SAVE_PRE:  # the backward reads them instead of recomputing the dual GEMM
            tl.store(z_ptr + g * bd + off, z.to(z_ptr.dtype.element_ty), mask=msk)
            if GATED:
                tl.store(a_ptr + g * bd + off, a.to(a_ptr.dtype.element_ty), mask=msk)
    if GATED:
        z = z * tl.sigmoid(a)
    x0 = tl.load(x0_ptr + g * s_x0 + off, mask=msk, other=0.0).to(tl.float32)
    xl = tl.load(xl_ptr + g * s_xl + off, mask=msk, other=0.0).to(tl.float32)
    tl.store(out_ptr + g * bd + off, (x0 * z + xl).to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _gated_cross_bwd_kernel(x0_ptr, z_ptr, a_ptr, go_ptr, dx0_ptr, dzda_ptr, B, D, s_x0,
                            GATED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """Element-wise: dx0 and [dz | da] from the saved pre-activations (no GEMM)."""
    g, rm, rn = _group_tile(B, D, BM, BN, GROUP)
    bd = B.to(tl.int64) * D
    width = 2 * D if GATED else D
    rm64 = rm.to(tl.int64)
    off = rm64[:, None] * D + rn[None, :]
    msk = (rm[:, None] < B) & (rn[None, :] < D)
    z = tl.load(z_ptr + g * bd + off, mask=msk, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + g * s_x0 + off, mask=msk, other=0.0).to(tl.float32)
    go = tl.load(go_ptr + g * bd + off, mask=msk, other=0.0).to(tl.float32)
    dz_off = g * B.to(tl.int64) * width + rm64[:, None] * width + rn[None, :]
    if GATED:
        s = tl.sigmoid(tl.load(a_ptr + g * bd + off, mask=msk, other=0.0).to(tl.float32))
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


def pre_activations(xl, weight, bias, gate_weight):
    """z = xl W^T + b and a = xl Wg^T (None when ungated) by cuBLAS, in group form: two GEMMs on the
    separate weights (no [W; Wg] concatenation)."""
    z = torch.baddbmm(bias.to(xl.dtype)[:, None, :], xl, weight.to(xl.dtype).transpose(1, 2))
    a = torch.bmm(xl, gate_weight.to(xl.dtype).transpose(1, 2)) if gate_weight is not None else None
    return z, a


def _elementwise_tiles(D):
    if interpreting():
        return Tiles(16, min(32, pow2(D)), 16, 1, 1)
    return Tiles(64, min(64, pow2(D)), 16, 4, 1)


def _launch_fwd(tiles, prec, from_pre, save_pre, gated, x0, xl, weight, bias, wg, z, a, out):
    G, B, D = xl.shape
    grid = grid_1d(G * cdiv(B, tiles.BM) * cdiv(D, tiles.BN))
    launch(_gated_cross_fwd_kernel, grid, x0, xl, weight, bias, wg, z, a, out, B, D, x0.stride(0), xl.stride(0),
           FROM_PRE=from_pre, SAVE_PRE=save_pre, GATED=gated, PRECISION=prec, BM=tiles.BM, BN=tiles.BN,
           BK=tiles.BK, GROUP=GROUP_M, num_warps=tiles.warps, num_stages=tiles.stages,
           dot_m=None if from_pre else tiles.BM)


def gated_cross_forward(x0, xl, weight, bias, gate_weight=None, allow_tf32=None, save_pre: bool = True):
    """(out, z, a): out [B, D] for one layer (weight [D, D]) or [G, B, D] for a group (weight
    [G, D, D]; x0 / xl [G, B, D] or a shared [B, D]); z = xl W^T + b and a = xl Wg^T in out's shape
    (what the backward reads; a is empty when ungated), or both empty when ``save_pre`` is False
    (inference: the fused route then writes only out)."""
    x0, xl, weight, bias, gate_weight, grouped = _grouped(x0, xl, weight, bias, gate_weight)
    G, B, D = xl.shape
    gated = gate_weight is not None
    wg = gate_weight if gated else weight
    out = torch.empty((G, B, D), device=xl.device, dtype=xl.dtype)
    empty = xl.new_empty((0,))
    z = a = None
    if B > 0 and D > 0 and G > 0:
        tf32 = resolve_tf32(allow_tf32)
        if fused_gemm_in_triton(xl.dtype, tf32):
            if save_pre:
                z = torch.empty_like(out)
                a = torch.empty_like(out) if gated else None
            tiles = gemm_tiles(B, D, D, xl.dtype, xl.device, two_acc=True, groups=G)
            _launch_fwd(tiles, precision(tf32), False, save_pre, gated, x0, xl, weight, bias, wg,
                        z if z is not None else out, a if a is not None else out, out)
        else:  # IEEE fp32: cuBLAS pre-activations, the same kernel as an element-wise epilogue
            z, a = pre_activations(xl, weight, bias, gate_weight)
            _launch_fwd(_elementwise_tiles(D), "ieee", True, False, gated, x0, xl, weight, bias, wg,
                        z, a if a is not None else z, out)
    if save_pre:  # an empty problem: nothing computed, the (empty or zero) pre-activations still returned
        z = z if z is not None else torch.zeros_like(out)
        a = a if a is not None else (torch.zeros_like(out) if gated else None)
    else:
        z = a = None
    if not grouped:
        out = out[0]
        z, a = (z[0] if z is not None else None), (a[0] if a is not None else None)
    z = z if z is not None else empty
    a = a if a is not None else xl.new_empty((0,))  # outputs may not alias each other
    return out, z, a


def gated_cross_backward(grad_out, x0, xl, weight, bias, gate_weight=None, z=None, a=None, allow_tf32=None):
    """Returns (dx0, dxl, [dW; dWg], db) in the inputs' shapes, the weight gradients stacked along the
    rows ([2D, D] / [G, 2D, D]; [D, D] / [G, D, D] when ungated) as the one GEMM writes them; for a shared
    x0 / xl ([B, D] with a grouped weight) the gradients are summed over the group. ``z`` / ``a``:
    the forward's pre-activations; when absent (empty) cuBLAS recomputes them."""
    shapes = (x0.shape, xl.shape)
    x0, xl, weight, bias, gate_weight, grouped = _grouped(x0, xl, weight, bias, gate_weight)
    G, B, D = xl.shape
    gated = gate_weight is not None
    go = grad_out.to(xl.dtype).reshape(G, B, D).contiguous()  # the kernel reads members packed: g * B * D
    if z is None or z.numel() != G * B * D:
        z, a = pre_activations(xl, weight, bias, gate_weight)
    z = z.to(xl.dtype).reshape(G, B, D).contiguous()
    a = a.to(xl.dtype).reshape(G, B, D).contiguous() if gated else z
    dx0 = torch.empty((G, B, D), device=xl.device, dtype=xl.dtype)
    dzda = torch.empty((G, B, 2 * D if gated else D), device=xl.device, dtype=xl.dtype)
    if B > 0 and D > 0 and G > 0:
        t = _elementwise_tiles(D)
        grid = grid_1d(G * cdiv(B, t.BM) * cdiv(D, t.BN))
        launch(_gated_cross_bwd_kernel, grid, x0, z, a, go, dx0, dzda, B, D, x0.stride(0), GATED=gated,
               BM=t.BM, BN=t.BN, GROUP=GROUP_M, num_warps=t.warps)
    else:
        dx0.zero_()
        dzda.zero_()
    # plain GEMMs: cuBLAS (tuned per card, split-K when the batch is the reduction)
    dz = dzda[..., :D]
    dxl = torch.baddbmm(go, dz, weight.to(xl.dtype))
    if gated:
        dxl.baddbmm_(dzda[..., D:], gate_weight.to(xl.dtype))
    dWcat = torch.bmm(dzda.transpose(1, 2), xl)  # [G, 2D, D] = [dW; dWg]: one GEMM
    dWcat = dWcat.to(weight.dtype)
    db = dz.sum(1).to(bias.dtype)
    if not grouped:
        dx0, dxl, dWcat, db = dx0[0], dxl[0], dWcat[0], db[0]
    else:  # a group input shared by every member ([B, D]) gets the sum of the members' gradients
        dx0 = dx0.sum(0) if len(shapes[0]) == 2 else dx0
        dxl = dxl.sum(0) if len(shapes[1]) == 2 else dxl
    return dx0, dxl, dWcat, db
