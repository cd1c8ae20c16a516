"""MemoNet's HCNet in Triton: hashing, codebook gather, linear restoring and global attentive
shrinking in one kernel, never materialising the [B, M, H, d_c] codewords.

Because restoring is linear and shared by all crosses, shrinking can come first:
    U[b, s] = sum_{k ∋ s} w[b, k] * W_o [cw_{k,1} | ... | cw_{k,H}] = W_o P[b, s],
    P[b, s] = sum_{k ∋ s} w[b, k] * [cw_{k,1} | ... | cw_{k,H}]          ([H * d_c] per field)
forward: one program per (block of rows, field s) walks the S-1 crosses that contain s,
  hashes them (bit-identical to ``dtn.layers.memonet.cross_hash``: uint32 arithmetic wraps
  like the reference's masked int64 products), gathers the H codewords, accumulates
  w * codeword into a [rows, H, d_c] register tile (P), then multiplies by W_o^T into U.
  Each cross is visited twice (once per field): hashing is cheap next to the gathers.
backward: P is recomputed by the same kernel (no restore), dP = dU W_o and dW_o = dU^T P are
  GEMMs over [B*S] rows; one program per (block of rows, cross k) hashes again, gathers,
  writes dw[b, k] = <codewords, dP_i + dP_j> and adds w * (dP_i + dP_j) into the codebook
  gradient, either with atomics (fast; summation order not fixed) or deterministically:
  the rows are written out, stably sorted, and one program per distinct codebook row sums
  its contributions in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_linear import INTERPRET, gemm, pow2, precision


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finaliser on uint32 (multiplications wrap mod 2^32)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _field_hash(ids_ptr, salts_ptr, rb64, bmask, f, S):
    """fmix32((id & 0xFFFFFFFF) ^ salt_f) for field position f of the subset, rows rb."""
    ids = tl.load(ids_ptr + rb64 * S + f, mask=bmask, other=0).to(tl.int64).to(tl.uint32)  # keeps the low 32 bits
    salt = tl.load(salts_ptr + f).to(tl.uint32)
    return _fmix32(ids ^ salt)


@triton.jit
def _codebook_rows(a_i, a_j, seeds, rh, NBK, SHARED: tl.constexpr):
    """[BB, BH] int64 row of the flattened [num_books * N] codebook for every row and hash."""
    h = _fmix32(_fmix32(a_i[:, None] ^ seeds[None, :]) ^ a_j[:, None])
    bucket = (h % tl.cast(NBK, tl.uint32)).to(tl.int64)
    if SHARED:
        return bucket
    return rh.to(tl.int64)[None, :] * NBK + bucket


@triton.jit
def _hcnet_fwd_kernel(ids_ptr, salts_ptr, seeds_ptr, cb_ptr, wr_ptr, w_ptr, u_ptr, p_ptr,
                      B, S, M, NBK, D, H, DC,
                      SHARED: tl.constexpr, STORE_P: tl.constexpr, RESTORE: tl.constexpr, PRECISION: tl.constexpr,
                      BB: tl.constexpr, BH: tl.constexpr, BDC: tl.constexpr, BD: tl.constexpr):
    s = tl.program_id(1)
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rb64 = rb.to(tl.int64)
    bmask = rb < B
    rh = tl.arange(0, BH)
    rc = tl.arange(0, BDC)
    hmask = rh < H
    cmask = rc < DC
    seeds = tl.load(seeds_ptr + rh, mask=hmask, other=0).to(tl.int64).to(tl.uint32)
    gmask = bmask[:, None, None] & hmask[None, :, None] & cmask[None, None, :]
    a_s = _field_hash(ids_ptr, salts_ptr, rb64, bmask, s, S)
    acc = tl.zeros((BB, BH, BDC), dtype=tl.float32)
    for tt in range(0, S - 1):
        t = tt + (tt >= s).to(tl.int32)  # the S-1 partners of s
        a_t = _field_hash(ids_ptr, salts_ptr, rb64, bmask, t, S)
        lo = tl.minimum(s, t)
        hi = tl.maximum(s, t)
        k = lo * S - (lo * (lo + 1)) // 2 + (hi - lo - 1)  # itertools.combinations order
        a_i = tl.where(s < t, a_s, a_t)
        a_j = tl.where(s < t, a_t, a_s)
        rows = _codebook_rows(a_i, a_j, seeds, rh, NBK, SHARED)
        cw = tl.load(cb_ptr + rows[:, :, None] * DC + rc[None, None, :], mask=gmask, other=0.0)
        wk = tl.load(w_ptr + rb64 * M + k, mask=bmask, other=0.0).to(tl.float32)
        acc += wk[:, None, None] * cw.to(tl.float32)
    HD = H * DC
    if STORE_P:
        p_off = (rb64 * S + s)[:, None, None] * HD + (rh[:, None] * DC + rc[None, :])[None, :, :]
        tl.store(p_ptr + p_off, acc, mask=gmask)
    if RESTORE:
        p2 = tl.reshape(acc, (BB, BH * BDC)).to(wr_ptr.dtype.element_ty)
        col = tl.reshape(rh[:, None] * DC + rc[None, :], (BH * BDC,))
        colm = tl.reshape(hmask[:, None] & cmask[None, :], (BH * BDC,))
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            wt = tl.load(wr_ptr + rd[None, :] * HD + col[:, None], mask=colm[:, None] & (rd[None, :] < D), other=0.0)
            u = tl.dot(p2, wt, input_precision=PRECISION)
            tl.store(u_ptr + (rb64 * S + s)[:, None] * D + rd[None, :], u.to(u_ptr.dtype.element_ty),
                     mask=bmask[:, None] & (rd[None, :] < D))


@triton.jit
def _hcnet_bwd_kernel(ids_ptr, salts_ptr, seeds_ptr, cb_ptr, w_ptr, dp_ptr, pi_ptr, pj_ptr, dw_ptr, dcb_ptr, key_ptr,
                      B, S, M, NBK, H, DC,
                      SHARED: tl.constexpr, DETERMINISTIC: tl.constexpr,
                      BB: tl.constexpr, BH: tl.constexpr, BDC: tl.constexpr):
    k = tl.program_id(1)
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rb64 = rb.to(tl.int64)
    bmask = rb < B
    rh = tl.arange(0, BH)
    rc = tl.arange(0, BDC)
    hmask = rh < H
    cmask = rc < DC
    seeds = tl.load(seeds_ptr + rh, mask=hmask, other=0).to(tl.int64).to(tl.uint32)
    gmask = bmask[:, None, None] & hmask[None, :, None] & cmask[None, None, :]
    i = tl.load(pi_ptr + k)
    j = tl.load(pj_ptr + k)
    a_i = _field_hash(ids_ptr, salts_ptr, rb64, bmask, i, S)
    a_j = _field_hash(ids_ptr, salts_ptr, rb64, bmask, j, S)
    rows = _codebook_rows(a_i, a_j, seeds, rh, NBK, SHARED)
    cw = tl.load(cb_ptr + rows[:, :, None] * DC + rc[None, None, :], mask=gmask, other=0.0).to(tl.float32)
    HD = H * DC
    hc = (rh[:, None] * DC + rc[None, :])[None, :, :]
    g = tl.load(dp_ptr + (rb64 * S + i)[:, None, None] * HD + hc, mask=gmask, other=0.0) + \
        tl.load(dp_ptr + (rb64 * S + j)[:, None, None] * HD + hc, mask=gmask, other=0.0)
    tl.store(dw_ptr + rb64 * M + k, tl.sum(tl.sum(cw * g, axis=2), axis=1), mask=bmask)
    if DETERMINISTIC:
        tl.store(key_ptr + (rb64 * M + k)[:, None] * H + rh[None, :], rows, mask=bmask[:, None] & hmask[None, :])
    else:
        wk = tl.load(w_ptr + rb64 * M + k, mask=bmask, other=0.0).to(tl.float32)
        tl.atomic_add(dcb_ptr + rows[:, :, None] * DC + rc[None, None, :], wk[:, None, None] * g, mask=gmask)


@triton.jit
def _hcnet_codebook_grad_kernel(perm_ptr, start_ptr, count_ptr, row_ptr, w_ptr, dp_ptr, pi_ptr, pj_ptr, dcb_ptr,
                                S, M, H, DC, BDC: tl.constexpr):
    """One distinct codebook row: the sum of its contributions in sorted (b, k, h) order."""
    u = tl.program_id(0)
    start = tl.load(start_ptr + u)
    count = tl.load(count_ptr + u)
    row = tl.load(row_ptr + u)
    rc = tl.arange(0, BDC)
    cmask = rc < DC
    HD = H * DC
    acc = tl.zeros((BDC,), dtype=tl.float32)
    for n in range(0, count):
        idx = tl.load(perm_ptr + start + n)  # flat (b * M + k) * H + h
        h = idx % H
        bk = idx // H
        kk = bk % M
        b = bk // M
        i = tl.load(pi_ptr + kk)
        j = tl.load(pj_ptr + kk)
        wv = tl.load(w_ptr + bk).to(tl.float32)
        g = tl.load(dp_ptr + (b * S + i) * HD + h * DC + rc, mask=cmask, other=0.0) + \
            tl.load(dp_ptr + (b * S + j) * HD + h * DC + rc, mask=cmask, other=0.0)
        acc += wv * g
    tl.store(dcb_ptr + row * DC + rc, acc, mask=cmask)


def _blocks(B, H, DC, D):
    bh = pow2(H, 1)
    bdc = max(pow2(DC, 1), 16 // bh)  # the restore tl.dot needs K = BH * BDC >= 16
    if INTERPRET:
        return 16, bh, bdc, min(32, pow2(D)), 1
    return min(64, pow2(B)), bh, bdc, min(64, pow2(D)), 4


def _check(ids, salts, seeds, codebook, restore_weight, attn):
    B, S = ids.shape
    H = seeds.numel()
    books, N, DC = codebook.shape
    if books not in (1, H):
        raise ValueError(f"codebook has {books} books; expected 1 (shared) or {H} (one per hash)")
    if restore_weight.shape[1] != H * DC:
        raise ValueError(f"restore weight {tuple(restore_weight.shape)} needs H*d_c = {H * DC} columns")
    if attn.shape != (B, S * (S - 1) // 2):
        raise ValueError(f"attention weights {tuple(attn.shape)} must be [B, S(S-1)/2] = [{B}, {S * (S - 1) // 2}]")
    return B, S, H, books, N, DC


def _run_fwd(ids, salts, seeds, codebook, restore_weight, attn, store_p, restore, allow_tf32):
    B, S, H, books, N, DC = _check(ids, salts, seeds, codebook, restore_weight, attn)
    D = restore_weight.shape[0]
    M = S * (S - 1) // 2
    dev = codebook.device
    u = torch.empty((B, S, D), device=dev, dtype=codebook.dtype) if restore else None
    p = torch.empty((B, S, H * DC), device=dev, dtype=torch.float32) if store_p else None
    if B == 0:
        return u, p
    BB, BH, BDC, BD, warps = _blocks(B, H, DC, D)
    if S < 2:  # no crosses: U = 0 (the kernel's loop would be empty anyway; skip the launch)
        return (u.zero_() if u is not None else None), (p.zero_() if p is not None else None)
    _hcnet_fwd_kernel[(triton.cdiv(B, BB), S)](
        ids, salts, seeds, codebook, restore_weight, attn, u if u is not None else codebook,
        p if p is not None else codebook, B, S, M, N, D, H, DC,
        SHARED=books == 1, STORE_P=store_p, RESTORE=restore, PRECISION=precision(allow_tf32),
        BB=BB, BH=BH, BDC=BDC, BD=BD, num_warps=warps)
    return u, p


def _prep(ids, salts, seeds, codebook, restore_weight, attn):
    return (ids.contiguous(), salts.to(torch.int64).contiguous(), seeds.to(torch.int64).contiguous(),
            codebook.contiguous(), restore_weight.contiguous(), attn.contiguous())


def hcnet_forward(ids, salts, seeds, codebook, restore_weight, attn, allow_tf32: bool = False) -> torch.Tensor:
    """U [B, S, d] from ids [B, S] (the subset fields), salts [S], seeds [H], codebook [books, N, d_c],
    restore weight [d, H*d_c] and attention weights attn [B, M]."""
    args = _prep(ids, salts, seeds, codebook, restore_weight, attn)
    return _run_fwd(*args, store_p=False, restore=True, allow_tf32=allow_tf32)[0]


def hcnet_backward(grad_u, ids, salts, seeds, codebook, restore_weight, attn, deterministic: bool = False,
                   allow_tf32: bool = False):
    """Returns (d codebook, d restore weight, d attn)."""
    ids, salts, seeds, codebook, restore_weight, attn = _prep(ids, salts, seeds, codebook, restore_weight, attn)
    B, S, H, books, N, DC = _check(ids, salts, seeds, codebook, restore_weight, attn)
    D = restore_weight.shape[0]
    M = S * (S - 1) // 2
    dev = codebook.device
    _, p = _run_fwd(ids, salts, seeds, codebook, restore_weight, attn, True, False, allow_tf32)
    gu = grad_u.contiguous().reshape(B * S, D).to(torch.float32)
    dWr = gemm(gu.t(), p.view(B * S, H * DC), out_dtype=restore_weight.dtype, allow_tf32=allow_tf32)
    dp = gemm(gu, restore_weight.to(torch.float32), out_dtype=torch.float32, allow_tf32=allow_tf32)
    dw = torch.empty((B, M), device=dev, dtype=torch.float32)
    dcb = torch.zeros((books * N, DC), device=dev, dtype=torch.float32)
    if B == 0 or M == 0:
        return dcb.view(books, N, DC).to(codebook.dtype), dWr, dw.to(attn.dtype)
    pairs = torch.triu_indices(S, S, 1, device=dev).to(torch.int32)
    pi, pj = pairs[0].contiguous(), pairs[1].contiguous()
    keys = torch.empty((B, M, H), device=dev, dtype=torch.int64) if deterministic else dw
    BB, BH, BDC, _, warps = _blocks(B, H, DC, D)
    _hcnet_bwd_kernel[(triton.cdiv(B, BB), M)](
        ids, salts, seeds, codebook, attn, dp, pi, pj, dw, dcb, keys, B, S, M, N, H, DC,
        SHARED=books == 1, DETERMINISTIC=deterministic, BB=BB, BH=BH, BDC=BDC, num_warps=warps)
    if deterministic:
        sorted_rows, perm = torch.sort(keys.view(-1), stable=True)
        rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        _hcnet_codebook_grad_kernel[(rows.numel(),)](
            perm, starts, counts, rows, attn, dp, pi, pj, dcb, S, M, H, DC, BDC=BDC, num_warps=1)
    return dcb.view(books, N, DC).to(codebook.dtype), dWr, dw.to(attn.dtype)
