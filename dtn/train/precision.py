"""Mixed precision in training (``train.amp``).

* ``"off"``  — everything in float32 (the default);
* ``"bf16"`` — forward passes under ``torch.autocast`` with bfloat16 (CPU and CUDA). bfloat16 has
  float32's exponent range, so gradients need no scaling;
* ``"fp16"`` — forward passes under autocast with float16 and a ``torch.amp.GradScaler``: the loss
  is multiplied by a scale before ``backward`` so small gradients survive float16, steps whose
  gradients hold inf / NaN are skipped and the scale shrinks, otherwise it grows every 2000 steps.

Weights, optimiser state and the loss stay float32 in every mode (autocast casts per op; the
loss is computed from float32 logits). Evaluation in the trainer runs under the same autocast.

No host syncs are added to a step: autocast is a dispatch mode, and the scaler's inf checks and
scale updates are device-side. The one sync a scaler would make, ``GradScaler.step`` reading
"were there infs?" back to the host, is avoided by the fused Adam (``fused=True``), which takes
the scale and the inf flag as tensors and skips the update on the device; so ``fp16`` uses the
fused Adam, the other modes the default one (their numbers do not change).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp: str, device: torch.device):
    """The context a forward pass runs in: autocast to ``amp``'s dtype on ``device``, or nothing."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[amp])


def grad_scaler(amp: str, device: torch.device):
    """A GradScaler for ``fp16``, else None."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def optimizer_options(amp: str) -> dict:
    """Extra Adam arguments: the fused Adam for ``fp16`` (see the module docstring)."""
    return {"fused": True} if amp == "fp16" else {}
