"""The wheel: built with the compiled extension, installed into a fresh venv next to the same torch,
the ops run; under another torch the import warns once (naming both versions and how to rebuild)
and the PyTorch twins run -- never an undefined-symbol crash. `pip wheel` compiles in this tree's build/
folder: after scripts/setup_env.sh (which compiles there) ninja finds the objects up to date and only
links; from an empty build/ it compiles everything (minutes)."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# the fresh venv's interpreter runs without PYTHONPATH: a PYTHONPATH naming this tree (as when the
# tests run with PYTHONPATH=$PWD) would import the tree's dtn_kernels instead of the wheel's
VENV_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

PROBE = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch, dtn_kernels
        from dtn_kernels.ops import embedding_bag
        from dtn_kernels.reference import pt_embedding_bag
        w = torch.arange(10.).view(5, 2)
        args = (w, torch.tensor([0, 3, 5]), torch.tensor([2, 0, 1, 1, 1]), torch.tensor([0, 1, 3, 3, 5]))
        out = embedding_bag(*args)
        assert torch.equal(out, pt_embedding_bag(*args)), out
        from dtn_kernels.nn import FusedCrossNetwork
        from dtn_kernels.modules import CrossNetwork
        net = CrossNetwork(6, 2)
        dtn_kernels.set_kernels(net, "fused")
        assert type(net) is FusedCrossNetwork and net(torch.randn(3, 6)).shape == (3, 6)
    assert not [m for m in sys.modules if m == "dtn" or m.startswith("dtn.")], "dtn_kernels imported the model zoo"
    msgs = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning) and "dtn_kernels" in str(c.message)]
    print("HAS_C_EXT", dtn_kernels.HAS_C_EXT)
    print("WARNINGS", len(msgs))
    for m in msgs:
        print("WARNING", m)
""")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", str(ROOT),
                    "-w", str(tmp / "dist")], check=True, env=env, timeout=1800, cwd=tmp)
    wheels = glob.glob(str(tmp / "dist" / "dtn_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=300)
    py = str(tmp / "venv" / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", wheels[0]], check=True,
                   env={**VENV_ENV, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, timeout=600)
    # the same torch: this interpreter's installation, put on the new venv's path by a .pth file
    # (after the venv's own site-packages, so the wheel's dtn_kernels is the one imported) instead of
    # a second copy unpacked from pip's cache (~900 MB, half a minute). Written after the install:
    # pip would otherwise see this environment's dtn-kernels there and install nothing.
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True, timeout=120, env=VENV_ENV).stdout.strip()
    Path(site, "same_torch.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    probe = "import torch, dtn_kernels; print(torch.__version__, torch.__file__, dtn_kernels.__file__)"
    version, torch_file, kernels_file = subprocess.run([py, "-c", probe], check=True, capture_output=True, text=True,
                                                       timeout=300, cwd="/", env=VENV_ENV).stdout.split()
    assert version == torch.__version__ and Path(torch_file).resolve() == Path(torch.__file__).resolve(), torch_file
    assert Path(kernels_file).resolve().is_relative_to(Path(site).resolve()), kernels_file  # the wheel, not this tree
    return py


def _probe(py):
    proc = subprocess.run([py, "-c", PROBE], capture_output=True, text=True, timeout=600, cwd="/", env=VENV_ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_wheel_runs_the_compiled_op(venv):
    out = _probe(venv)
    assert "HAS_C_EXT True" in out and "WARNINGS 0" in out, out


def test_other_torch_warns_once_and_runs_the_twins(venv):
    info = Path(subprocess.run([venv, "-c", "import importlib.util as u; print(u.find_spec('dtn_kernels').origin)"],
                               capture_output=True, text=True, check=True, cwd="/", env=VENV_ENV).stdout.strip()
                ).parent / "_build_info.py"
    original = info.read_text()
    assert f"TORCH_VERSION = '{torch.__version__}'" in original
    info.write_text(original.replace(f"'{torch.__version__}'", "'2.4.1+cu121'"))
    try:
        out = _probe(venv)
    finally:
        info.write_text(original)
    assert "HAS_C_EXT False" in out and "WARNINGS 1" in out, out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING "))
    assert "2.4.1+cu121" in warning and torch.__version__ in warning and "rebuild" in warning, warning
