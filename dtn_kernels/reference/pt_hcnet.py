"""Pure-PyTorch twin of ``torch.ops.dtn.hcnet``: the CPU path and the test oracle.

It is what ``dtn_kernels.modules.HCNet.forward`` runs after the SENet (the layer calls
:func:`pt_hcnet_buckets` and :func:`pt_hcnet_from_buckets` with its precomputed pairs and
incidence), with the hash of :func:`dtn_kernels.hashing.cross_hash`, including the
[B, M, H, d_c] codeword tensor the kernel avoids.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._group import stack_members

from ..hashing import M32, fmix32


def pt_hcnet_pairs(num_fields: int, device=None) -> torch.Tensor:
    """[2, M] (i, j) of every cross i < j of ``num_fields`` fields, in itertools.combinations order."""
    return torch.triu_indices(num_fields, num_fields, 1, device=device)


def pt_hcnet_buckets(ids: torch.Tensor, salts: torch.Tensor, seeds: Union[torch.Tensor, Sequence[int]],
                     num_buckets: int, pairs: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """[B, M, H] buckets of every cross under every seed: ``cross_hash(ids[:, i], ids[:, j], salts[i],
    salts[j], seed, num_buckets)`` for the crosses (i, j) of ``pairs`` (default :func:`pt_hcnet_pairs`).

    The per-field part of the hash is computed once per (row, field), not per cross. ``seeds``: an
    int64 tensor [H] or the ints themselves (a layer keeps them on the host: no device read).
    """
    pi, pj = pairs if pairs is not None else pt_hcnet_pairs(ids.shape[1], ids.device)
    a = fmix32((ids.long() & M32) ^ salts.long())  # [B, S]
    b = a[:, pj]  # [B, M]
    seeds = seeds.tolist() if torch.is_tensor(seeds) else seeds
    return torch.stack([fmix32(fmix32(a ^ s)[:, pi] ^ b) % num_buckets for s in seeds], dim=-1)


def pt_hcnet_incidence(pairs: Sequence[torch.Tensor], num_fields: int, dtype=torch.float32) -> torch.Tensor:
    """[S, M]: 1 where field s is one of the two fields of cross k."""
    pi, pj = pairs
    incidence = torch.zeros(num_fields, pi.numel(), device=pi.device, dtype=dtype)
    k = torch.arange(pi.numel(), device=pi.device)
    incidence[pi, k] = 1.0
    incidence[pj, k] = 1.0
    return incidence


def pt_hcnet_codewords(idx: torch.Tensor, codebook: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, M, H*d_c]: the H codewords of every cross side by side, converted to ``dtype`` (the
    gathered rows only: the codebook may be kept in fp32)."""
    if codebook.shape[0] == 1:
        cw = codebook[0][idx]  # [B, M, H, d_c]
    else:
        cw = torch.stack([codebook[h][idx[..., h]] for h in range(idx.shape[-1])], dim=2)
    return cw.to(dtype).flatten(2)


def pt_hcnet_from_buckets(idx: torch.Tensor, codebook: torch.Tensor, restore_weight: torch.Tensor,
                          attn: torch.Tensor, incidence: torch.Tensor) -> torch.Tensor:
    """U [B, S, d] from the buckets [B, M, H]: gather, linear restoring, attentive shrinking."""
    v = F.linear(pt_hcnet_codewords(idx, codebook, restore_weight.dtype), restore_weight)  # [B, M, d]
    return torch.einsum("sm,bmd->bsd", incidence, attn[..., None] * v)


def pt_hcnet(ids: torch.Tensor, salts: torch.Tensor, seeds: torch.Tensor, codebook: torch.Tensor,
             restore_weight: torch.Tensor, attn: torch.Tensor, deterministic: bool = False,
             allow_tf32: bool = False) -> torch.Tensor:
    """U [B, S, d]: U[b, s] = sum over crosses k containing s of attn[b, k] * W_o [cw_{k,1} | ... | cw_{k,H}].

    ids [B, S] (ids of the crossed fields), salts [S], seeds [H] (int64, < 2^32), codebook
    [books, N, d_c] (books = 1 shared or H), restore_weight [d, H*d_c], attn [B, S(S-1)/2].
    ``deterministic``/``allow_tf32`` only matter to the Triton kernel. A group (seeds [G, H], codebook
    [G, books, N, d_c], restore_weight [G, d, H*d_c], attn [G, B, M]) gives [G, B, S, d].
    """
    if codebook.dim() == 4:
        return torch.stack([pt_hcnet(ids, salts, seeds[g], codebook[g], restore_weight[g], attn[g])
                            for g in range(codebook.shape[0])])
    S = ids.shape[1]
    pairs = pt_hcnet_pairs(S, ids.device)
    idx = pt_hcnet_buckets(ids, salts, seeds, codebook.shape[1], pairs)  # [B, M, H]
    return pt_hcnet_from_buckets(idx, codebook, restore_weight, attn, pt_hcnet_incidence(pairs, S, restore_weight.dtype))


def pt_hcnet_backward(grad_u, ids, salts, seeds, codebook, restore_weight, attn):
    """(d codebook, d restore weight, d attn) in closed form: with G[b, k] = dU[b, i_k] + dU[b, j_k],
    d attn = <G, v>, dv = attn * G, dW_o = dv^T cw, d cw = dv W_o, scattered into the codebook."""
    if codebook.dim() == 4:
        return stack_members([pt_hcnet_backward(grad_u[g], ids, salts, seeds[g], codebook[g], restore_weight[g],
                                                attn[g]) for g in range(codebook.shape[0])])
    books, N, dc = codebook.shape
    pi, pj = pairs = pt_hcnet_pairs(grad_u.shape[1], ids.device)
    idx = pt_hcnet_buckets(ids, salts, seeds, N, pairs)  # [B, M, H]
    H = idx.shape[-1]
    cw = pt_hcnet_codewords(idx, codebook, restore_weight.dtype)  # [B, M, H*dc]
    v = F.linear(cw, restore_weight)
    G = grad_u[:, pi] + grad_u[:, pj]  # [B, M, d]
    dattn = (G * v).sum(-1)
    dv = attn[..., None] * G
    dwr = dv.flatten(0, 1).t() @ cw.flatten(0, 1)
    dcw = (dv @ restore_weight).view(*idx.shape, dc).to(codebook.dtype)  # [B, M, H, dc]
    dcb = torch.zeros_like(codebook)
    if books == 1:
        dcb[0].index_add_(0, idx.flatten(), dcw.reshape(-1, dc))
    else:
        for h in range(H):
            dcb[h].index_add_(0, idx[..., h].flatten(), dcw[:, :, h].reshape(-1, dc))
    return dcb, dwr, dattn
