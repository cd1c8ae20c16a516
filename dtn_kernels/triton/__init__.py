"""Triton kernels (forward and backward) and their launchers, one file per op family.

Import these modules only where triton is installed; the dispatchers in
``dtn_kernels.ops`` import them lazily.
"""
