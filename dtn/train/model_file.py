"""A model file (best.pt, trimmed.pt, and the model part of last.pt): what it holds
(:func:`checkpoint_payload`) and the model, encoders and config rebuilt from it
(:func:`model_from_checkpoint`, what ``dtn evaluate``, ``dtn export``, ``dtn predict`` and the analyses load).

The file's format and its checks (format version, fingerprints, encoder digest) are
:mod:`dtn.train.checkpoint`'s; the training state that last.pt adds is the trainer's.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import Config, ConfigError, config_from_dict
from ..data.encoders import TabularEncoder
from ..features.fused_embedding import without_optimizer_state
from ..models import DTN, build_model
from . import sharded as S
from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, check_encoder, checkpoint_origin, code_version,
                         encoder_fingerprint, load_checkpoint)


def checkpoint_payload(model, encoder: TabularEncoder | None, config: Config, data_fingerprint: dict | None = None,
                       encoder_fp: str | None = None) -> dict:
    """What best.pt / trimmed.pt hold (last.pt adds the training state): the weights, the model's
    name, config and schema, the fitted encoders, and the fingerprints of the encoders and the data."""
    enc_state = encoder.state_dict() if encoder is not None else None
    payload = {"format": CHECKPOINT_FORMAT, "dtn_version": code_version().split("+")[0], "code_version": code_version(),
               "model_name": model.cfg.name, "config": config.to_dict(),
               "model_state": without_optimizer_state(model.state_dict()),  # a model file: no optimizer state
               "encoder": enc_state, "schema": model.schema.to_dict(),
               "fingerprint": {"encoder": encoder_fp or encoder_fingerprint(encoder), "data": data_fingerprint}}
    if isinstance(model, DTN):
        payload["trim_active"] = model.active.clone()
    return payload


def state_mismatch(exc: RuntimeError) -> str:
    """The first lines of a load_state_dict error, on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:4]
    out = []
    for line in lines:  # a long list of keys keeps its first items whole and says how many more there are
        items = line.split(", ")
        kept = items[:1]
        for item in items[1:]:
            if len(", ".join(kept + [item])) > 160:
                break
            kept.append(item)
        more = len(items) - len(kept)
        out.append(", ".join(kept) + (f", ... ({more} more)" if more else ""))
    return "; ".join(out)


def runnable_config(cfg: Config) -> Config:
    """A checkpoint's config on this machine: a CUDA run evaluated where there is no GPU uses the CPU."""
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        return cfg.replace(train=dataclasses.replace(cfg.train, device="cpu"))
    return cfg


def model_from_checkpoint(ckpt: dict | str, device="cpu"):
    """(model, encoder, config) rebuilt from a checkpoint dict or path; a checkpoint whose config,
    schema or weights do not fit this code is a CheckpointError naming the file and the difference."""
    if isinstance(ckpt, str):
        ckpt = load_checkpoint(ckpt)
    from ..features import Schema

    path = ckpt.get("_path", "checkpoint")
    try:
        config = config_from_dict(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its config is not valid for this dtn ({exc}); written by "
                              f"{checkpoint_origin(ckpt)}") from None
    check_encoder(ckpt)
    own = False  # a TorchRec model where TorchRec is not installed: the same model with the own input layer
    try:
        schema = Schema.from_dict(ckpt["schema"])
        model_cfg = config.model
        if model_cfg.embeddings == "torchrec":
            from ..features.torchrec_input import torchrec_status

            own = not torchrec_status()[0]
            if own:
                model_cfg = dataclasses.replace(model_cfg, embeddings="own")
        model = build_model(ckpt["model_name"], schema, model_cfg, device=device)
        if isinstance(model, DTN) and ckpt.get("trim_active") is not None:
            model.apply_trim(ckpt["trim_active"])
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild its {ckpt['model_name']!r} model ({exc}); written by "
                              f"{checkpoint_origin(ckpt)}") from None
    state = S.load_full_tables(ckpt) if ckpt.get("sharded") else ckpt["model_state"]  # sharded: whole tables
    if own:
        from ..features.torchrec_input import own_state_dict

        state = own_state_dict(state, schema)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: its weights do not fit the {ckpt['model_name']!r} model built from its own config "
                              f"({state_mismatch(exc)}); written by {checkpoint_origin(ckpt)}: another code version or "
                              "an edited file") from None
    encoder = TabularEncoder.from_state_dict(ckpt["encoder"]) if ckpt.get("encoder") else None
    if encoder is not None:
        card = {f.name: f.cardinality for f in schema.features}
        off = [f.name for f in encoder.schema.features if card.get(f.name) != f.cardinality]
        if off:
            raise CheckpointError(f"{path}: its encoders do not fit its model (feature(s) {off[:5]} have other "
                                  "vocabulary sizes); the file was altered")
    return model, encoder, config
