"""Drop-in fused twins of the reference layers in ``dtn_kernels.modules``.

Each subclasses its reference layer (same parameters, buffers and state_dict) and only
overrides ``forward`` to call one ``torch.ops.dtn.*`` op. :func:`dtn_kernels.set_kernels`
swaps a whole model between the two by changing each module's class in place.

Where the op would not run its Triton kernel (CPU tensors without the interpreter, fp64,
no triton) the twins run the reference layer's own forward instead: there the ops would
run their closed-form PyTorch twins, which recompute parts of the forward in the backward
and measured 1.3–1.5x slower than the reference layers on CPU (B = 2048, paper shapes),
though lighter on memory. ``REFERENCE_WITHOUT_TRITON = False`` makes them call the ops anyway.

    >>> from dtn_kernels.modules import GatedCrossLayer
    >>> layer = GatedCrossLayer(24)
    >>> dtn_kernels.set_kernels(layer, "fused")   # layer is now a FusedGatedCrossLayer
"""
from __future__ import annotations

import torch

from .modules import CrossNetwork, GatedCrossLayer, HCNet, MaskBlock, SoftmaxGate

from .ops.gated_cross import cross_network, gated_cross
from .ops.hcnet import hcnet
from .ops.masknet import mask_block
from .ops.softmax_gate import softmax_gate
from .precision import use_triton

__all__ = ["FusedGatedCrossLayer", "FusedCrossNetwork", "FusedMaskBlock", "FusedHCNet", "FusedSoftmaxGate",
           "FUSED_TWINS", "grouping_here"]

# TF32 for the fp32 GEMMs inside the kernels: None follows torch's float32 matmul policy
# (torch.set_float32_matmul_precision / torch.backends.cuda.matmul), like the eager layers do;
# True / False force it. The interpreter always computes IEEE fp32.
ALLOW_TF32 = None
# run the reference layer's forward where the op's Triton kernel would not run (see above)
REFERENCE_WITHOUT_TRITON = True


def _reference_here(t: torch.Tensor) -> bool:
    return REFERENCE_WITHOUT_TRITON and not use_triton(t)


def grouping_here(t: torch.Tensor) -> bool:
    """Whether models in "grouped" mode run their modules of one kind as one group on ``t``'s device:
    where the ops run their Triton kernels (elsewhere the grouped twins would only loop)."""
    return not _reference_here(t)


class FusedGatedCrossLayer(GatedCrossLayer):
    """GatedCrossLayer through ``torch.ops.dtn.gated_cross``."""

    def forward(self, x0: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
        if _reference_here(xl):
            return super().forward(x0, xl)
        return gated_cross(x0, xl, self.weight, self.bias, self.gate_weight if self.gated else None, ALLOW_TF32)


class FusedCrossNetwork(CrossNetwork):
    """CrossNetwork whose layers run ``torch.ops.dtn.gated_cross`` (one op per layer)."""

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        if _reference_here(e):
            return super().forward(e)
        layers = list(self.layers)
        return cross_network(e, [m.weight for m in layers], [m.bias for m in layers],
                             [m.gate_weight if m.gated else None for m in layers], ALLOW_TF32)


class FusedMaskBlock(MaskBlock):
    """MaskBlock (instance mask, product, GEMM, LayerNorm, ReLU) through ``torch.ops.dtn.mask_block``."""

    def forward(self, e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if _reference_here(v):
            return super().forward(e, v)
        norm = self.norm
        gamma = norm.weight if norm.weight is not None else v.new_ones(norm.normalized_shape)
        beta = norm.bias if norm.bias is not None else v.new_zeros(norm.normalized_shape)
        return mask_block(e, v, self.mask.fc1.weight, self.mask.fc1.bias, self.mask.fc2.weight, self.mask.fc2.bias,
                          self.hidden.weight, gamma, beta, float(norm.eps), ALLOW_TF32)


class FusedHCNet(HCNet):
    """HCNet: the SENet in PyTorch, then hash + gather + restore + shrink through ``torch.ops.dtn.hcnet``."""

    def forward(self, E: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        if _reference_here(E):
            return super().forward(E, cat_ids)
        w = self.attention(E)  # [B, M]
        ids = cat_ids[:, self.fields]
        return hcnet(ids, self.salts, self.seed_tensor, self.codebook, self.restore.weight, w, None, ALLOW_TF32)


class FusedSoftmaxGate(SoftmaxGate):
    """SoftmaxGate through ``torch.ops.dtn.softmax_gate``."""

    def forward(self, x: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor | None = None):
        if _reference_here(x):
            return super().forward(x, experts, mask)
        return softmax_gate(x, experts, self.linear.weight, self.linear.bias, mask, ALLOW_TF32)


# reference class -> fused twin (exact classes: user subclasses are left alone)
FUSED_TWINS: dict[type, type] = {
    GatedCrossLayer: FusedGatedCrossLayer,
    CrossNetwork: FusedCrossNetwork,
    MaskBlock: FusedMaskBlock,
    HCNet: FusedHCNet,
    SoftmaxGate: FusedSoftmaxGate,
}
