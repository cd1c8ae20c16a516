"""Dispatchers: one per op, each choosing the compiled kernel or its reference twin."""
from .embedding_bag import embedding_bag  # noqa: F401
from .embedding_update import embedding_bag_backward_update, embedding_rows_update  # noqa: F401
from .gated_cross import gated_cross, cross_network  # noqa: F401
from .masknet import mask_block  # noqa: F401
from .hcnet import hcnet  # noqa: F401
from .softmax_gate import softmax_gate, softmax_mix  # noqa: F401
