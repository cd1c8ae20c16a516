"""Pure-PyTorch reference twins of the compiled / Triton kernels (same signatures)."""
from .pt_embedding_bag import pt_embedding_bag  # noqa: F401
from .pt_gated_cross import pt_gated_cross  # noqa: F401
from .pt_masknet import pt_mask_block  # noqa: F401
from .pt_hcnet import pt_hcnet  # noqa: F401
from .pt_softmax_gate import pt_softmax_gate, pt_softmax_mix  # noqa: F401
