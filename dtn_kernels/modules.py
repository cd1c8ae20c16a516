"""The reference layers the fused ops twin: plain PyTorch, the CPU path and the documentation.

* :class:`GatedCrossLayer`, :class:`CrossNetwork` -- GDCN's gated cross network (Wang et al., CIKM
  2023), c_{l+1} = c_0 * (W_l c_l + b_l) * sigmoid(W_{g,l} c_l) + c_l; DCN-v2 without the gate.
* :class:`InstanceMask`, :class:`MaskBlock` -- MaskNet's instance-guided mask (Wang, She, Zhang
  2021), MaskBlock(v) = ReLU(LN(W_3 (mask(e) * v))), mask = W_2 ReLU(W_1 e + b_1) + b_2.
* :class:`HCNet` -- MemoNet's multi-hash codebook network (Zhang & Zhang, CIKM 2023): crosses of a
  subset of fields, H hashes into a codebook, linear memory restoring, SENet attentive shrinking.
* :class:`SoftmaxGate` -- softmax(W x + b) over K experts and their weighted sum.

:func:`dtn_kernels.set_kernels` turns each into its fused twin (``dtn_kernels.nn``) in place. The
model zoo (``dtn.layers``) builds its FIMs on these; this package never imports it.

The math is written once, in the ops' reference twins (``dtn_kernels.reference.pt_*``): these layers
hold the parameters and call the twins' forward functions (autograd through plain PyTorch).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import nn

from .hashing import field_salt, hash_seed
from .reference.pt_gated_cross import pt_gated_cross
from .reference.pt_hcnet import pt_hcnet_buckets, pt_hcnet_from_buckets
from .reference.pt_masknet import pt_instance_mask, pt_mask_block_forward
from .reference.pt_softmax_gate import pt_softmax_gate


class GatedCrossLayer(nn.Module):
    """One cross layer. Parameters: ``weight`` [D, D], ``bias`` [D], ``gate_weight`` [D, D] (gated only)."""

    def __init__(self, dim: int, gated: bool = True, device=None):
        super().__init__()
        self.dim = dim
        self.gated = gated
        bound = dim ** -0.5
        self.weight = nn.Parameter(torch.empty(dim, dim, device=device).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(dim, device=device))
        if gated:
            self.gate_weight = nn.Parameter(torch.empty(dim, dim, device=device).uniform_(-bound, bound))
        else:
            self.register_parameter("gate_weight", None)

    def forward(self, x0: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
        return pt_gated_cross(x0, xl, self.weight, self.bias, self.gate_weight if self.gated else None)


class CrossNetwork(nn.Module):
    """L stacked cross layers on e [B, D] -> c_L [B, D]."""

    def __init__(self, dim: int, num_layers: int = 2, gated: bool = True, device=None):
        super().__init__()
        self.layers = nn.ModuleList(GatedCrossLayer(dim, gated, device=device) for _ in range(num_layers))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        x = e
        for layer in self.layers:
            x = layer(e, x)
        return x


class InstanceMask(nn.Module):
    """e [B, D_in] -> mask [B, D_out] through a hidden layer of ``hidden`` units."""

    def __init__(self, input_dim: int, hidden: int, output_dim: int, device=None):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden, device=device)
        self.fc2 = nn.Linear(hidden, output_dim, device=device)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return pt_instance_mask(e, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)[1]


class MaskBlock(nn.Module):
    """ReLU(LayerNorm(W_3 (mask(e) * v))): v [B, D_v] -> [B, output_dim]."""

    def __init__(self, input_dim: int, value_dim: int, mask_hidden: int, output_dim: int, device=None):
        super().__init__()
        self.mask = InstanceMask(input_dim, mask_hidden, value_dim, device=device)
        self.hidden = nn.Linear(value_dim, output_dim, bias=False, device=device)
        self.norm = nn.LayerNorm(output_dim, device=device)

    def forward(self, e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        fc1, fc2, norm = self.mask.fc1, self.mask.fc2, self.norm
        return pt_mask_block_forward(e, v, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.hidden.weight, norm.weight,
                                     norm.bias, norm.eps)[0]


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
        self.field_list = tuple(fields)  # on the host: comparing HCNets must not read a device buffer
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
        """Bucket ids [B, M, H] of every cross under every hash (= ``dtn_kernels.hashing.cross_hash``)."""
        return pt_hcnet_buckets(cat_ids[:, self.fields], self.salts, self.seeds, self.num_buckets,
                                (self.pair_i, self.pair_j))

    def attention(self, E: torch.Tensor) -> torch.Tensor:
        return self.senet(E.mean(dim=-1))  # [B, M]

    def forward(self, E: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        # the gather builds the [B, M, H, d_c] codewords: the big eager intermediate the kernel avoids
        return pt_hcnet_from_buckets(self.buckets(cat_ids), self.codebook, self.restore.weight, self.attention(E),
                                     self.incidence)


class SoftmaxGate(nn.Module):
    """softmax(W x + b) over K experts, then the weighted sum of expert outputs.

    ``forward(x [B, D_in], experts [B, K, h], mask=None)`` returns (out [B, h], weights [B, K]).
    ``mask`` (bool [K]) switches experts off: their logits become -inf before the softmax.
    """

    def __init__(self, input_dim: int, num_experts: int, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.linear = nn.Linear(input_dim, num_experts, device=device)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor | None = None):
        return pt_softmax_gate(x, experts, self.linear.weight, self.linear.bias, mask)
