"""Kernel launches, tile choice and the offline capture the sm_90 check uses.

Every Triton launch of the package goes through :func:`launch`. Normally it is
``kernel[grid](*args, **meta)``. Inside :func:`capture` (``dtn_kernels.sm90_check``) it compiles
the exact specialisation the launch would run, for a GPU that need not be present, and records it
with its grid, without launching anything.

Tiles come from one heuristic table per kernel family (:func:`gemm_tiles`, :func:`row_block`),
chosen by shape, dtype and the card's SM count: the largest tile whose grid still covers every SM
(sm_90 wants 128x128 tiles with 8 warps for bf16, but at the paper's batch sizes that would leave
SMs idle for some GEMMs). The interpreter gets small fixed tiles so the CPU tests stay fast.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..precision import interpreting

GRID_YZ_LIMIT = 65_535
GRID_X_LIMIT = 2 ** 31 - 1

_CAPTURE: Optional["Capture"] = None
_COUNTED: Optional[list] = None
_SM_COUNT: dict = {}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's grid arithmetic. (``triton.cdiv`` and ``triton.next_power_of_2`` cost
    about 10 us a call in triton 3.9, and a fused training step makes hundreds of them.)"""
    return -(-int(a) // int(b))


def pow2(n: int, lo: int = 16) -> int:
    """Next power of two >= max(n, lo); tl.dot needs every block dimension >= 16."""
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


def num_sms(device: torch.device) -> int:
    """SMs of ``device`` (the capture's configured count offline; 1 off CUDA)."""
    if _CAPTURE is not None:
        return _CAPTURE.num_sms
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


@dataclass(frozen=True)
class Tiles:
    BM: int
    BN: int
    BK: int
    warps: int
    stages: int


# (BM, BN, warps, stages), largest first. 8 warps = two warpgroups for wgmma on sm_90.
_GEMM_TABLE = ((128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 4, 4), (64, 64, 4, 4), (64, 32, 4, 4))
# the gated-cross kernel keeps two accumulators ([W; Wg] columns), so its BN counts twice
_TWO_ACC_TABLE = ((128, 64, 8, 3), (64, 64, 4, 4), (64, 32, 4, 4))


def gemm_tiles(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, two_acc: bool = False,
               max_tile: int = 128 * 128, groups: int = 1) -> Tiles:
    """Tiles for a Triton GEMM of [M, K] x [K, N]: the first of the table whose grid covers every
    SM (the smallest otherwise); BK 64 for 16-bit operands, 32 for fp32 (TF32) so a stage's tiles
    take the same bytes. ``max_tile`` caps BM * BN for epilogues that hold several fp32 tiles at
    once (the split-product epilogue spills at 128x128). ``groups`` GEMMs of this shape run in one
    launch, so the grid is ``groups`` times the tiles of one."""
    if interpreting():
        return Tiles(16, min(32, pow2(N)), min(32, pow2(K)), 1, 1)
    bk = 32 if dtype == torch.float32 else 64
    sms = num_sms(device)
    table = [t for t in (_TWO_ACC_TABLE if two_acc else _GEMM_TABLE) if t[0] * t[1] <= max_tile]
    choice = table[-1]
    for cand in table:
        if groups * cdiv(M, cand[0]) * cdiv(N, cand[1]) >= sms:
            choice = cand
            break
    bm, bn, warps, stages = choice
    # small problems: shrink to the problem (tl.dot needs >= 16; wgmma wants BM >= 64)
    bm = min(bm, pow2(M))
    bn = min(bn, pow2(N))
    bk = min(bk, pow2(K))
    if bm < 64:
        warps = 4
    return Tiles(bm, bn, bk, warps, stages)


def row_block(rows: int, device: torch.device, cap: int = 16, groups: int = 1) -> int:
    """Rows per program for the row-wise kernels (LayerNorm, gating): a power of two <= ``cap``,
    small enough that the grid (``groups`` x row blocks) covers every SM."""
    if interpreting():
        return 4
    sms = num_sms(device)
    bm = cap
    while bm > 1 and groups * cdiv(rows, bm) < sms:
        bm //= 2
    return bm


def grid_1d(n: int) -> tuple[int]:
    if n > GRID_X_LIMIT:
        raise ValueError(f"grid of {n} programs exceeds CUDA's limit {GRID_X_LIMIT}")
    return (n,)


# ----------------------------------------------------------------------------- launch / capture


@dataclass
class Launch:
    """One captured launch: the kernel, its grid, its compile-time configuration."""

    kernel: str
    grid: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    dtypes: tuple
    dot_m: Optional[int]
    compiled: object = None
    error: Optional[str] = None
    source: Optional[tuple] = None  # (file, first line, source lines) of the kernel's Python function


class Capture:
    """Compile instead of launch, for ``target`` (default sm_90), recording every launch."""

    def __init__(self, num_sms: int = 132, arch: int = 90):
        self.num_sms = num_sms
        self.arch = arch
        self.launches: list[Launch] = []


def _dtypes(args) -> tuple:
    return tuple(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))


