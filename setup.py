"""Build script for dtn-kernels' compiled extension (``dtn_kernels._C``).

CppExtension when no CUDA toolchain is found, CUDAExtension when one is.
Environment switches:
  DTN_FORCE_CUDA=1   build the CUDA sources even if torch sees no GPU (needs nvcc)
  DTN_SKIP_CUDA=1    never build CUDA sources
  DTN_NO_EXT=1       build no compiled extension at all (pure Python install)
  DTN_USE_NINJA=0/1  compile with ninja, all sources in parallel (default: when ninja is found, on
                     PATH or next to this Python, e.g. the `ninja` package in the venv; else one
                     source after another, with a note)
  MAX_JOBS=N         parallel compile jobs under ninja (default: ninja's own, the number of cores)
"""
import glob
import os
import sys

from setuptools import setup


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _write_build_info(here, torch, with_cuda):
    """dtn_kernels/_build_info.py: the torch the extension is compiled against. dtn_kernels checks it at
    import and refuses to load _C under another torch (a warning and the PyTorch twins, instead of an
    undefined-symbol crash). Packaged into wheels with the extension."""
    path = os.path.join(here, "dtn_kernels", "_build_info.py")
    text = ('"""Written by setup.py when dtn_kernels._C was built; do not edit."""\n'
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"CUDA_VERSION = {(torch.version.cuda if with_cuda else None)!r}\n"
            f"WITH_CUDA = {bool(with_cuda)!r}\n")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # unchanged file: no rebuild of anything that depends on its timestamp
        with open(path, "w") as fh:
            fh.write(text)


def _use_ninja() -> bool:
    """DTN_USE_NINJA if set; otherwise whether a working ninja is found. A ninja installed next to this
    interpreter (pip's `ninja` package in a venv that is not activated) is put on PATH for torch's
    build helper, which calls `ninja` by name."""
    import shutil
    import subprocess

    setting = os.environ.get("DTN_USE_NINJA", "").strip().lower()
    if setting:
        return setting in ("1", "true", "yes", "on")
    beside = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=beside):
        os.environ["PATH"] = beside + os.pathsep + os.environ.get("PATH", "")
    try:
        subprocess.run(["ninja", "--version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        print("dtn-kernels: ninja not found: the extension's sources compile one after another "
              "(pip install ninja for a parallel build)", file=sys.stderr)
        return False
    return True


def _extensions():
    if _flag("DTN_NO_EXT"):
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    use_cuda = bool(cu) and not _flag("DTN_SKIP_CUDA") and CUDA_HOME is not None and (
        _flag("DTN_FORCE_CUDA") or torch.cuda.is_available()
    )
    _write_build_info(here, torch, use_cuda)
    cxx = ["-O3", "-std=c++17"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP region: without -fopenmp it runs serially.
        # The extension then shares torch's libgomp (same soname, already loaded).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    extra = {"cxx": cxx}
    if use_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            "dtn_kernels._C", cpp + cu, extra_compile_args=extra, define_macros=[("DTN_WITH_CUDA", None)],
            include_dirs=[os.path.join(here, "csrc")], extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "dtn_kernels._C", cpp, extra_compile_args=extra,
            include_dirs=[os.path.join(here, "csrc")], extra_link_args=link,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=_use_ninja())}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
