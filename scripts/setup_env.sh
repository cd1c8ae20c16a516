#!/usr/bin/env bash
# Create .venv (if missing) and install dtn-kernels into it, building the compiled extension.
#   PYTHON=python3.11 bash scripts/setup_env.sh
# torch: an existing torch in .venv is kept; otherwise torch==${DTN_TORCH:-2.13.0} is installed.
# --no-build-isolation: the extension builds against that torch instead of pulling a second
# (multi-GB) copy into an isolated build environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==${DTN_TORCH:-2.13.0}"
fi
.venv/bin/pip install -q setuptools wheel
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/pip install -q --no-build-isolation -e '.[test]'
.venv/bin/python -c "import dtn_kernels as k; print(f'dtn-kernels installed: C extension {k.HAS_C_EXT}, CUDA {k.HAS_CUDA_EXT}, triton {k.HAS_TRITON}')"
