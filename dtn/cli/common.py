"""What the commands share: the config of a request (checked before any data is read), the
model name, the data and its summary line, the metrics tables, the numeric flags' checks.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time


def _config(args, config: str | None = None):
    """The configuration from ``config`` (else --config, else ``cpu``), --set and the flags; every value
    converted and checked, contradictions and settings without effect refused (dtn.request_check), and the
    device checked to exist, before any data is read."""
    return _request(args, config)[0]


def _request(args, config: str | None = None, notes: bool = True):
    """(config, {key: the --set or flag that set it}) -- see :func:`dtn.request_check.request_config`."""
    from ..request_check import request_config

    cfg, explicit = request_config(args, config, note=print if notes else None)
    _check_device(cfg.train.device)
    if cfg.model.embeddings == "torchrec":  # an optional package: say how to install it before any data is read
        from ..features.torchrec_input import require_torchrec

        require_torchrec()
        from .. import distributed as D
        from ..train.sharded import check_request

        check_request(cfg, D.env_world_size())  # the tables' optimizer fits the sharding
    if cfg.train.log == "tensorboard":  # an optional package: say so before any data is read
        from ..train.tblog import require_tensorboard

        require_tensorboard()
    return cfg, explicit


def _check_device(device: str) -> None:
    from ..config import ConfigError

    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"train.device = {device!r}: this torch ({torch.__version__}) sees no CUDA device; "
                          "allowed here: 'cpu'")
    index = int(device[5:]) if device.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"train.device = {device!r}: there are {torch.cuda.device_count()} CUDA device(s); "
                          f"allowed: 'cpu', 'cuda' or 'cuda:0'..'cuda:{torch.cuda.device_count() - 1}'")


def _check_model_name(name: str) -> str:
    from ..models import MODEL_REGISTRY, canonical_name

    key = canonical_name(name)
    if key not in MODEL_REGISTRY:
        from ..config import ConfigError

        raise ConfigError(f"unknown model {name!r}; known: {sorted(MODEL_REGISTRY)}")
    return key


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _check_data_source(ckpt: dict, data) -> None:
    """Warn when the data a checkpoint is applied to are not the data it was trained on."""
    from ..train.checkpoint import source_diff

    diff = source_diff((ckpt.get("fingerprint") or {}).get("data"), getattr(data, "fingerprint", None))
    if diff:
        _warn(f"{ckpt.get('_path', 'the checkpoint')} was trained on other data: {'; '.join(diff[:3])}; "
              "using the checkpoint's encoders")


def _load_data(cfg, quiet: bool = False, encoder=None):
    """The configured data set (encoded with ``encoder`` when given, else with encoders fitted on it),
    with a one-line summary."""
    from ..data import load_dataset

    t0 = time.time()
    data = load_dataset(cfg.data, encoder=encoder, progress=not quiet)
    if not quiet:
        mode = " (streamed)" if cfg.data.dataset == "table" and cfg.data.stream else ""
        print(f"data: {len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test rows{mode}, "
              f"{data.schema.num_fields} fields ({time.time() - t0:.1f}s)")
    return data


def _num(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"  # an AUC is undefined where a split has one class


def _split_table(split: str, rows: int, metrics: dict) -> str:
    """The metrics of a split; an empty split says so in one line instead of a table of n/a."""
    if rows == 0:
        return f"{split}: AUC n/a, LogLoss n/a: the {split} split is empty (0 rows)"
    return f"{split}:\n" + _table(metrics)


def _table(metrics: dict) -> str:
    return "\n".join(f"  {t:>12}: AUC {_num(m['auc'])}  LogLoss {_num(m['logloss'])}" for t, m in metrics.items())


def _seeds(text: str) -> list[int]:
    from ..config import ConfigError

    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: allowed: distinct comma-separated integers >= 0, e.g. 1,2,3")
    return seeds


def _check_flags(*rules) -> None:
    """(flag, value, ok, allowed) for each numeric flag: one that is not ok is refused before anything is read."""
    from ..config import ConfigError

    for flag, value, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"{flag} {value}: allowed: {allowed}")


def _threads(args) -> None:
    if getattr(args, "threads", None) is not None:
        from ..config import ConfigError

        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: allowed: an integer >= 1")
        import torch

        torch.set_num_threads(args.threads)


def _checkpoint_data_config(cfg, args):
    """The checkpoint's data config with --data-dir / --data (a moved data set) applied."""
    from ..request_check import check_data_flags

    check_data_flags(args, cfg)
    data_cfg = cfg.data
    path = getattr(args, "data", None) or getattr(args, "data_dir", None)
    if path:
        data_cfg = dataclasses.replace(data_cfg, path=os.path.abspath(path) if cfg.data.dataset == "table" else path)
    return data_cfg
