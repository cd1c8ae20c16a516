"""DDP with a fused sparse embedding optimizer (2 processes, gloo): the ranks gather their touched
rows' gradients and apply the same update, so the replicas' tables stay identical bit for bit."""
import os
import subprocess
import sys

import pytest
import torch

from ddp_embedding_worker import OPTIMIZERS, ROWS, config, main as run_worker
from dtn.data import make_synthetic
from dtn.models import build_model
from dtn.train.trainer import seed_everything

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-emb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "tests", "ddp_embedding_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_worker(str(out))  # the same training in this process, alone
    return out


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_replicas_stay_identical_and_match_one_process(runs, opt):
    r0, r1, one = (torch.load(runs / f"{opt}-rank{r}-of{w}.pt") for r, w in ((0, 2), (1, 2), (0, 1)))
    steps = one["step"]
    assert steps >= 5 and r0["step"] == r1["step"] == steps
    for key in ("weight", "state1", "state2"):
        assert torch.equal(r0[key], r1[key]), key  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(r0["dense"], r1["dense"]))
    # the same steps as one process on the whole batch (float rounding apart): the gathered rows'
    # gradients are scaled like DDP's average; a sum (2x) or one rank's rows alone would be far off
    seed_everything(config(opt).train.seed)
    init = build_model("mmoe", make_synthetic(ROWS, seed=3).schema, config(opt).model).input_layer.weight.detach()
    move_ddp, move_one = r0["weight"] - init, one["weight"] - init
    assert move_one.abs().max() > 1e-3
    torch.testing.assert_close(move_ddp, move_one, rtol=0.02, atol=0.01 * float(move_one.abs().max()))
