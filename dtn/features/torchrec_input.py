"""The TorchRec input layer (``model.embeddings: torchrec``): the same E [B, F, d] as
:class:`dtn.features.InputLayer`, with the tables held by a TorchRec ``EmbeddingBagCollection``.

* One table per categorical and multi-valued feature (a hashed feature's table has its
  ``hash_buckets`` rows), named after the feature; numeric fields as in ``InputLayer``
  (``value * v + b``). Field order: categorical, multi-valued, numeric.
* A :class:`FeatureBatch` becomes a ``KeyedJaggedTensor`` (one key per table: its values and
  lengths; a categorical field is a bag of one id per row). Every table pools by sum; a ``mean``
  bag and a weighted bag pass per-sample weights (``w / len(bag)`` for mean), exactly as
  ``InputLayer`` does for mixed pooling, so the two layers compute the same E.
* The initial weights are drawn as ``InputLayer`` draws them (one ``randn`` over all rows, then
  split per table): with one seed both layers start from the same weights, and
  :func:`own_state_dict` turns a TorchRec model's weights into the ``InputLayer`` model's
  (``dtn export`` exports that twin: its graph needs neither TorchRec nor FBGEMM).

Unsharded (one process), the collection is a plain module trained by the trainer's optimizer
like every other parameter. Under ``DistributedModelParallel`` (:mod:`dtn.train.sharded`) the
planner shards its tables and FBGEMM runs them.

TorchRec is optional and imported lazily: without it this module imports, and building the layer
raises a ``ConfigError`` saying how to install it (:func:`require_torchrec`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import re

import torch
from torch import nn

from .embedding import InputLayer
from .schema import FeatureBatch, Schema

INSTALL_HINT = ("bash scripts/install_torchrec.sh (CPU, torch 2.13: pip install fbgemm-gpu-cpu==1.8.0 && "
                "pip install --no-deps torchrec==1.8.0 && pip install pyre-extensions tensordict torchmetrics==1.0.3; "
                "README, TorchRec)")


@functools.lru_cache(maxsize=1)
def torchrec_status() -> tuple[bool, str]:
    """(usable, detail): whether ``torchrec`` and FBGEMM import with this torch, and their versions or
    the reason they do not (a missing package, a version that does not load with this torch)."""
    import importlib.util
    import warnings

    for mod, pkg in (("fbgemm_gpu", "fbgemm-gpu-cpu"), ("torchrec", "torchrec")):
        if importlib.util.find_spec(mod) is None:
            return False, f"{pkg} is not installed"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import fbgemm_gpu  # noqa: F401
            import torchrec  # noqa: F401
            from torchrec import EmbeddingBagCollection  # noqa: F401
    except Exception as exc:  # an undefined symbol: fbgemm built for another torch
        msg = " ".join(str(exc).split())[:200]
        return False, f"import failed ({type(exc).__name__}: {msg}); fbgemm 1.X pairs with torch 2.(X+5)"
    import importlib.metadata as md

    def ver(*names):
        for n in names:
            try:
                return md.version(n)
            except md.PackageNotFoundError:
                continue
        return "?"

    return True, f"torchrec {ver('torchrec')}, fbgemm-gpu {ver('fbgemm-gpu-cpu', 'fbgemm-gpu', 'fbgemm_gpu_cpu')}"


def require_torchrec(what: str = "model.embeddings = 'torchrec'") -> None:
    """Raise a one-line ConfigError naming how to install TorchRec when it is not usable."""
    ok, detail = torchrec_status()
    if not ok:
        from ..config import ConfigError

        raise ConfigError(f"{what} needs TorchRec, which is not usable here ({detail}); install it: {INSTALL_HINT}")


_DEFER = contextvars.ContextVar("dtn_defer_tables", default=False)
BLOCK_ROWS = 65536  # deferred tables are drawn in blocks of rows, each from its own seeded generator


@contextlib.contextmanager
def deferred_tables():
    """TorchRec input layers built inside hold their tables on the meta device (no memory): a process
    that will hold only some shards never allocates whole tables; :func:`table_init` fills each shard."""
    token = _DEFER.set(True)
    try:
        yield
    finally:
        _DEFER.reset(token)


def table_init(seed: int, table: int, num_rows: int, rows: slice, cols: slice, dim: int, std: float) -> torch.Tensor:
    """Rows ``rows`` and columns ``cols`` of deferred table ``table`` (``num_rows`` x ``dim``): its initial
    weights, N(0, std), the same whatever the shards (row block b of a table is drawn alone, from a generator
    seeded with (seed, table, b)); only the blocks the slice touches are drawn."""
    parts = []
    for b in range(rows.start // BLOCK_ROWS, -(-rows.stop // BLOCK_ROWS)):
        first = b * BLOCK_ROWS
        g = torch.Generator().manual_seed((seed * 1_000_003 + table * 65_537 + b) % 2**63)
        block = torch.randn(min(BLOCK_ROWS, num_rows - first), dim, generator=g)[:, cols] * std
        parts.append(block[max(rows.start, first) - first:min(rows.stop, first + BLOCK_ROWS) - first])
    return torch.cat(parts) if parts else torch.zeros(0, cols.stop - cols.start)


def table_names(schema: Schema) -> list[str]:
    """The EmbeddingBagCollection's table name of every categorical and multi-valued feature, in field
    order (a feature's name, made a valid module name; made unique with its position if needed)."""
    out, seen = [], set()
    for i, f in enumerate(schema.categorical + schema.multi):
        name = re.sub(r"[^0-9A-Za-z_]", "_", f.name) or f"t{i}"
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        out.append(name)
    return out


class TorchRecInputLayer(InputLayer):
    """Embeds a :class:`FeatureBatch` into E [B, F, d] through a TorchRec ``EmbeddingBagCollection``
    (``self.ebc``). The batch checks (shapes, dtypes, ids against their tables, jagged offsets) are
    ``InputLayer``'s, with the same messages."""

    # the trainer attaches no fused optimizer of the own layer here: sharded tables run FBGEMM's
    # (dtn.train.sharded), and unsharded ones train with the dense Adam
    own_sparse_optimizer = False

    def __init__(self, schema: Schema, embed_dim: int, validate: bool = True, init_std: float = 0.05, device=None):
        require_torchrec()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

        nn.Module.__init__(self)
        # torch warns once that TorchRec's is_fx_tracing check is ambiguous: not this model's concern
        import logging

        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
        self._set_fields(schema, embed_dim, validate)
        self.embedding_kernel = "torchrec"
        self.register_module("sparse_optimizer", None)  # never attached: see own_sparse_optimizer
        tables = schema.categorical + schema.multi
        self.table_names = table_names(schema)
        self.feature_keys = [f.name for f in tables]
        # per-sample weights: a weighted bag, or a mean bag (as a sum with weights 1 / len(bag))
        self.weighted = any(f.weighted or f.pooling == "mean" for f in schema.multi)
        device = torch.device(device or "cpu")
        self.init_std = init_std
        # deferred (sharded training): the tables stay on the meta device, drawn per shard by table_init
        self.deferred = _DEFER.get()
        self.table_seed = int(torch.randint(2**62, ())) if self.deferred else None
        # else the same draws as InputLayer (all table rows in one randn, then the numeric vectors)
        total = sum(self.cardinalities)
        full = None if self.deferred else torch.randn(max(total, 1), embed_dim, device=device) * init_std
        n_num = len(self.num_names)
        self.numeric_weight = nn.Parameter(torch.randn(n_num, embed_dim, device=device) * init_std)
        self.numeric_bias = nn.Parameter(torch.zeros(n_num, embed_dim, device=device))
        configs = [EmbeddingBagConfig(name=t, embedding_dim=embed_dim, num_embeddings=c, feature_names=[k],
                                      pooling=PoolingType.SUM)
                   for t, c, k in zip(self.table_names, self.cardinalities, self.feature_keys)]
        self.ebc = None
        if configs:  # built on the meta device (no random init), then given InputLayer's draws
            ebc = EmbeddingBagCollection(tables=configs, is_weighted=self.weighted, device=torch.device("meta"))
            if full is not None:
                ebc = ebc.to_empty(device=device)
                start = 0
                with torch.no_grad():
                    for t, c in zip(self.table_names, self.cardinalities):
                        ebc.embedding_bags[t].weight.copy_(full[start:start + c])
                        start += c
            self.ebc = ebc

    def to_kjt(self, batch: FeatureBatch):
        """The batch's categorical and multi-valued ids as one ``KeyedJaggedTensor`` (keys: the feature
        names in field order; a categorical feature: B bags of one id)."""
        from torchrec import KeyedJaggedTensor

        cat = batch.categorical
        B, C = cat.shape
        dev = cat.device
        values = [cat.t().reshape(-1).long()]
        lengths = [torch.ones(C * B, dtype=torch.long, device=dev)]
        weights = [torch.ones(C * B, device=dev)] if self.weighted else []
        for j, jf in enumerate(batch.multi):
            off = jf.offsets.long()
            n = jf.values.numel()
            lens = off[1:] - off[:-1]
            values.append(jf.values.long())
            lengths.append(lens)
            if self.weighted:
                w = torch.ones(n, device=dev) if jf.weights is None else jf.weights.float()
                if self.multi_pooling[j] == "mean":
                    w = w / torch.repeat_interleave(lens.clamp_min(1), lens, output_size=n).to(w.dtype)
                weights.append(w)
        return KeyedJaggedTensor(keys=self.feature_keys, values=torch.cat(values), lengths=torch.cat(lengths),
                                 weights=torch.cat(weights) if self.weighted else None)

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        cat = batch.categorical
        B = cat.shape[0]
        self._check_shapes(batch)
        parts = []
        if self.feature_keys:
            if self.validate and not torch.compiler.is_compiling():
                self._check_tables(batch, force=False)
            pooled = self.ebc(self.to_kjt(batch)).to_dict()  # KeyedTensor; a sharded one may order keys otherwise
            parts.append(torch.stack([pooled[k] for k in self.feature_keys], dim=1))
        if self.num_names:
            x = batch.numeric
            self._check_numeric(x)
            parts.append(x[:, :, None].to(self.numeric_weight.dtype) * self.numeric_weight + self.numeric_bias)
        if not parts:
            raise ValueError("the schema has no features")
        return torch.cat(parts, dim=1)


def build_input_layer(schema: Schema, cfg, device=None) -> InputLayer:
    """The input layer ``cfg.embeddings`` names: ``own`` (InputLayer) or ``torchrec``."""
    if getattr(cfg, "embeddings", "own") == "torchrec":
        return TorchRecInputLayer(schema, cfg.embed_dim, device=device)
    return InputLayer(schema, cfg.embed_dim, device=device)


def own_state_dict(state: dict, schema: Schema, prefix: str = "input_layer.") -> dict:
    """A TorchRec-backed model's state dict (plain tensors) as the ``InputLayer`` model's: the tables
    concatenated into ``input_layer.weight`` in field order; every other key unchanged."""
    names = table_names(schema)
    keys = [f"{prefix}ebc.embedding_bags.{t}.weight" for t in names]
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"the state has no table(s) {missing[:3]}")
    out = {k: v for k, v in state.items() if k not in keys}
    if keys:
        out[f"{prefix}weight"] = torch.cat([state[k] for k in keys])
    else:
        out[f"{prefix}weight"] = state.get(f"{prefix}weight", torch.zeros(1, 1))
    return out


def own_twin(model):
    """A copy of ``model`` (unsharded, TorchRec-backed) with the own InputLayer and the same weights."""
    import dataclasses

    from ..models import build_model

    cfg = dataclasses.replace(model.cfg, embeddings="own")
    twin = build_model(model.cfg.name, model.schema, cfg, device="cpu")
    if getattr(model, "active", None) is not None and hasattr(twin, "apply_trim"):
        twin.apply_trim(model.active.cpu())  # a trimmed DTN: the same FIMs removed before its weights load
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    twin.load_state_dict(own_state_dict(state, model.schema))
    return twin
