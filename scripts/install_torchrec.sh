#!/usr/bin/env bash
# Install TorchRec (model.embeddings: torchrec, sharded tables) into .venv, the pair that loads with its torch:
#   torch 2.13 <-> fbgemm-gpu-cpu / fbgemm-gpu 1.8.0 <-> torchrec 1.8.0
#   torch 2.11 <-> fbgemm-gpu(-cpu) 1.6.0 <-> torchrec 1.6.0
# (FBGEMM 1.X is built for torch 2.(X+5); another pair fails at import with undefined symbols.)
# torchrec declares the CUDA package fbgemm-gpu as its dependency, which does not load on a CPU-only
# torch, so torchrec goes in with --no-deps, beside fbgemm-gpu-cpu (CPU torch) or fbgemm-gpu (CUDA
# torch), then its other requirements (the dtn-kernels[torchrec] extra).
#   bash scripts/install_torchrec.sh          # PIP_FIND_LINKS=/wheels to install from local wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if "$PY" -c "from dtn.features.torchrec_input import torchrec_status as s; import sys; ok, d = s(); print(d); sys.exit(0 if ok else 1)" 2>/dev/null; then
  echo "TorchRec already usable"; exit 0
fi
read -r TORCH CUDA < <("$PY" -c "import torch; print(torch.__version__.split('+')[0].rsplit('.', 1)[0], 'cuda' if torch.version.cuda else 'cpu')")
case "$TORCH" in
  2.13) FBGEMM=1.8.0; TORCHREC=1.8.0 ;;
  2.11) FBGEMM=1.6.0; TORCHREC=1.6.0 ;;
  *) echo "install_torchrec.sh: no known TorchRec pair for torch $TORCH (known: 2.13, 2.11); fbgemm 1.X pairs with torch 2.(X+5)" >&2; exit 1 ;;
esac
PKG=fbgemm-gpu-cpu; [ "$CUDA" = cuda ] && PKG=fbgemm-gpu
"$PY" -m pip install -q "$PKG==$FBGEMM"
"$PY" -m pip install -q --no-deps "torchrec==$TORCHREC"
"$PY" -m pip install -q pyre-extensions tensordict "torchmetrics==1.0.3" tqdm
"$PY" -c "from dtn.features.torchrec_input import torchrec_status as s; import sys; ok, d = s(); print('TorchRec:', 'usable,' if ok else 'NOT usable:', d); sys.exit(0 if ok else 1)"
