"""Sharded embedding tables: the TorchRec input layer (``model.embeddings: torchrec``) under TorchRec's
``DistributedModelParallel`` (DMP).

``dtn train`` under ``torchrun`` with ``model.embeddings=torchrec`` (or in one process with
``model.torchrec.shard=always``) wraps the model in DMP: TorchRec's ``EmbeddingShardingPlanner``
places every table (table-wise, column-wise; row-wise and table-row-wise on CUDA only), FBGEMM
runs the tables with their optimizer fused into the backward (:func:`fused_optimizer`), and the
dense part (numeric embeddings, FIMs, gates, towers) is data-parallel (DDP), trained by the
trainer's Adam. gloo on CPU, NCCL on CUDA (:func:`dtn.distributed.init_from_env`).

Settings (``model.torchrec``): ``sharding`` (one sharding type for every table, or
``{feature: type}``), ``memory_budget_mb`` (the embedding memory one process may hold: the
planner's ``Topology`` capacity), ``column_shard_dim`` (the width of a column-wise shard).
The plan is printed (per table: sharding type, ranks) and written to ``OUT/plan.json`` with
the bytes of table and optimizer state each rank holds.

Checkpoints: ``best.pt`` / ``last.pt`` hold what they always hold except the tables, and name a
``torch.distributed.checkpoint`` folder beside them (``best.e<epoch>.dcp``, ``last.e<epoch>.dcp``)
that every rank writes its shards into (with the fused optimizer's state for last). Resuming
loads them into whatever plan this run has (another number of processes included: DCP
reshards); :func:`load_full_tables` reads them into one process (``dtn evaluate``,
``dtn export``, the analyses).
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import warnings

import torch
import torch.distributed as dist

from .. import distributed as D
from ..config import ConfigError, TrainConfig
from .embedding_optim import embedding_lr

MODEL_PARALLEL = ("table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise")
CUDA_ONLY = ("row_wise", "table_row_wise")
# train.embedding_optimizer -> the torchrec optimizer class whose FBGEMM EmbOptimType runs fused
FUSED = {"sgd": "SGD", "rowwise_adagrad": "RowWiseAdagrad", "lazy_adam": "Adam"}
FUSED_CPU = ("sgd", "rowwise_adagrad")
TRAIN_DEFAULTS = TrainConfig()


@contextlib.contextmanager
def quiet_torchrec():
    """TorchRec's and DCP's advice to their own developers (deprecations, planner hints) off the console."""
    loggers = [logging.getLogger(n) for n in ("torchrec", "torch.fx._symbolic_trace")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def wanted(config, world_size: int, resume=None) -> bool:
    """Whether this run trains sharded: TorchRec tables under torchrun (or shard=always), or a resumed
    sharded run (a sharded run stays sharded, on any number of processes)."""
    if config.model.embeddings != "torchrec":
        return False
    if isinstance(resume, dict) and resume.get("sharded"):
        return True
    return world_size > 1 or config.model.torchrec.get("shard") == "always"


def check_embedding_optimizer(config, sharded: bool) -> None:
    """train.embedding_optimizer other than adam: the sharded tables' fused optimizer. Unsharded TorchRec tables
    are plain parameters of the dense Adam: with any other optimizer (the default rowwise_adagrad included) the run
    stops and says what to set, rather than training the tables with another optimizer than the config names."""
    name = config.train.embedding_optimizer
    if not sharded and name != "adam" and config.model.embeddings == "torchrec":
        default = " (the default)" if name == TRAIN_DEFAULTS.embedding_optimizer else ""
        raise ConfigError(f"train.embedding_optimizer = {name!r}{default}: with model.embeddings = 'torchrec' it runs "
                          "fused on sharded tables only (under torchrun, or model.torchrec.shard=always); unsharded "
                          "TorchRec tables train with the dense Adam: add --set train.embedding_optimizer=adam "
                          "(or model.embeddings=own, whose tables run every embedding optimizer)")


def check_request(config, world_size: int) -> None:
    """A sharded run's table optimizer, before any data is read (dtn train). (An unsharded run's is checked
    by train_model, which knows whether it resumes a sharded checkpoint: that one stays sharded.)"""
    if wanted(config, world_size):
        fused_optimizer(config.train, torch.device(config.train.device))


def fused_optimizer(train_cfg, device: torch.device):
    """(torchrec optimizer class, its kwargs) for the sharded tables: FBGEMM runs it in the backward on the
    rows of the batch. sgd -> EXACT_SGD, rowwise_adagrad -> EXACT_ROWWISE_ADAGRAD, lazy_adam -> ADAM (CUDA)."""
    import torchrec.optim as trec_optim

    name = train_cfg.embedding_optimizer
    allowed = FUSED_CPU if device.type == "cpu" else tuple(FUSED)
    if name not in allowed:
        why = ("Adam on every row is not a fused optimizer (lazy_adam is FBGEMM's Adam on the rows of the batch)"
               if name == "adam" else "FBGEMM's CPU kernels fuse sgd and rowwise_adagrad only")
        raise ConfigError(f"train.embedding_optimizer = {name!r}: sharded TorchRec tables on {device.type} run their "
                          f"optimizer fused into the backward and {why}; allowed: {', '.join(map(repr, allowed))} "
                          "(e.g. --set train.embedding_optimizer=rowwise_adagrad)")
    lr = embedding_lr(train_cfg)  # the same default per optimizer as the own input layer
    return getattr(trec_optim, FUSED[name]), {"lr": lr}


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when none was joined (DMP needs one)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def _constraints(layer, opts: dict, device: torch.device) -> dict:
    """The planner's ParameterConstraints per table from model.torchrec.sharding / column_shard_dim."""
    from torchrec.distributed.planner import ParameterConstraints

    sharding = opts.get("sharding")
    features = dict(zip(layer.feature_keys, layer.table_names))
    if sharding is None:
        forced = {}
    elif isinstance(sharding, str):
        forced = {t: sharding for t in layer.table_names}
    elif isinstance(sharding, dict):
        unknown = [k for k in sharding if k not in features]
        if unknown:
            raise ConfigError(f"model.torchrec.sharding: {unknown[:3]} are not categorical or multi-valued features; "
                              f"allowed keys: {list(features)[:8]}{' ...' if len(features) > 8 else ''}")
        forced = {features[k]: v for k, v in sharding.items()}
    else:
        raise ConfigError(f"model.torchrec.sharding = {sharding!r}: allowed: null, a sharding type, or {{feature: type}}")
    allowed = [t for t in MODEL_PARALLEL if device.type == "cuda" or t not in CUDA_ONLY]
    for table, kind in forced.items():
        if kind not in allowed:
            why = " (TorchRec has no CPU kernel for it: CUDA only)" if kind in CUDA_ONLY else ""
            raise ConfigError(f"model.torchrec.sharding: {kind!r} for table {table!r}{why}; allowed on {device.type}: "
                              f"{', '.join(allowed)}")
    width = opts.get("column_shard_dim")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1
                              or layer.embed_dim % width):
        raise ConfigError(f"model.torchrec.column_shard_dim = {width!r}: allowed: null or a divisor of model.embed_dim "
                          f"({layer.embed_dim})")
    out = {}
    for t in layer.table_names:
        kw = {"sharding_types": [forced[t]] if t in forced else allowed}
        if width is not None:
            kw["min_partition"] = width
        out[t] = ParameterConstraints(**kw)
    return out


