"""Configuration dataclasses, loadable from YAML, typed and validated.

Two packaged configurations: ``paper`` (the paper's offline setup: d = 16, every FIM
512 wide, batch 2048, Adam 1e-3) and ``cpu`` (sized for a 2-core CPU). ``load_config``
takes either name or a path to a YAML file; a YAML file may name a ``base`` config and
override only some keys.

Every field has a type (its annotation) and a valid range (its ``metadata``). A value is
converted to the field's type when it is built (``"1e-3"`` for a float field is 0.001; a
``--set`` value of a string field is taken verbatim) and checked against the range; a bad
value raises :class:`ConfigError` naming the key, the value and what is allowed, so a
mistake stops the command before any data is read.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .fileio import atomic_write_text, find_named_file, read_yaml

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
FIM_KINDS = ("gdcn", "dcnv2", "masknet", "memonet")
AMP_MODES = ("off", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "plateau")
EMBEDDING_OPTIMIZERS = ("adam", "sgd", "rowwise_adagrad", "lazy_adam")


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key, the value and what is allowed."""


class Text(str):
    """A value given as text on the command line (``--set key=text``): a string field takes it
    verbatim, any other field parses it as YAML first and then converts it to the field's type."""


def _f(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, **check):
    """A dataclass field with its valid range in ``metadata``: ge / gt / le (numbers, also every
    item of a list), choices, min_len and distinct (lists), options (the sub-keys of an option mapping); and
    applies ({other key of the section: values}: where the key has an effect at all)."""
    return field(default=default, default_factory=factory, metadata=check)


# option mappings of the FIMs: sub-key -> (type, range); a missing sub-key keeps its default
_POS = {"ge": 1}
FIM_OPTIONS: dict[str, dict[str, tuple[Any, dict]]] = {
    "gdcn": {"num_layers": (int, _POS)},
    "dcnv2": {"num_layers": (int, _POS)},
    "masknet": {"mode": (str, {"choices": ("serial", "parallel")}), "num_blocks": (int, _POS),
                "mask_hidden": (int, _POS), "block_dim": (int, _POS), "parallel_hidden": (list[int], _POS)},
    "memonet": {"fields": (Any, {}), "num_hcnets": (int, _POS), "num_hashes": (int, _POS),
                "num_buckets": (int, _POS), "codebook_dim": (int, _POS), "shared_codebook": (bool, {})},
}
# model.torchrec: the sharded TorchRec backend (dtn.train.sharded; checked there against the schema)
TORCHREC_OPTIONS: dict[str, tuple[Any, dict]] = {
    "shard": (str, {"choices": ("auto", "always")}),  # auto: DistributedModelParallel under torchrun; always: also alone
    "sharding": (Any, {}),  # null (the planner chooses), one sharding type for every table, or {feature: type}
    "memory_budget_mb": (Any, {}),  # null or the embedding memory one process may hold, for the planner
    "column_shard_dim": (Any, {}),  # null or the width of a column-wise shard (the planner's min_partition)
}