def _source_of(kernel) -> Optional[tuple]:
    """(file, first line, lines) of a JIT kernel's Python source: the sm_90 check finds its tl.dot
    sites there and matches them with the PTX's line information."""
    import inspect

    fn = getattr(kernel, "fn", None)
    try:
        lines, first = inspect.getsourcelines(fn)
        return inspect.getsourcefile(fn), first, lines
    except (TypeError, OSError):
        return None


def launch_device(args) -> Optional[torch.device]:
    """The CUDA device of a launch (its first CUDA tensor argument), or None when it has none. Triton
    runs a kernel on the *current* device and stream; every launch sets the current device to its
    tensors' for its duration, so tensors on a GPU other than the current one work."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    return None


def launch(kernel, grid, *args, dot_m: Optional[int] = None, **meta):
    """``kernel[grid](*args, **meta)``; ``dot_m`` (the M tile of the kernel's tensor-core GEMMs, if
    any) is only recorded, for the sm_90 check's wgmma rule; a ``tl.dot`` line whose M tile differs
    says so in a trailing ``# dot-m: NAME`` comment naming the launch's constexpr that holds it."""
    grid = tuple(int(g) for g in grid)
    if len(grid) > 1 and max(grid[1:]) > GRID_YZ_LIMIT:
        raise ValueError(f"{kernel.__name__}: grid {grid} exceeds CUDA's y/z limit {GRID_YZ_LIMIT}")
    if _COUNTED is not None:  # count_launches(): record the kernel, run nothing (outputs stay unset)
        _COUNTED.append(kernel.__name__)
        return None
    if _CAPTURE is None:
        device = launch_device(args)
        if device is None:
            return kernel[grid](*args, **meta)
        with torch.cuda.device(device):  # triton launches on the current device: make it the tensors'
            return kernel[grid](*args, **meta)
    rec = Launch(kernel.__name__, grid, {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")},
                 meta.get("num_warps", 4), meta.get("num_stages", 3), _dtypes(args), dot_m,
                 source=_source_of(kernel))
    try:
        rec.compiled = kernel.warmup(*args, grid=grid, **meta)
    except Exception as exc:  # a compile error is a finding of the check, not a crash of it
        rec.error = f"{type(exc).__name__}: {exc}"
    _CAPTURE.launches.append(rec)
    return rec.compiled


@contextlib.contextmanager
def count_launches(num_sms: int = 132):
    """Inside this context the ops take their GPU path on CPU tensors (the same launchers, tiles for a
    ``num_sms`` card, cuBLAS calls running as CPU BLAS) but Triton launches are only recorded: the
    yielded list gets one kernel name per launch. Outputs of Triton kernels stay uninitialised -- for
    counting what a step issues, not for results."""
    global _COUNTED, _CAPTURE
    from .. import precision

    counted: list = []
    _COUNTED, precision._COUNTING = counted, True
    cap, _CAPTURE = _CAPTURE, Capture(num_sms)  # num_sms() reads the SM count from it
    try:
        yield counted
    finally:
        _COUNTED, precision._COUNTING, _CAPTURE = None, False, cap


@contextlib.contextmanager
def capture(num_sms: int = 132, arch: int = 90):
    """Inside this context, launches compile for ``sm_<arch>`` and are recorded, not run.

    Needs triton's JIT (``TRITON_INTERPRET`` unset). Installs a stand-in driver that reports the
    target, so no GPU or CUDA driver is needed; call the launchers with ``meta`` tensors."""
    global _CAPTURE
    if interpreting():
        raise RuntimeError("capture() compiles for a GPU: run it without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _OfflineDriver:
        def __init__(self):
            self.target = GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("meta")

    cap = Capture(num_sms, arch)
    previous = driver._active  # None unless something set it
    driver.set_active(_OfflineDriver())
    _CAPTURE = cap
    try:
        yield cap
    finally:
        _CAPTURE = None
        driver._active = previous
