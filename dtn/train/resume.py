"""Whether a checkpoint (a last.pt) can be resumed under a config: the settings that may change on a
resume (:data:`RESUMABLE`) and the check (:func:`check_resume`). Kept apart from
:mod:`dtn.train.checkpoint` because it needs the config's defaults: this module imports both
:mod:`dtn.config` and the checkpoint module, and neither of those imports the other.
"""
from __future__ import annotations

from typing import Any

from ..config import Config, config_diff
from .checkpoint import CheckpointError, checkpoint_origin, source_diff

# training settings that may change when a run is resumed; every other config key must match
# (the lr schedule's kind and warm-up, train.amp and train.task_weighting may not: the state they left in last.pt
# -- scheduler step, GradScaler scale, learned task weights -- means nothing under other settings)
RESUMABLE = ("train.lr", "train.embedding_lr", "train.weight_decay", "train.grad_clip", "train.epochs", "train.patience",
             "train.progress", "train.num_threads", "train.device", "train.eval_batch_size", "train.min_lr",
             "train.plateau_factor", "train.plateau_patience", "train.log", "data.path", "data.valid_path",
             "data.test_path",
             # where sharded tables live (not what they compute): a run may resume on another plan
             "model.torchrec.shard", "model.torchrec.sharding", "model.torchrec.memory_budget_mb",
             "model.torchrec.column_shard_dim")


def with_defaults(config: dict) -> dict:
    """A checkpoint's config dict with the keys that this code added since it was written set to their
    defaults (a new option left at its default is no change to the old run)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for section, defaults in Config().to_dict().items():
        if isinstance(out.get(section), dict):
            for key, value in defaults.items():
                out[section].setdefault(key, value)
    return out


def check_resume(ckpt: dict, model_name: str, config: dict, source: dict | None = None,
                 encoder_fp: str | None = None) -> list[tuple[str, Any, Any]]:
    """Check that ``ckpt`` (a last.pt) can be resumed as ``model_name`` with ``config`` on the data
    ``source`` (both optional: the data are checked once read). Returns the settings that change
    (key, old, new), all in :data:`RESUMABLE`; raises CheckpointError naming what may not change."""
    path = ckpt.get("_path", "last.pt")
    if ckpt.get("format", 1) < 2:
        raise CheckpointError(f"{path}: written by {checkpoint_origin(ckpt)}, so what it was trained on cannot be "
                              "checked; start a new run (another --out, or without --resume)")
    if "optimizer_state" not in ckpt:
        raise CheckpointError(f"{path}: holds a model but no training state (a best.pt or trimmed.pt?); "
                              "--resume continues from last.pt")
    if ckpt["model_name"] != model_name:
        raise CheckpointError(f"{path}: holds a {ckpt['model_name']!r} run; it cannot be resumed as {model_name!r} "
                              "(use another --out, or the same --model)")
    diff = config_diff(with_defaults(ckpt["config"]), config)
    fixed = [(k, a, b) for k, a, b in diff if k not in RESUMABLE and k != "model.name"]
    if fixed:
        shown = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in fixed[:6])
        raise CheckpointError(f"{path}: cannot resume with other settings: {shown}{' ...' if len(fixed) > 6 else ''} "
                              f"(on resume only {', '.join(k for k in RESUMABLE if k.startswith('train.'))} may change; "
                              "use another --out to train with these)")
    if source is not None:
        changed = source_diff((ckpt.get("fingerprint") or {}).get("data"), source)
        if changed:
            raise CheckpointError(f"{path}: cannot resume on other data: {'; '.join(changed[:4])} (a resumed run must "
                                  "see the data it started on; use another --out to train on this data)")
    if encoder_fp is not None:
        want = (ckpt.get("fingerprint") or {}).get("encoder")
        if want and want != encoder_fp:
            raise CheckpointError(f"{path}: the feature encoders differ from the ones it was trained with (ids would "
                                  "mean other values); resume with the checkpoint's encoders")
    return [(k, a, b) for k, a, b in diff if k in RESUMABLE and not k.startswith("data.")]
