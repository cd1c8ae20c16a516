"""SFM (FIMs in series before MMoE/PLE) and TFI (CGC whose experts are FIMs)."""
from __future__ import annotations

import torch
from torch import nn

from .base import Expert
from .mtl import PLE


class SFM(PLE):
    """Serial feature interaction (paper Fig. 1a): FIMs on e, concatenated, then MMoE/PLE with MLP experts."""

    def __init__(self, schema, cfg, device=None):
        if cfg.sfm_mtl not in ("mmoe", "ple"):
            raise ValueError(f"sfm_mtl must be 'mmoe' or 'ple', got {cfg.sfm_mtl!r}")
        kw = dict(num_specific=0, num_shared=cfg.num_experts, num_levels=1) if cfg.sfm_mtl == "mmoe" else {}
        z_dim = cfg.fim_dim * len(cfg.fims)
        super().__init__(schema, cfg, device, input_dim=z_dim, **kw)
        self.fims = nn.ModuleList(self.make_fim(kind, device) for kind in cfg.fims)

    def bottom_input(self, E, cat_ids):
        z = torch.cat([fim(E, cat_ids) for fim in self.fims], dim=1)
        return z, z


class TFI(PLE):
    """Task-specific feature interaction (paper Fig. 1b): CGC with FIM experts of one kind (``cfg.tfi_fim``)."""

    def __init__(self, schema, cfg, device=None, fim_kind: str | None = None):
        kind = fim_kind or cfg.tfi_fim

        def factory(level, d_in):
            if level == 0:
                return self.make_fim(kind, device)
            return Expert(d_in, cfg.expert_hidden, cfg.dropout)

        def dim(level, d_in):
            return cfg.fim_dim if level == 0 else (cfg.expert_hidden[-1] if cfg.expert_hidden else d_in)

        # make_fim needs the input layer's sizes, which MultiTaskModel.__init__ sets before experts are built
        super().__init__(schema, cfg, device, expert_factory=factory, expert_dim=dim)
        self.fim_kind = kind
