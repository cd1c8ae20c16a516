"""The input layer: every field becomes one d-vector, E in R^{B x F x d}.

All categorical and multi-valued tables live in one weight buffer with per-table row
offsets (the table-batched layout), so a single ``dtn_kernels.ops.embedding_bag`` call
(the compiled ``torch.ops.dtn.embedding_bag`` when built) serves every field. Setting
``embedding_kernel = "reference"`` makes the layer call the pure-PyTorch twin instead
(aten ops only, e.g. for ``torch.export``; ``dtn export`` does this).

Id checks: ids on the CPU are checked in ``forward`` (one vectorised test per table, errors
name the feature, the row and the id). Ids already on a GPU are not: reading the result of a
check there would make the host wait for the GPU every step. Check the host copy of a batch
with :meth:`InputLayer.check_batch` before moving it (``dtn.train.Trainer`` does); the CUDA
op's device-side flag is the backstop (``dtn_kernels.ops.embedding_bag.raise_pending_errors``).

Fused sparse optimizers (``train.embedding_optimizer``): :meth:`InputLayer.use_sparse_optimizer`
attaches one; training lookups then update the touched rows inside the backward
(:mod:`dtn.features.fused_embedding`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dtn_kernels.ops import embedding_bag
from dtn_kernels.reference.pt_embedding_bag import pt_embedding_bag

from .fused_embedding import SparseEmbeddingOptimizer, fused_embedding_bag, is_optimizer_state_key
from .schema import FeatureBatch, Schema


class InputLayer(nn.Module):
    """Embeds a :class:`FeatureBatch` into E [B, F, d].

    Field order: categorical fields, multi-valued fields, numeric fields (as listed in
    the schema within each kind).

    Example::

        >>> from dtn.features import FeatureSpec, Schema, FeatureBatch
        >>> s = Schema([FeatureSpec("a", cardinality=5), FeatureSpec("x", kind="numeric")], labels=["t"])
        >>> layer = InputLayer(s, embed_dim=4)
        >>> E = layer(FeatureBatch(torch.tensor([[1], [4]]), torch.tensor([[0.5], [-1.0]])))
        >>> tuple(E.shape)
        (2, 2, 4)
    """

    own_sparse_optimizer = True  # the trainer may attach a fused sparse optimizer (use_sparse_optimizer)

    def __init__(self, schema: Schema, embed_dim: int, validate: bool = True, init_std: float = 0.05, device=None):
        super().__init__()
        self._set_fields(schema, embed_dim, validate)
        self.embedding_kernel = "auto"  # "auto": the compiled op when built; "reference": the PyTorch twin
        cards = self.cardinalities
        offsets = [0]
        for c in cards:
            offsets.append(offsets[-1] + c)
        self.register_buffer("table_offsets", torch.tensor(offsets, dtype=torch.long, device=device), persistent=False)
        # scaled in place: no second [R, d] temporary (the same values as randn(...) * init_std)
        self.weight = nn.Parameter(torch.randn(max(offsets[-1], 1), embed_dim, device=device).mul_(init_std))
        n_num = len(self.num_names)
        self.numeric_weight = nn.Parameter(torch.randn(n_num, embed_dim, device=device) * init_std)
        self.numeric_bias = nn.Parameter(torch.zeros(n_num, embed_dim, device=device))
        self.register_module("sparse_optimizer", None)  # a SparseEmbeddingOptimizer once attached

    def _set_fields(self, schema: Schema, embed_dim: int, validate: bool) -> None:
        """The field lists and table sizes every input layer keeps (this one and the TorchRec one)."""
        self.embed_dim = embed_dim
        self.validate = validate
        self.cat_names = [f.name for f in schema.categorical]
        self.multi_names = [f.name for f in schema.multi]
        self.num_names = [f.name for f in schema.numeric]
        self.multi_pooling = [f.pooling for f in schema.multi]
        for f in schema.categorical + schema.multi:
            if f.cardinality < 1:
                raise ValueError(f"feature {f.name!r}: cardinality must be >= 1 (fit the encoder first), got {f.cardinality}")
        self.cardinalities = [f.cardinality for f in schema.categorical + schema.multi]
        self._cards_host = torch.tensor(self.cardinalities, dtype=torch.long)  # host id checks never touch the GPU

    def use_sparse_optimizer(self, optimizer: str, lr: float, weight_decay: float = 0.0, **options) -> SparseEmbeddingOptimizer:
        """Attach a fused sparse optimizer (``sgd``, ``rowwise_adagrad``, ``lazy_adam``) to ``weight``:
        training lookups then update the rows they touch in their backward (``weight.grad`` stays
        None; leave ``weight`` out of the dense optimizer). Returns it (its state is zero, step 0)."""
        self.sparse_optimizer = SparseEmbeddingOptimizer(optimizer, self.weight.shape[0], self.embed_dim, lr,
                                                         weight_decay, device=self.weight.device, **options)
        return self.sparse_optimizer

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the fused optimizer's state is optional: a model file (best.pt) has none (the layer's own state is
        # kept), and a layer without an optimizer ignores it
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.sparse_optimizer is None:
            extra = [k for k in unexpected_keys if k.startswith(prefix) and is_optimizer_state_key(k[len(prefix):])]
            for k in extra:
                unexpected_keys.remove(k)

    def _fused_training(self) -> bool:
        return (self.sparse_optimizer is not None and self.training and torch.is_grad_enabled()
                and not torch.compiler.is_compiling())

    @property
    def num_fields(self) -> int:
        return len(self.cat_names) + len(self.multi_names) + len(self.num_names)

    @property
    def field_names(self) -> list[str]:
        return self.cat_names + self.multi_names + self.num_names

    @property
    def output_dim(self) -> int:
        return self.num_fields * self.embed_dim

    def _check_ids(self, ids: torch.Tensor, start: int, names: Sequence[str], values: bool = True) -> None:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"categorical ids must be int32/int64, got {ids.dtype}")
        if not values:
            return
        # one vectorised test (on a GPU tensor, one host sync); the column loop runs only to name an error
        ids2 = ids if ids.dim() == 2 else ids[:, None]
        cards = self._cards_host[start:start + len(names)].to(ids2.device)
        bad = (ids2 < 0) | (ids2 >= cards)
        if not bool(bad.any()):
            return
        j = int(bad.any(0).nonzero()[0, 0])
        row = int(bad[:, j].nonzero()[0, 0])
        card = self.cardinalities[start + j]
        raise IndexError(f"feature {names[j]!r}: id {int(ids2[row, j])} at row {row} is outside its table [0, {card})")

    def _check_jagged(self, jf, name: str, values: bool = True) -> None:
        if jf.offsets.dim() != 1 or jf.values.dim() != 1:
            raise ValueError(f"feature {name!r}: values and offsets must be 1-D")
        if not values:
            return
        if jf.offsets.numel() < 1 or int(jf.offsets[0]) != 0 or int(jf.offsets[-1]) != jf.values.numel():
            raise ValueError(
                f"feature {name!r}: offsets must start at 0 and end at len(values)={jf.values.numel()}, got "
                f"{jf.offsets.tolist() if jf.offsets.numel() <= 8 else jf.offsets[[0, -1]].tolist()}"
            )

    def _jagged_input(self, cat: torch.Tensor, multi) -> tuple:
        """All tables' ids as one table-major jagged input for ``dtn_kernels.ops.embedding_bag``.

        Categorical field t is table t with B bags of one id; multi-valued field j is table
        C + j with its own bags. Returns (indices, offsets, mode, per_sample_weights).
        """
        B, C = cat.shape
        device = self.weight.device
        idx_parts = [cat.t().reshape(-1).long()]
        end_parts = [torch.arange(C * B + 1, device=device)]  # 0, then the end of every one-id bag
        base = C * B
        modes = set(self.multi_pooling)
        mixed = len(modes) > 1
        mode = "sum" if mixed or not modes else modes.pop()
        need_psw = mixed or any(jf.weights is not None for jf in multi)
        psw_parts = [self.weight.new_ones(C * B)] if need_psw else []
        for j, jf in enumerate(multi):
            n = jf.values.numel()
            offsets = jf.offsets.long()
            idx_parts.append(jf.values.long())
            end_parts.append(offsets[1:] + base)
            base += n
            if need_psw:
                w = self.weight.new_ones(n) if jf.weights is None else jf.weights.to(self.weight.dtype)
                if mixed and self.multi_pooling[j] == "mean":  # mean as a sum with weights w / len(bag)
                    lengths = offsets[1:] - offsets[:-1]
                    w = w / torch.repeat_interleave(lengths.clamp_min(1), lengths, output_size=n).to(w.dtype)
                psw_parts.append(w)
        psw = torch.cat(psw_parts) if need_psw else None
        return torch.cat(idx_parts), torch.cat(end_parts), mode, psw

    def _check_shapes(self, batch: FeatureBatch) -> None:
        cat = batch.categorical
        n_cat = len(self.cat_names)
        if cat.dim() != 2 or cat.shape[1] != n_cat:
            raise ValueError(f"categorical ids must be [B, {n_cat}] ({self.cat_names}), got {tuple(cat.shape)}")
        if len(batch.multi) != len(self.multi_names):
            raise ValueError(f"expected {len(self.multi_names)} multi-valued fields {self.multi_names}, got {len(batch.multi)}")

    def _check_numeric(self, x: torch.Tensor) -> None:
        n_num = len(self.num_names)
        if x.dim() != 2 or x.shape[1] != n_num:
            raise ValueError(f"numeric values must be [B, {n_num}] ({self.num_names}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"numeric values must be floating point, got {x.dtype}")

    def _check_tables(self, batch: FeatureBatch, force: bool) -> None:
        """dtypes always; values (id ranges, jagged offsets) of tensors on the CPU, or of all when ``force``."""
        n_cat = len(self.cat_names)
        if n_cat:
            self._check_ids(batch.categorical, 0, self.cat_names, force or batch.categorical.device.type == "cpu")
        for j, jf in enumerate(batch.multi):
            on_host = jf.values.device.type == "cpu" and jf.offsets.device.type == "cpu"
            self._check_jagged(jf, self.multi_names[j], force or on_host)
            self._check_ids(jf.values, n_cat + j, [self.multi_names[j]], force or on_host)

    def check_batch(self, batch: FeatureBatch) -> None:
        """Validate ``batch`` as ``forward`` does on the CPU: shapes, dtypes, jagged offsets and
        every id against its table (errors name the feature, the row and the id).

        Cheap and vectorised. Meant for the host copy of a batch, before it moves to a GPU
        (``forward`` does not check the values of GPU tensors: that would make the host wait for
        the GPU every step); on GPU tensors it works but synchronises.
        """
        self._check_shapes(batch)
        if self.num_names:
            self._check_numeric(batch.numeric)
        self._check_tables(batch, force=True)

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        cat = batch.categorical
        B = cat.shape[0]
        n_cat = len(self.cat_names)
        self._check_shapes(batch)
        parts = []
        n_tables = n_cat + len(self.multi_names)
        if n_tables:
            if self.validate and not torch.compiler.is_compiling():
                self._check_tables(batch, force=False)  # values only where they are on the host
            indices, offsets, mode, psw = self._jagged_input(cat, batch.multi)
            # one table-batched lookup for every categorical and multi-valued field
            if self._fused_training():  # the optimizer runs inside the backward, on the touched rows
                pooled = fused_embedding_bag(self.weight, self.sparse_optimizer, self.table_offsets, indices, offsets,
                                             mode, psw, reference=self.embedding_kernel == "reference")
            else:
                bag = pt_embedding_bag if self.embedding_kernel == "reference" else embedding_bag
                pooled = bag(self.weight, self.table_offsets, indices, offsets, mode, psw)
            parts.append(pooled.view(B, n_tables, self.embed_dim))
        n_num = len(self.num_names)
        if n_num:
            x = batch.numeric
            self._check_numeric(x)
            parts.append(x[:, :, None].to(self.numeric_weight.dtype) * self.numeric_weight + self.numeric_bias)
        if not parts:
            raise ValueError("the schema has no features")
        E = torch.cat(parts, dim=1)
        assert E.shape[0] == B
        return E
