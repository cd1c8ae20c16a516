"""pytest plugin: keep only the tests that need a GPU (benchmarks/gpu_suite.sh's test stages load it
with ``-p gpu_test_selection``; the other tests are reported as deselected).

A test needs a GPU when it says so the way this repository's tests do: the ``requires_cuda``
marker (tests/triton_env.py, pyproject.toml), or a ``skipif`` whose reason names CUDA or a GPU
("needs a CUDA device ..."), on the test or on its module (``pytestmark``). A test merely named
after CUDA, e.g. a CPU emulation of the CUDA kernel's algorithm, is not selected: it runs in the
CPU suite already; nor is one whose reason merely names the package ``fbgemm-gpu`` (the TorchRec
tests' skip reason lists the installed ``fbgemm-gpu(-cpu)``: they run on CPU, in the CPU suite). New
GPU test files need nothing else to be picked up.
"""
from __future__ import annotations

import re

_GPU_WORDS = re.compile(r"(?<!fbgemm-)\b(cuda|gpu)\b", re.IGNORECASE)


def needs_gpu(item) -> bool:
    for mark in item.iter_markers():
        if mark.name == "requires_cuda":
            return True
        if mark.name == "skipif" and _GPU_WORDS.search(str(mark.kwargs.get("reason", ""))):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if needs_gpu(item)]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if not needs_gpu(item)])
        items[:] = keep
