"""The installed package: the compiled extension loads (when built), the CLI entry point works."""
import glob
import os
import subprocess
import sys

import pytest

import dtn_kernels


def test_extension_loads_when_built():
    built = glob.glob(os.path.join(os.path.dirname(dtn_kernels.__file__), "_C*.so"))
    if os.environ.get("DTN_REQUIRE_EXT") == "1":
        assert dtn_kernels.HAS_C_EXT, f"dtn_kernels._C failed to load: {dtn_kernels.C_EXT_ERROR}"
    elif not built:
        pytest.skip("dtn_kernels._C is not built in this tree")
    assert dtn_kernels.HAS_C_EXT, f"{built} exists but does not load: {dtn_kernels.C_EXT_ERROR}"


def test_import_without_torch_first():
    """Importing dtn_kernels first (before torch) must still load the extension."""
    out = subprocess.run([sys.executable, "-c", "import dtn_kernels as k; print(k.HAS_C_EXT, k.C_EXT_ERROR)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{dtn_kernels.HAS_C_EXT} {dtn_kernels.C_EXT_ERROR}"


def test_python_dash_m_dtn_help():
    out = subprocess.run([sys.executable, "-m", "dtn", "--help"], capture_output=True, text=True, check=True).stdout
    assert "compare" in out and "evaluate" in out and "train" in out