@dataclass
class ModelConfig:
    name: str = "dtn"
    embed_dim: int = _f(16, ge=1)
    # the input layer: "own" (dtn.features.InputLayer) or "torchrec" (an EmbeddingBagCollection, shardable)
    embeddings: str = _f("own", choices=("own", "torchrec"))
    torchrec: dict[str, Any] = _f(factory=lambda: {"shard": "auto", "sharding": None, "memory_budget_mb": None,
                                                   "column_shard_dim": None}, options=TORCHREC_OPTIONS)
    tower_hidden: list[int] = _f(factory=lambda: [128, 64], ge=1)
    dropout: float = _f(0.0, ge=0.0, lt=1.0)
    # MLP baselines
    bottom_hidden: list[int] = _f(factory=lambda: [512, 256], ge=1)  # Shared-Bottom
    expert_hidden: list[int] = _f(factory=lambda: [256, 128], ge=1)  # MMoE / PLE / SFM experts
    num_experts: int = _f(4, ge=1)  # MMoE
    num_specific_experts: int = _f(1, ge=0)  # PLE / CGC / TFI, per task
    num_shared_experts: int = _f(1, ge=0)
    num_levels: int = _f(1, ge=1)  # PLE levels (1 = CGC)
    # FIMs
    fim_dim: int = _f(512, ge=1)  # h, the output width of every FIM
    fims: list[str] = _f(factory=lambda: ["gdcn", "masknet", "memonet"], choices=FIM_KINDS, min_len=1, distinct=True)  # DTN's MFI, SFM's FIMs
    tfi_fim: str = _f("gdcn", choices=FIM_KINDS)  # the single FIM kind of TFI
    sfm_mtl: str = _f("ple", choices=("mmoe", "ple"))  # SFM's multi-task network on top of the FIMs
    gdcn: dict[str, Any] = _f(factory=lambda: {"num_layers": 2}, options=FIM_OPTIONS["gdcn"])
    dcnv2: dict[str, Any] = _f(factory=lambda: {"num_layers": 2}, options=FIM_OPTIONS["dcnv2"])
    masknet: dict[str, Any] = _f(factory=lambda: {"mode": "serial", "num_blocks": 1, "mask_hidden": 640, "block_dim": 512},
                                 options=FIM_OPTIONS["masknet"])
    memonet: dict[str, Any] = _f(factory=lambda: {"fields": None, "num_hcnets": 2, "num_hashes": 2,
                                                  "num_buckets": 100_000, "codebook_dim": 16},
                                 options=FIM_OPTIONS["memonet"])
    # DTN
    tsn: bool = True  # Task-Sensitive Network
    task_order: Optional[list[str]] = None  # default: the schema's label order
    tsn_stop_gradient: bool = True
    gate_mode: str = _f("paper", choices=("paper", "reference"))  # "paper": softmax(W e); "reference": two softmaxes

    def __post_init__(self):
        _check(self, "model")
        fields_ = self.memonet.get("fields")
        ok = fields_ is None or (isinstance(fields_, int) and not isinstance(fields_, bool) and fields_ >= 2) or (
            isinstance(fields_, list) and len(fields_) >= 2 and all(isinstance(v, (int, str)) for v in fields_))
        if not ok:
            raise ConfigError(f"model.memonet.fields = {fields_!r}: allowed: null (all categorical fields), an integer "
                              ">= 2 (the first k fields) or a list of >= 2 field names / positions")