def _budget_bytes(opts: dict) -> int | None:
    mb = opts.get("memory_budget_mb")
    if mb is None:
        return None
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb > 0:
        raise ConfigError(f"model.torchrec.memory_budget_mb = {mb!r}: allowed: null or a number of MiB > 0")
    return int(mb * 2**20)


def plan_table(plan, layer) -> list[dict]:
    """Per table: its feature, shape, sharding type, kernel, ranks and shards (offsets, sizes, rank)."""
    rows = []
    by_table = {}
    for module_plan in plan.plan.values():
        by_table.update(module_plan)
    for feature, table, card in zip(layer.feature_keys, layer.table_names, layer.cardinalities):
        ps = by_table[table]
        shards = []
        spec = getattr(ps, "sharding_spec", None)
        for s in getattr(spec, "shards", []) or []:
            shards.append({"rank": s.placement.rank(), "offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes)})
        rows.append({"table": table, "feature": feature, "rows": card, "dim": layer.embed_dim,
                     "sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                     "ranks": list(ps.ranks or []), "shards": shards})
    return rows


class ShardedEmbeddings:
    """A model whose TorchRec input layer is sharded by DMP; ``module`` is what the trainer calls."""

    def __init__(self, model, config, device: torch.device, log=print):
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.types import ShardingEnv
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        layer = model.input_layer
        if getattr(layer, "ebc", None) is None:
            raise ConfigError("model.embeddings = 'torchrec' shards categorical and multi-valued tables; this schema "
                              "has none (use model.embeddings=own)")
        if config.train.amp != "off":
            raise ConfigError(f"train.amp = {config.train.amp!r}: sharded TorchRec tables run in float32; allowed with "
                              "them: 'off'")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        ensure_process_group(device)
        self.model, self.config, self.device = model, config, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        opts = config.model.torchrec
        cls, kwargs = fused_optimizer(config.train, device)
        self.table_keys = [f"input_layer.ebc.embedding_bags.{t}.weight" for t in layer.table_names]
        initial = None if layer.deferred else \
            {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.table_keys}
        apply_optimizer_in_backward(cls, list(layer.ebc.parameters()), kwargs)
        budget = _budget_bytes(opts)
        cap = {} if budget is None else ({"hbm_cap": budget} if device.type == "cuda" else {"ddr_cap": budget})
        with quiet_torchrec():
            topology = Topology(world_size=self.world, compute_device=device.type, **cap)
            planner = EmbeddingShardingPlanner(topology=topology, constraints=_constraints(layer, opts, device))
        sharder = EmbeddingBagCollectionSharder()
        pg = dist.GroupMember.WORLD
        try:
            with quiet_torchrec():
                plan = planner.collective_plan(model, [sharder], pg)
        except Exception as exc:  # PlannerError: nothing fits the budget / no kernel for a forced type
            if type(exc).__name__ not in ("PlannerError",):
                raise
            first = " ".join(str(exc).split())[:300]
            raise ConfigError(f"model.torchrec: the TorchRec planner found no sharding plan for {self.world} process(es) "
                              f"({first}); raise model.torchrec.memory_budget_mb or use more processes") from None
        empty = [n for n, p in model.named_parameters() if p.numel() == 0]  # e.g. no numeric features
        with quiet_torchrec():
            self.module = DistributedModelParallel(
                model, env=ShardingEnv.from_process_group(pg), device=device, plan=plan, sharders=[sharder],
                data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False, params_to_ignore=empty))
        self._init_shards(initial)  # DMP allocates its own shards: give them their initial weights
        self.plan = {"world_size": self.world, "device": device.type, "memory_budget_mb": opts.get("memory_budget_mb"),
                     "embedding_optimizer": config.train.embedding_optimizer, "tables": plan_table(plan, layer),
                     "bytes_per_rank": D.all_gather_objects(self.local_bytes())}
        log(self.describe())

    # ---- parameters ---------------------------------------------------------------------
    def dense_parameters(self) -> list:
        """What the trainer's optimizer steps: every parameter but the tables (their optimizer is fused)."""
        return [p for p in self.model.parameters() if not hasattr(p, "_in_backward_optimizers")]

    def _sharded_state(self) -> dict:
        return {k: v for k, v in self.model.state_dict().items() if k in self.table_keys}

    def _init_shards(self, initial: dict | None) -> None:
        """The unsharded model's weights (``initial``), or for deferred tables (built on the meta device:
        the usual case, see dtn.features.torchrec_input.deferred_tables) each shard's rows drawn alone."""
        from ..features.torchrec_input import table_init

        layer = self.model.input_layer
        with torch.no_grad():
            for i, (key, st) in enumerate(self._sharded_state().items()):
                t = self.table_keys.index(key)
                for shard in st.local_shards():
                    (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    if initial is not None:
                        shard.tensor.copy_(initial[key][r:r + h, c:c + w])
                    else:
                        shard.tensor.copy_(table_init(layer.table_seed, t, layer.cardinalities[t], slice(r, r + h),
                                                      slice(c, c + w), layer.embed_dim, layer.init_std))

    def local_bytes(self) -> dict:
        """Bytes of table shards and of their fused optimizer state held by this rank."""
        tables = sum(s.tensor.numel() * s.tensor.element_size() for st in self._sharded_state().values()
                     for s in st.local_shards())
        state = 0
        for per_param in self.module.fused_optimizer.state_dict()["state"].values():
            for v in per_param.values():
                if hasattr(v, "local_shards"):
                    state += sum(s.tensor.numel() * s.tensor.element_size() for s in v.local_shards())
        return {"tables": tables, "optimizer_state": state}

    def describe(self) -> str:
        lines = [f"sharding plan ({self.world} process(es), {self.device.type}, tables' optimizer "
                 f"{self.config.train.embedding_optimizer} fused):"]
        for t in self.plan["tables"]:
            shards = ", ".join(f"rank {s['rank']}: rows {s['offsets'][0]}+{s['sizes'][0]} cols {s['offsets'][1]}+"
                               f"{s['sizes'][1]}" for s in t["shards"])
            lines.append(f"  {t['feature']:<20} [{t['rows']} x {t['dim']}] {t['sharding_type']:<12} ranks "
                         f"{t['ranks']} ({shards})")
        lines.append("  embedding bytes per rank (tables + optimizer state): " + ", ".join(
            f"rank {r}: {b['tables'] + b['optimizer_state']:,}" for r, b in enumerate(self.plan["bytes_per_rank"])))
        return "\n".join(lines)

    def write_plan(self, out_dir: str) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(json.dumps(self.plan, indent=2), os.path.join(out_dir, "plan.json"))

    # ---- checkpoints --------------------------------------------------------------------
    def strip(self, payload: dict, folder: str) -> dict:
        """A checkpoint payload without the tables (``model_state``: the dense part), naming ``folder``."""
        payload["model_state"] = {k: v for k, v in payload["model_state"].items() if k not in self.table_keys}
        payload["sharded"] = {"dir": folder, "tables": list(self.table_keys), "world_size": self.world,
                              "plan": self.plan["tables"]}
        return payload

    def save(self, out_dir: str, name: str, epoch: int, payload_fn, optimizer: bool) -> None:
        """Every rank writes its shards to OUT/<name>.e<epoch>.dcp; then rank 0 writes OUT/<name>.pt (from
        ``payload_fn()``) naming it and removes the older folders of that name."""
        import torch.distributed.checkpoint as dcp

        folder = f"{name}.e{epoch}.dcp"
        path = os.path.join(out_dir, folder)
        if self.rank == 0 and os.path.exists(path):
            shutil.rmtree(path)  # left by an interrupted run
        D.barrier()
        state = {"model": self._sharded_state()}
        if optimizer:
            state["optim"] = self.module.fused_optimizer.state_dict()
        with quiet_torchrec():
            dcp.save(state, checkpoint_id=path)
        D.barrier()
        if self.rank == 0:
            from .checkpoint import atomic_save

            atomic_save(self.strip(payload_fn(), folder), os.path.join(out_dir, f"{name}.pt"))
            for old in glob.glob(os.path.join(out_dir, f"{name}.e*.dcp")):
                if os.path.basename(old) != folder:
                    shutil.rmtree(old, ignore_errors=True)
        D.barrier()

    def load(self, ckpt: dict, optimizer: bool) -> None:
        """The tables (and the fused optimizer's state) of a sharded checkpoint into this plan's shards,
        and its dense weights."""
        import torch.distributed.checkpoint as dcp

        from .checkpoint import CheckpointError

        path = _dcp_folder(ckpt)
        missing, unexpected = self.model.load_state_dict(ckpt["model_state"], strict=False)
        missing = [k for k in missing if k not in self.table_keys]
        if missing or unexpected:
            raise CheckpointError(f"{ckpt.get('_path', 'checkpoint')}: its dense weights do not fit this model "
                                  f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
        state = {"model": self._sharded_state()}
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        optimizer = optimizer and any(k.startswith("optim.") for k in saved)  # sgd keeps no state
        if optimizer:
            state["optim"] = self.module.fused_optimizer.state_dict()
        with quiet_torchrec():
            dcp.load(state, checkpoint_id=path)
        if optimizer:
            self.module.fused_optimizer.load_state_dict(state["optim"])

    def snapshot(self) -> dict:
        """This rank's weights (its table shards, the dense part), for the best epoch without an out_dir."""
        out = {}
        for k, v in self.model.state_dict().items():
            out[k] = [s.tensor.detach().clone() for s in v.local_shards()] if k in self.table_keys else v.detach().clone()
        return out

    def restore(self, snap: dict) -> None:
        state = self.model.state_dict()
        with torch.no_grad():
            for k, v in snap.items():
                if k in self.table_keys:
                    for shard, saved in zip(state[k].local_shards(), v):
                        shard.tensor.copy_(saved)
                else:
                    state[k].copy_(v)

    def equalize_forwards(self, done: int) -> None:
        """Every forward of a sharded model is collective: a rank that ran fewer evaluation batches than
        another runs one-row forwards until all ran the same number."""
        most = max(D.all_gather_objects(done))
        if most > done:
            batch = dummy_batch(self.model.input_layer, self.device)
            with torch.no_grad():
                for _ in range(most - done):
                    self.model(batch)


def dummy_batch(layer, device):
    """One row: id 0 in every table (valid in all), empty bags, numeric zeros."""
    from ..features import FeatureBatch, JaggedField

    multi = [JaggedField(torch.zeros(0, dtype=torch.long, device=device), torch.zeros(2, dtype=torch.long, device=device))
             for _ in layer.multi_names]
    return FeatureBatch(torch.zeros(1, len(layer.cat_names), dtype=torch.long, device=device),
                        torch.zeros(1, len(layer.num_names), device=device), multi)


def _dcp_folder(ckpt: dict) -> str:
    from .checkpoint import CheckpointError

    where = ckpt.get("_path", "checkpoint")
    path = os.path.join(os.path.dirname(os.path.abspath(where)), ckpt["sharded"]["dir"])
    if not os.path.isdir(path):
        raise CheckpointError(f"{where}: its sharded tables folder {path} is missing (a sharded checkpoint is the .pt "
                              "file and the .dcp folder it names; copy both)")
    return path


def load_full_tables(ckpt: dict) -> dict:
    """The model state of a sharded checkpoint in one process: its dense weights and its tables, read
    whole from the shards (DCP reshards them; no process group needed)."""
    import torch.distributed.checkpoint as dcp

    info = ckpt["sharded"]
    tables = {k: torch.empty(t["rows"], t["dim"]) for k, t in zip(info["tables"], info["plan"])}
    wrapped = {"model": tables}
    with quiet_torchrec():
        dcp.load(wrapped, checkpoint_id=_dcp_folder(ckpt), no_dist=True)
    return {**ckpt["model_state"], **wrapped["model"]}
