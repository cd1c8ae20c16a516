#!/usr/bin/env bash
# The Triton kernels on triton 3.6, the version of the GPU machines, in a separate venv
# (.venv-triton36): the interpreter tests, the convergence test, and the offline sm_90 compile
# check (tests/test_sm90_compile.py: every kernel variant compiled by triton 3.6 for sm_90 and
# read with its ptxas). triton 3.6's interpreter needs numpy < 2.4 (it converts 1-element arrays
# with int(), which numpy 2.4 refuses).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-triton36/bin/python ] || "$PY" -m venv .venv-triton36
.venv-triton36/bin/pip install -q "torch==${DTN_TORCH:-2.13.0}" "triton==3.6.0" "numpy<2.4" pandas pyyaml tqdm \
    scikit-learn matplotlib pytest hypothesis
PYTHONPATH=. .venv-triton36/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_triton_gated_cross.py tests/test_triton_masknet.py tests/test_triton_hcnet.py \
    tests/test_triton_softmax_gate.py tests/test_kernel_switch.py tests/test_dispatch.py tests/test_convergence.py \
    tests/test_grouped.py tests/test_count_launches.py tests/test_launch_device.py \
    tests/test_sm90_compile.py
