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


def test_kernel_package_stands_alone():
    """Importing dtn_kernels and every submodule a user needs never imports the model zoo."""
    code = ("import sys, dtn_kernels, dtn_kernels.nn, dtn_kernels.modules, dtn_kernels.ops, dtn_kernels.reference, "
            "dtn_kernels.hashing, dtn_kernels.env, dtn_kernels.switch\n"
            "print(sorted(m for m in sys.modules if m == 'dtn' or m.startswith('dtn.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_model_zoo_builds_on_the_kernel_package():
    """dtn.layers re-exports the reference layers of dtn_kernels: one class each, so set_kernels
    switches the zoo's layers and isinstance checks agree."""
    import dtn.layers as L
    import dtn_kernels.modules as K

    for name in ("GatedCrossLayer", "CrossNetwork", "InstanceMask", "MaskBlock", "HCNet", "SoftmaxGate"):
        assert getattr(L, name) is getattr(K, name)


def test_python_dash_m_dtn_kernels_reports_the_installation():
    out = subprocess.run([sys.executable, "-m", "dtn_kernels"], capture_output=True, text=True, check=True).stdout
    assert f"torch           {__import__('torch').__version__}" in out
    assert "embedding_bag" in out and "gated_cross" in out
    ext_line = next(line for line in out.splitlines() if line.startswith("extension _C"))
    assert ("not built" not in ext_line) == dtn_kernels.HAS_C_EXT, ext_line


def test_readme_standalone_example_runs_without_the_model_zoo():
    """The README's "The kernels in your own model" example, run as written, never imports dtn (its second
    block, the caching CPU allocator in a training loop, runs after it when the extension is built)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### The kernels in your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2 and "cpu_allocator.caching()" in blocks[1]
    code = blocks[0] + (blocks[1] + "\nassert cpu_allocator.stats()['pool_allocs'] > 0\n" if dtn_kernels.HAS_C_EXT else "")
    code += "\nimport sys\nassert logits.shape == (32, 2)\n" \
            "assert not [m for m in sys.modules if m == 'dtn' or m.startswith('dtn.')], 'imported the zoo'\n"
    # a user's plain CPU, as the example says: no Triton interpreter, which tests/triton_env.py turns on for
    # the suite (it would interpret the 2048-row steps for minutes)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DTN_TRITON_ON_CPU")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_dtn_env_prints_the_same_report(capsys):
    """`dtn env` is `python -m dtn_kernels`: the same report (dtn_kernels.env), text and JSON."""
    import json

    import torch

    from dtn.cli import main
    from dtn_kernels.env import format_report, report

    assert main(["env"]) == 0
    assert capsys.readouterr().out.strip() == format_report(report()).strip()
    assert main(["env", "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == json.loads(json.dumps(report("cpu")))
    assert info["kernels"]["embedding_bag"] and info["extension"] == dtn_kernels.HAS_C_EXT
    bad = ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        assert main(["env", "--device", device]) == 2
        err = capsys.readouterr().err
        assert f"--device '{device}'" in err and "allowed here: 'cpu'" in err, err
