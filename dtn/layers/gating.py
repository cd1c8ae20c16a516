"""DTN's gate: softmax(W x + b) over K experts and their weighted sum. The layer lives in
``dtn_kernels.modules`` (the fused ops twin it); re-exported here for the model zoo."""
from dtn_kernels.modules import SoftmaxGate  # noqa: F401  (re-exported)

__all__ = ["SoftmaxGate"]
