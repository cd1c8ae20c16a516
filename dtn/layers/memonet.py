"""MemoNet's multi-hash codebook network HCNet (Zhang & Zhang, CIKM 2023).

1. cross features: every field pair (i < j) of a subset S of categorical fields, M = |S|(|S|-1)/2;
2. multi-hash addressing: H hash functions map each cross to rows of a codebook C [N, d_c];
3. linear memory restoring: v_k = W_o [cw_{k,1} | ... | cw_{k,H}]  (W_o shared by all crosses);
4. global attentive shrinking: w = SENet(E) in R^{B x M}; u_f = sum_{k contains f} w_k v_k.

The hash is a 32-bit murmur3 finaliser written so that it gives the same bucket on CPU,
CUDA and in Triton: every product is split so that no intermediate leaves int64 range.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import nn

M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for 0 <= h < 2^32 without signed int64 overflow."""
    lo = (h & 0xFFFF) * c
    hi = (((h >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def fmix32_int(h: int) -> int:
    """Python-int twin of :func:`fmix32` (for salts and seeds)."""
    h &= M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def cross_hash(id_i: torch.Tensor, id_j: torch.Tensor, salt_i, salt_j, seed: int, num_buckets: int) -> torch.Tensor:
    """Bucket in [0, num_buckets) of the cross (field_i = id_i, field_j = id_j) for one hash seed.

    ``salt_*`` identify the fields (ints or int64 tensors broadcastable to the ids).
    """
    a = fmix32((id_i.long() & M32) ^ salt_i)
    b = fmix32((id_j.long() & M32) ^ salt_j)
    h = fmix32(fmix32(a ^ seed) ^ b)
    return h % num_buckets


def field_salt(field_index: int) -> int:
    return fmix32_int(0x5BD1E995 + 2654435761 * (field_index + 1))


def hash_seed(hcnet_index: int, hash_index: int) -> int:
    return fmix32_int(0x27D4EB2F * (hcnet_index + 1) + 0x165667B1 * (hash_index + 1))


class HCNet(nn.Module):
    """One HCNet over categorical field positions ``fields`` (indices into the categorical ids).

    forward(E [B, F, d], cat_ids [B, C]) -> U [B, |S|, d]
    Parameters: ``codebook`` [num_books, N, d_c] (num_books = 1 if shared by all hashes, else H),
    ``restore`` Linear(H*d_c -> d, no bias), ``senet`` (Linear(F -> r), ReLU, Linear(r -> M), sigmoid).
    """

    def __init__(self, fields: Sequence[int], num_fields: int, embed_dim: int, num_hashes: int = 2,
                 num_buckets: int = 100_000, codebook_dim: int = 16, shared_codebook: bool = True,
                 senet_reduction: int = 2, index: int = 0, device=None):
        super().__init__()
        fields = list(fields)
        if len(fields) < 2:
            raise ValueError(f"HCNet needs at least 2 categorical fields to cross, got {fields}")
        pairs = list(itertools.combinations(range(len(fields)), 2))
        self.num_crosses = len(pairs)
        self.num_hashes = num_hashes
        self.num_buckets = num_buckets
        self.codebook_dim = codebook_dim
        self.embed_dim = embed_dim
        self.register_buffer("fields", torch.tensor(fields, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("pair_i", torch.tensor([p[0] for p in pairs], dtype=torch.long, device=device), persistent=False)
        self.register_buffer("pair_j", torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device), persistent=False)
        salts = [field_salt(f) for f in fields]
        self.register_buffer("salts", torch.tensor(salts, dtype=torch.long, device=device), persistent=False)
        self.seeds = [hash_seed(index, k) for k in range(num_hashes)]
        self.register_buffer("seed_tensor", torch.tensor(self.seeds, dtype=torch.long, device=device), persistent=False)
        incidence = torch.zeros(len(fields), self.num_crosses, device=device)
        for k, (i, j) in enumerate(pairs):
            incidence[i, k] = 1.0
            incidence[j, k] = 1.0
        self.register_buffer("incidence", incidence, persistent=False)
        books = 1 if shared_codebook else num_hashes
        self.codebook = nn.Parameter(torch.randn(books, num_buckets, codebook_dim, device=device) * 0.05)
        self.restore = nn.Linear(num_hashes * codebook_dim, embed_dim, bias=False, device=device)
        r = max(1, num_fields // senet_reduction)
        self.senet = nn.Sequential(nn.Linear(num_fields, r, device=device), nn.ReLU(),
                                   nn.Linear(r, self.num_crosses, device=device), nn.Sigmoid())

    @property
    def num_subset_fields(self) -> int:
        return int(self.fields.numel())

    def buckets(self, cat_ids: torch.Tensor) -> torch.Tensor:
        """Bucket ids [B, M, H] of every cross under every hash (= :func:`cross_hash`).

        The per-field parts of the hash are computed once per (row, field), not per cross.
        """
        a = fmix32((cat_ids[:, self.fields].long() & M32) ^ self.salts)  # [B, S]
        b = a[:, self.pair_j]  # [B, M]
        out = []
        for s in self.seeds:
            left = fmix32(a ^ s)[:, self.pair_i]  # [B, M]
            out.append(fmix32(left ^ b) % self.num_buckets)
        return torch.stack(out, dim=-1)

    def attention(self, E: torch.Tensor) -> torch.Tensor:
        return self.senet(E.mean(dim=-1))  # [B, M]

    def forward(self, E: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        idx = self.buckets(cat_ids)  # [B, M, H]
        if self.codebook.shape[0] == 1:
            cw = self.codebook[0][idx]  # [B, M, H, d_c]  -- the big eager intermediate
        else:
            cw = torch.stack([self.codebook[h][idx[..., h]] for h in range(self.num_hashes)], dim=2)
        v = self.restore(cw.flatten(2))  # [B, M, d]
        w = self.attention(E)  # [B, M]
        return torch.einsum("sm,bmd->bsd", self.incidence, w[..., None] * v)


class MemoNet(nn.Module):
    """MemoNet as a FIM: ``num_hcnets`` HCNets; output Linear([e ; flatten(U_1) ; ...] -> h).

    ``fields``: categorical field positions to cross (None = all categorical fields).
    """

    def __init__(self, num_fields: int, embed_dim: int, output_dim: int, num_categorical: int,
                 fields: Sequence[int] | None = None, num_hcnets: int = 2, num_hashes: int = 2,
                 num_buckets: int = 100_000, codebook_dim: int = 16, shared_codebook: bool = True, device=None, **_):
        super().__init__()
        fields = list(range(num_categorical)) if fields is None else list(fields)
        bad = [f for f in fields if not 0 <= f < num_categorical]
        if bad:
            raise ValueError(f"MemoNet fields {bad} are not categorical field positions (0..{num_categorical - 1})")
        self.hcnets = nn.ModuleList(
            HCNet(fields, num_fields, embed_dim, num_hashes, num_buckets, codebook_dim, shared_codebook, index=n,
                  device=device)
            for n in range(num_hcnets)
        )
        D = num_fields * embed_dim
        self.proj = nn.Linear(D + num_hcnets * len(fields) * embed_dim, output_dim, device=device)
        self.output_dim = output_dim

    def forward(self, E: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        parts = [E.flatten(1)] + [net(E, cat_ids).flatten(1) for net in self.hcnets]
        return self.proj(torch.cat(parts, dim=1))
