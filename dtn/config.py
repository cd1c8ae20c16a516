"""Configuration dataclasses, loadable from YAML.

Two packaged configurations: ``paper`` (the paper's offline setup: d = 16, every FIM
512 wide, batch 2048, Adam 1e-3) and ``cpu`` (sized for a 2-core CPU). ``load_config``
takes either name or a path to a YAML file; a YAML file may name a ``base`` config and
override only some keys.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass
class ModelConfig:
    name: str = "dtn"
    embed_dim: int = 16
    tower_hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0
    # MLP baselines
    bottom_hidden: list[int] = field(default_factory=lambda: [512, 256])  # Shared-Bottom
    expert_hidden: list[int] = field(default_factory=lambda: [256, 128])  # MMoE / PLE / SFM experts
    num_experts: int = 4  # MMoE
    num_specific_experts: int = 1  # PLE / CGC / TFI, per task
    num_shared_experts: int = 1
    num_levels: int = 1  # PLE levels (1 = CGC)
    # FIMs
    fim_dim: int = 512  # h, the output width of every FIM
    fims: list[str] = field(default_factory=lambda: ["gdcn", "masknet", "memonet"])  # DTN's MFI, SFM's FIMs
    tfi_fim: str = "gdcn"  # the single FIM kind of TFI
    sfm_mtl: str = "ple"  # SFM's multi-task network on top of the FIMs: "mmoe" or "ple"
    gdcn: dict[str, Any] = field(default_factory=lambda: {"num_layers": 2})
    dcnv2: dict[str, Any] = field(default_factory=lambda: {"num_layers": 2})
    masknet: dict[str, Any] = field(default_factory=lambda: {"mode": "serial", "num_blocks": 1, "mask_hidden": 640, "block_dim": 512})
    memonet: dict[str, Any] = field(default_factory=lambda: {"fields": None, "num_hcnets": 2, "num_hashes": 2,
                                                             "num_buckets": 100_000, "codebook_dim": 16})
    # DTN
    tsn: bool = True  # Task-Sensitive Network
    task_order: Optional[list[str]] = None  # default: the schema's label order
    tsn_stop_gradient: bool = True
    gate_mode: str = "paper"  # "paper": softmax(W e); "reference": per-expert scores, two softmaxes


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 2048
    eval_batch_size: int = 8192
    epochs: int = 10
    patience: int = 2  # early stopping on validation AUC
    early_stop_metric: str = "mean_auc"  # or "auc/<task>"
    task_weights: Optional[list[float]] = None
    seed: int = 2024
    device: str = "cpu"
    num_threads: Optional[int] = None
    grad_clip: Optional[float] = None
    progress: bool = True
    shuffle: bool = True  # reshuffle the training rows every epoch (false: file order, e.g. to compare loaders)
    # torch.use_deterministic_algorithms: bit-exact reruns and resumes with several CPU threads
    # (without it some ATen CPU backward reductions differ in the last bit from run to run)
    deterministic: bool = False


@dataclass
class DataConfig:
    dataset: str = "census"  # "census", "synthetic" or "table" (your own CSV / Parquet file, see `schema`)
    path: Optional[str] = None  # census: folder with the files (else $DTN_CENSUS_DIR, cache, download);
    # table: the train file(s), overriding the data schema's `train`
    split_seed: int = 2024
    bucketize: int = 0  # census: > 0 adds a quantile-bucket categorical copy of each numeric column
    numeric_ids: int = 0  # census: > 0 adds a categorical copy of each numeric column (values seen >= this often)
    synthetic_rows: int = 20_000
    # table: a YAML data schema (path, or a packaged name: aliexpress, ali_ccp); see docs/own-data.md
    schema: Optional[str] = None
    valid_path: Optional[str] = None  # table: a validation file (instead of holding out train rows)
    test_path: Optional[str] = None  # table: a test file
    stream: bool = False  # table: read chunk by chunk every epoch instead of loading into memory
    chunk_rows: Optional[int] = None  # table: rows per chunk (default: the schema's chunk_rows)
    num_workers: int = 0  # table, streaming: DataLoader worker processes reading chunks


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


def _merge(dc, overrides: dict, where: str):
    if overrides is None:
        return dc
    if not isinstance(overrides, dict):
        raise TypeError(f"config section {where!r} must be a mapping, got {type(overrides).__name__}")
    names = {f.name: f for f in dataclasses.fields(dc)}
    kwargs = {}
    for key, value in overrides.items():
        if key not in names:
            raise KeyError(f"unknown config key {where}.{key}; known: {sorted(names)}")
        cur = getattr(dc, key)
        if dataclasses.is_dataclass(cur):
            value = _merge(cur, value, f"{where}.{key}")
        elif isinstance(cur, dict) and isinstance(value, dict):
            value = {**cur, **value}
        kwargs[key] = value
    return dataclasses.replace(dc, **kwargs)


def config_from_dict(d: dict, base: Config | None = None) -> Config:
    return _merge(base or Config(), {k: v for k, v in d.items() if k != "base"}, "config")


def load_config(name_or_path: str = "cpu", overrides: dict | None = None) -> Config:
    """Load a packaged config by name ("cpu", "paper") or a YAML file; apply ``overrides``."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(CONFIG_DIR, f"{name_or_path}.yaml")
        if not os.path.exists(path):
            known = sorted(p[:-5] for p in os.listdir(CONFIG_DIR) if p.endswith(".yaml"))
            raise FileNotFoundError(f"no config file {name_or_path!r} and no packaged config of that name; packaged: {known}")
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    base = load_config(raw["base"]) if raw.get("base") else None
    cfg = config_from_dict(raw, base)
    if overrides:
        cfg = config_from_dict(overrides, cfg)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
