"""The model zoo. ``build_model(name, schema, cfg)`` builds any of MODEL_REGISTRY."""
from __future__ import annotations

import dataclasses

from ..config import ModelConfig
from ..features import Schema
from .base import Expert, MultiTaskModel
from .dtn import DTN, RemovedFIM
from .fim_mtl import SFM, TFI
from .mtl import CGC, MMoE, PLE, CGCLevel, SharedBottom

MODEL_REGISTRY = {
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
    "cgc": CGC,
    "sfm": SFM,
    "tfi": TFI,
    "dtn": DTN,
}

ALIASES = {"sharedbottom": "shared_bottom", "sb": "shared_bottom", "shared-bottom": "shared_bottom"}


def canonical_name(name: str) -> str:
    key = name.lower().replace(" ", "")
    return ALIASES.get(key, key)


def build_model(name: str, schema: Schema, cfg: ModelConfig, device=None) -> MultiTaskModel:
    key = canonical_name(name)
    if key not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[key](schema, dataclasses.replace(cfg, name=key), device=device)


__all__ = ["MODEL_REGISTRY", "build_model", "canonical_name", "MultiTaskModel", "Expert", "SharedBottom", "MMoE",
           "PLE", "CGC", "CGCLevel", "SFM", "TFI", "DTN", "RemovedFIM"]
