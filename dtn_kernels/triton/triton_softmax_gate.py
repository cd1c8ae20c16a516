"""Softmax gating in Triton: logits = x W^T + b, optional expert mask, softmax over the K
experts, and the weighted sum of the expert outputs, in one kernel per block of rows.

forward writes only ``out`` [B, h] and ``weights`` [B, K].
backward: one kernel per block of rows computes d experts = w * d out, the weight
gradient (the incoming one plus <d out, expert_k>), the softmax backward to d logits, and
d x = d logits @ W; a GEMM then gives dW = d logits^T x with db as its row sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_linear import INTERPRET, gemm, pow2, precision


def _blocks(B, din, K, h):
    bk = pow2(K)
    if INTERPRET:
        return 16, bk, min(32, pow2(din)), min(32, pow2(h)), 1
    return min(32, pow2(B)), bk, min(64, pow2(din)), min(128, pow2(h)), 4


@triton.jit
def _softmax_gate_fwd_kernel(x_ptr, w_ptr, b_ptr, m_ptr, e_ptr, out_ptr, wts_ptr, B, DIN, K, H, s_mb, s_mk,
                             HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                             BB: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rk = tl.arange(0, BK)
    rb64 = rb.to(tl.int64)
    bmask = rb < B
    acc = tl.zeros((BB, BK), dtype=tl.float32)
    for d0 in range(0, DIN, BD):
        dd = d0 + tl.arange(0, BD)
        x = tl.load(x_ptr + rb64[:, None] * DIN + dd[None, :], mask=bmask[:, None] & (dd[None, :] < DIN), other=0.0)
        wt = tl.load(w_ptr + rk[None, :] * DIN + dd[:, None], mask=(rk[None, :] < K) & (dd[:, None] < DIN), other=0.0)
        acc = tl.dot(x, wt.to(x.dtype), acc, input_precision=PRECISION)
    logits = acc + tl.load(b_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
    valid = (rk[None, :] < K) & (rb[:, None] >= 0)  # padded rows stay finite (no nan warnings)
    if HAS_MASK:
        rbc = tl.minimum(rb64, B - 1)
        on = tl.load(m_ptr + rbc[:, None] * s_mb + rk[None, :] * s_mk, mask=valid, other=0)
        valid = valid & (on != 0)
    logits = tl.where(valid, logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    p = tl.where(valid, tl.exp(logits - mx[:, None]), 0.0)
    wts = p / tl.sum(p, axis=1)[:, None]
    kmask = bmask[:, None] & (rk[None, :] < K)
    tl.store(wts_ptr + rb64[:, None] * K + rk[None, :], wts.to(wts_ptr.dtype.element_ty), mask=kmask)
    for h0 in range(0, H, BH):
        hh = h0 + tl.arange(0, BH)
        hmask = bmask[:, None] & (hh[None, :] < H)
        o = tl.zeros((BB, BH), dtype=tl.float32)
        for k in range(0, K):
            wk = tl.sum(tl.where(rk[None, :] == k, wts, 0.0), axis=1)
            ex = tl.load(e_ptr + (rb64[:, None] * K + k) * H + hh[None, :], mask=hmask, other=0.0)
            o += wk[:, None] * ex.to(tl.float32)
        tl.store(out_ptr + rb64[:, None] * H + hh[None, :], o.to(out_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _softmax_gate_bwd_kernel(go_ptr, gw_ptr, wts_ptr, e_ptr, w_ptr, dexp_ptr, dl_ptr, dx_ptr, B, DIN, K, H,
                             PRECISION: tl.constexpr,
                             BB: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rk = tl.arange(0, BK)
    rb64 = rb.to(tl.int64)
    bmask = rb < B
    kmask = bmask[:, None] & (rk[None, :] < K)
    wts = tl.load(wts_ptr + rb64[:, None] * K + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
    dw = tl.load(gw_ptr + rb64[:, None] * K + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
    for h0 in range(0, H, BH):
        hh = h0 + tl.arange(0, BH)
        hmask = bmask[:, None] & (hh[None, :] < H)
        go = tl.load(go_ptr + rb64[:, None] * H + hh[None, :], mask=hmask, other=0.0).to(tl.float32)
        for k in range(0, K):
            onk = rk[None, :] == k
            wk = tl.sum(tl.where(onk, wts, 0.0), axis=1)
            off = (rb64[:, None] * K + k) * H + hh[None, :]
            ex = tl.load(e_ptr + off, mask=hmask, other=0.0).to(tl.float32)
            tl.store(dexp_ptr + off, (wk[:, None] * go).to(dexp_ptr.dtype.element_ty), mask=hmask)
            dw += tl.where(onk, tl.sum(go * ex, axis=1)[:, None], 0.0)
    dl = wts * (dw - tl.sum(wts * dw, axis=1)[:, None])  # softmax backward; masked experts have w = 0
    tl.store(dl_ptr + rb64[:, None] * K + rk[None, :], dl, mask=kmask)
    for d0 in range(0, DIN, BD):
        dd = d0 + tl.arange(0, BD)
        wt = tl.load(w_ptr + rk[:, None] * DIN + dd[None, :], mask=(rk[:, None] < K) & (dd[None, :] < DIN), other=0.0)
        dx = tl.dot(dl.to(wt.dtype), wt, input_precision=PRECISION)
        tl.store(dx_ptr + rb64[:, None] * DIN + dd[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=bmask[:, None] & (dd[None, :] < DIN))


def _mask2d(mask, B, K):
    if mask is None:
        return None
    m = mask.to(torch.int8)
    return m.expand(B, K) if m.dim() == 1 else m


def softmax_gate_forward(x, experts, weight, bias, mask=None, allow_tf32: bool = False):
    B, din = x.shape
    K, h = experts.shape[1], experts.shape[2]
    x, experts, weight, bias = x.contiguous(), experts.contiguous(), weight.contiguous(), bias.contiguous()
    out = torch.empty((B, h), device=x.device, dtype=experts.dtype)
    wts = torch.empty((B, K), device=x.device, dtype=x.dtype)
    if B == 0:
        return out, wts
    m = _mask2d(mask, B, K)
    BB, BK, BD, BH, warps = _blocks(B, din, K, h)
    _softmax_gate_fwd_kernel[(triton.cdiv(B, BB),)](
        x, weight, bias, m if m is not None else x, experts, out, wts, B, din, K, h,
        m.stride(0) if m is not None else 0, m.stride(1) if m is not None else 0,
        HAS_MASK=m is not None, PRECISION=precision(allow_tf32), BB=BB, BK=BK, BD=BD, BH=BH, num_warps=warps)
    return out, wts


def softmax_gate_backward(grad_out, grad_weights, x, experts, weight, weights, allow_tf32: bool = False):
    """Returns (dx, d experts, dW, db)."""
    B, din = x.shape
    K, h = experts.shape[1], experts.shape[2]
    x, experts, weight, weights = x.contiguous(), experts.contiguous(), weight.contiguous(), weights.contiguous()
    go = grad_out.contiguous()
    gw = grad_weights.contiguous()
    dexp = torch.empty_like(experts)
    dl = torch.empty((B, K), device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    if B > 0:
        BB, BK, BD, BH, warps = _blocks(B, din, K, h)
        _softmax_gate_bwd_kernel[(triton.cdiv(B, BB),)](
            go, gw, weights, experts, weight, dexp, dl, dx, B, din, K, h,
            PRECISION=precision(allow_tf32), BB=BB, BK=BK, BD=BD, BH=BH, num_warps=warps)
    dW, db = gemm(dl.t(), x.to(torch.float32) if x.dtype != torch.float32 else x, rowsum=True,
                  out_dtype=weight.dtype, allow_tf32=allow_tf32)
    return dx, dexp, dW, db.to(weight.dtype)
