#!/usr/bin/env bash
# Create .venv (if missing) and install dtn-kernels into it, building the compiled extension.
#   PYTHON=python3.11 bash scripts/setup_env.sh
# torch: an existing torch in .venv is kept; otherwise torch==${DTN_TORCH:-2.13.0} is installed.
# --no-build-isolation: the extension builds against that torch instead of pulling a second
# (multi-GB) copy into an isolated build environment.
# The extension is compiled in place (`setup.py build_ext --inplace`, objects kept in build/) while
# pip installs the package (editable, DTN_NO_EXT=1: its own build would compile everything again
# in a throw-away folder) and its dependencies: the two overlap, a rerun recompiles only what
# changed, and a later `pip wheel .` or `setup.py build_ext` in this tree reuses the objects.
# The build switches (DTN_FORCE_CUDA, DTN_SKIP_CUDA, DTN_NO_EXT, MAX_JOBS; see setup.py) apply.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==${DTN_TORCH:-2.13.0}"
fi
.venv/bin/pip install -q setuptools wheel ninja
mkdir -p build
log=build/setup_env-build_ext.log
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python setup.py build_ext --inplace > "$log" 2>&1 &
build_pid=$!
if ! DTN_NO_EXT=1 .venv/bin/pip install -q --no-build-isolation -e '.[test]'; then
  kill "$build_pid" 2>/dev/null || true
  wait "$build_pid" 2>/dev/null || true
  echo "setup_env.sh: pip install -e '.[test]' failed" >&2
  exit 1
fi
if ! wait "$build_pid"; then
  tail -40 "$log" >&2
  echo "setup_env.sh: the extension did not build (the end of $log is above)" >&2
  exit 1
fi
.venv/bin/python -c "import dtn_kernels as k; print(f'dtn-kernels installed: C extension {k.HAS_C_EXT}, CUDA {k.HAS_CUDA_EXT}, triton {k.HAS_TRITON}')"