@dataclass
class TrainConfig:
    lr: float = _f(1e-3, gt=0.0)
    weight_decay: float = _f(0.0, ge=0.0)
    batch_size: int = _f(2048, ge=1)
    eval_batch_size: int = _f(8192, ge=1)
    epochs: int = _f(10, ge=1)
    patience: int = _f(2, ge=1)  # early stopping: epochs without improvement of the selection metric
    early_stop_metric: str = "mean_auc"  # or "auc/<task>"; undefined AUCs fall back to the validation loss
    task_weights: Optional[list[float]] = _f(None, ge=0.0)
    seed: int = _f(2024, ge=0)
    device: str = "cpu"
    num_threads: Optional[int] = _f(None, ge=1)
    grad_clip: Optional[float] = _f(None, gt=0.0)
    progress: bool = True
    shuffle: bool = True  # reshuffle the training rows every epoch (false: file order, e.g. to compare loaders)
    # torch.use_deterministic_algorithms: bit-exact reruns and resumes with several CPU threads
    # (without it some ATen CPU backward reductions differ in the last bit from run to run)
    deterministic: bool = False
    # mixed precision (dtn.train.precision): "bf16" autocast (CPU and CUDA), "fp16" autocast with a GradScaler
    amp: str = _f("off", choices=AMP_MODES)
    # the lr of every step (dtn.train.schedule): "constant", "cosine" (to min_lr over train.epochs) or
    # "plateau" (times plateau_factor after plateau_patience epochs without a better validation score)
    lr_schedule: str = _f("constant", choices=LR_SCHEDULES)
    warmup_steps: int = _f(0, ge=0)  # any schedule: the lr rises linearly over the first N optimizer steps
    min_lr: float = _f(0.0, ge=0.0, applies={"lr_schedule": ("cosine", "plateau")})  # cosine: the lr it decays to; plateau: the lr it is never cut below
    plateau_factor: float = _f(0.5, gt=0.0, lt=1.0, applies={"lr_schedule": ("plateau",)})
    plateau_patience: int = _f(1, ge=1, applies={"lr_schedule": ("plateau",)})
    # "static": the sum of the per-task losses (times task_weights); "uncertainty": learned weights
    # (Kendall et al. 2018, dtn.train.task_weighting)
    task_weighting: str = _f("static", choices=("static", "uncertainty"))
    log: str = _f("none", choices=("none", "tensorboard"))  # "tensorboard": event files in <out>/tensorboard
    # the embedding tables' optimizer (dtn.train.embedding_optim): a fused sparse one that updates only the rows
    # a batch touched: "rowwise_adagrad" (the default: Census-Income quality in the README), "sgd", "lazy_adam";
    # or "adam" (dense, with the other weights; the paper's, and unsharded TorchRec tables' only one)
    # (sharded TorchRec tables run it fused into FBGEMM's backward: dtn.train.sharded.fused_optimizer)
    embedding_optimizer: str = _f("rowwise_adagrad", choices=EMBEDDING_OPTIMIZERS)
    # its lr (the LR schedule scales it like train.lr); null: the optimizer's default
    # (dtn.train.embedding_optim.DEFAULT_EMBEDDING_LR: train.lr for adam and lazy_adam)
    embedding_lr: Optional[float] = _f(None, gt=0.0)
    # the allocator of CPU tensors while training on the CPU (dtn_kernels.cpu_allocator): "caching" recycles the
    # step's buffers (the step's memory is what it holds at once, no page faults after the first steps);
    # "system": torch's own (glibc's heap)
    cpu_allocator: str = _f("caching", choices=("caching", "system"), applies={"device": ("cpu",)})

    def __post_init__(self):
        _check(self, "train")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr = {self.min_lr}: allowed: <= train.lr ({self.lr})")
        if self.task_weighting == "uncertainty" and self.task_weights is not None:
            raise ConfigError(f"train.task_weights = {self.task_weights}: train.task_weighting = 'uncertainty' learns "
                              "the task weights; allowed with it: null")
        m = self.early_stop_metric
        if m != "mean_auc" and not (m.startswith("auc/") and len(m) > 4):
            raise ConfigError(f"train.early_stop_metric = {m!r}: allowed: 'mean_auc' or 'auc/<task>'")
        d = self.device
        if not (d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ConfigError(f"train.device = {d!r}: allowed: 'cpu', 'cuda' or 'cuda:N'")


# ``applies``: the values other keys of the section must have for a key to take effect; a key given on the
# command line where it would have none is refused (dtn.request_check.check_applicable)
_CENSUS, _TABLE = {"dataset": ("census",)}, {"dataset": ("table",)}


@dataclass
class DataConfig:
    dataset: str = _f("census", choices=("census", "synthetic", "table"))  # "table": your own CSV / Parquet file
    path: Optional[str] = _f(None, applies={"dataset": ("census", "table")})  # census: folder with the files (else $DTN_CENSUS_DIR, cache, download);
    # table: the train file(s), overriding the data schema's `train`
    split_seed: int = _f(2024, ge=0, applies={"dataset": ("census", "synthetic")})  # table: split.seed in its schema
    bucketize: int = _f(0, ge=0, applies=_CENSUS)  # census: > 0 adds a quantile-bucket categorical copy of each numeric column
    numeric_ids: int = _f(0, ge=0, applies=_CENSUS)  # census: > 0 adds a categorical copy of each numeric column (values seen >= this often)
    synthetic_rows: int = _f(20_000, ge=20, applies={"dataset": ("synthetic",)})  # at least 2 rows in each of the 80/10/10 splits
    # table: a YAML data schema (path, or a packaged name: aliexpress, ali_ccp); see docs/own-data.md
    schema: Optional[str] = _f(None, applies=_TABLE)
    valid_path: Optional[str] = _f(None, applies=_TABLE)  # table: a validation file (instead of holding out train rows)
    test_path: Optional[str] = _f(None, applies=_TABLE)  # table: a test file
    stream: bool = _f(False, applies=_TABLE)  # table: read chunk by chunk every epoch instead of loading into memory
    chunk_rows: Optional[int] = _f(None, ge=1, applies=_TABLE)  # table: rows per chunk (default: the schema's chunk_rows)
    # table, streaming: DataLoader worker processes reading chunks
    num_workers: int = _f(0, ge=0, applies={"dataset": ("table",), "stream": (True,)})

    def __post_init__(self):
        _check(self, "data")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


# ---- types and ranges ----------------------------------------------------------------------
def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"null or {_describe(inner[0])}"
    if origin is list:
        return f"a list of {_describe(args[0])}s"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _range_text(tp, check: dict) -> str:
    if "choices" in check:
        return "one of " + ", ".join(map(repr, check["choices"]))
    parts = []
    for k, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if k in check:
            parts.append(f"{sym} {check[k]}")
    if check.get("min_len"):
        parts.append(f"at least {check['min_len']} item(s)")
    if check.get("distinct"):
        parts.append("each at most once")
    return _describe(tp) + (" " + ", ".join(parts) if parts else "")


def _bad(key: str, value, tp, check: dict, why: str = "", raw=None) -> ConfigError:
    shown = str(raw) if raw is not None else str(value) if isinstance(value, Text) else repr(value)
    return ConfigError(f"{key} = {shown}: {why + '; ' if why else ''}allowed: {_range_text(tp, check)}")


def _coerce(value, tp, key: str, check: dict, raw=None):
    """``value`` converted to type ``tp`` and checked against ``check``; ConfigError otherwise (showing
    ``raw``, the text the user gave, when there was one)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, Text) and tp is not str and not (origin is typing.Union and str in args):
        try:
            parsed = yaml.safe_load(str(value)) if str(value).strip() else None
        except yaml.YAMLError as exc:
            raise _bad(key, value, tp, check, f"not valid YAML ({str(exc).splitlines()[0]})") from None
        return _coerce(parsed, tp, key, check, raw=value)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)][0]
        if value is None or (isinstance(value, Text) and str(value).strip().lower() in ("", "null", "none", "~")):
            return None
        return _coerce(value, inner, key, check, raw)
    if tp is Any:  # a Text value was parsed as YAML above
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "false", "no", "off"):
            return value.strip().lower() in ("true", "yes", "on")
        raise _bad(key, value, tp, check, raw=raw)
    if tp is int:
        out = None
        if isinstance(value, int) and not isinstance(value, bool):
            out = value
        elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
            out = int(value)
        elif isinstance(value, str):
            try:
                out = int(value.strip())
            except ValueError:
                try:
                    f = float(value)
                    out = int(f) if math.isfinite(f) and f.is_integer() else None
                except ValueError:
                    pass
        if out is None:
            raise _bad(key, value, tp, check, "not an integer", raw)
        _check_range(out, key, tp, check, raw)
        return out
    if tp is float:
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                pass
        if out is None:
            raise _bad(key, value, tp, check, "not a number", raw)
        if not math.isfinite(out):
            raise _bad(key, value, tp, check, "not a finite number", raw)
        _check_range(out, key, tp, check, raw)
        return out
    if tp is str:
        if not isinstance(value, str):
            raise _bad(key, value, tp, check, "not a string")
        value = str(value)
        if "choices" in check and value not in check["choices"]:
            raise _bad(key, value, tp, check, raw=raw)
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _bad(key, value, tp, check, "not a list")
        if len(value) < check.get("min_len", 0):
            raise _bad(key, value, tp, check, "too few items")
        if check.get("distinct"):
            dup = sorted({str(v) for v in value if value.count(v) > 1})
            if dup:
                raise _bad(key, value, tp, check, f"{dup} listed more than once")
        item_check = {k: v for k, v in check.items() if k not in ("min_len", "distinct")}
        return [_coerce(v, args[0], f"{key}[{i}]", item_check) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(key, value, tp, check, "not a mapping")
        options = check.get("options")
        if options is None:
            return dict(value)
        unknown = sorted(set(value) - set(options), key=str)
        if unknown:
            glued = [u for u in unknown if isinstance(u, str) and ":" in u and u.split(":")[0].strip() in options]
            hint = " (YAML needs a space after the colon: {key: value})" if glued else ""
            raise ConfigError(f"{key}: unknown option(s) {unknown}; known: {sorted(options)}{hint}")
        return {k: _coerce(v, options[k][0], f"{key}.{k}", options[k][1]) for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover -- a field the module forgot


def _check_range(x, key, tp, check, raw=None) -> None:
    ok = all(((k != "ge" or x >= v) and (k != "gt" or x > v) and (k != "le" or x <= v) and (k != "lt" or x < v))
             for k, v in check.items())
    if not ok or ("choices" in check and x not in check["choices"]):
        raise _bad(key, x, tp, check, raw=raw)


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _check(obj, section: str) -> None:
    """Convert and check every field of a config section in place."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], f"{section}.{f.name}", dict(f.metadata)))


# ---- building from mappings ----------------------------------------------------------------
_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def _merge(dc, overrides, where: str):
    if overrides is None:
        return dc
    if not isinstance(overrides, dict):
        raise ConfigError(f"config section {where!r} must be a mapping of keys, got {overrides!r}")
    names = {f.name: f for f in dataclasses.fields(dc)}
    kwargs = {}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"unknown config key {where}.{key}; known keys of {where}: {sorted(names)}")
        cur = getattr(dc, key)
        if dataclasses.is_dataclass(cur):
            value = _merge(cur, value, f"{where}.{key}")
        elif isinstance(cur, dict) and isinstance(value, dict):
            value = {**cur, **value}
        elif isinstance(cur, dict) and isinstance(value, Text):
            parsed = _coerce(value, dict[str, Any], f"{where}.{key}", {})
            value = {**cur, **parsed}
        kwargs[key] = value
    return dataclasses.replace(dc, **kwargs)


def config_from_dict(d: dict, base: Config | None = None) -> Config:
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of sections (model, train, data), got {d!r}")
    body = {k: v for k, v in d.items() if k != "base"}
    unknown = sorted(set(body) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; known: {sorted(_SECTIONS)}")
    cfg = base or Config()
    return Config(**{name: _merge(getattr(cfg, name), body.get(name), name) for name in _SECTIONS})


def load_config(name_or_path: str = "cpu", overrides: dict | None = None) -> Config:
    """Load a packaged config by name ("cpu", "paper") or a YAML file; apply ``overrides``."""
    path = find_named_file(name_or_path, CONFIG_DIR, "config", "config")
    raw = read_yaml(path, ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file is a mapping of sections (model, train, data), got {raw!r}")
    try:
        base = load_config(raw["base"]) if raw.get("base") else None
        cfg = config_from_dict(raw, base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if overrides:
        cfg = config_from_dict(overrides, cfg)
    return cfg


def config_diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every leaf key whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        key = f"{prefix}{k}"
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, key + ".")
        elif va != vb:
            out.append((key, va, vb))
    return out


def save_config(cfg: Config, path: str) -> None:
    atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), path)
