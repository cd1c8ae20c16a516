"""Feature interaction modules (FIMs), MLPs and gates.

Every FIM maps (E [B, F, d], categorical ids [B, C]) to [B, h]; see ``FIM_REGISTRY``.
"""
from .mlp import MLP
from .gdcn import GatedCrossLayer, CrossNetwork, GDCN, DCNv2
from .masknet import InstanceMask, MaskBlock, MaskNet
from .memonet import HCNet, MemoNet, cross_hash
from .gating import SoftmaxGate
from .registry import FIM_REGISTRY, build_fim

__all__ = [
    "MLP", "GatedCrossLayer", "CrossNetwork", "GDCN", "DCNv2", "InstanceMask", "MaskBlock", "MaskNet",
    "HCNet", "MemoNet", "cross_hash", "SoftmaxGate", "FIM_REGISTRY", "build_fim",
]
