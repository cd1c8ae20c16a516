"""Every Triton launch runs on its tensors' GPU (``_launch.launch`` sets the current device for it),
so tensors on a GPU other than the current one work."""
import triton_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from triton_env import requires_cuda

import contextlib

import pytest
import torch

import dtn_kernels  # noqa: F401
from dtn_kernels.triton import _launch


class _Kernel:
    """Stands in for a triton JIT function: ``kernel[grid](*args)`` records the device guard active."""

    __name__ = "_fake_kernel"

    def __init__(self, guard):
        self.guard = guard
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((grid, list(self.guard)))


def _recording_guard(monkeypatch):
    active, entered = [], []

    @contextlib.contextmanager
    def device(dev):
        entered.append(dev)
        active.append(dev)
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    return active, entered


def test_launch_runs_under_the_tensors_device(monkeypatch):
    active, entered = _recording_guard(monkeypatch)
    monkeypatch.setattr(_launch, "launch_device", lambda args: torch.device("cuda", 1))
    kernel = _Kernel(active)
    _launch.launch(kernel, (3,), torch.zeros(2), BM=16)
    assert entered == [torch.device("cuda", 1)]
    assert kernel.calls == [((3,), [torch.device("cuda", 1)])], "the kernel was not launched inside the guard"
    assert active == []


def test_cpu_launches_take_no_guard(monkeypatch):
    active, entered = _recording_guard(monkeypatch)
    kernel = _Kernel(active)
    _launch.launch(kernel, (1,), torch.zeros(2), 5)
    assert kernel.calls == [((1,), [])] and entered == []
    assert _launch.launch_device([torch.zeros(1), 3, None]) is None


@requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or triton_env.INTERPRET,
                    reason="needs two CUDA devices and TRITON_INTERPRET=0")
def test_ops_on_a_gpu_that_is_not_the_current_one():
    from dtn_kernels.reference.pt_gated_cross import pt_gated_cross
    from dtn_kernels.reference.pt_softmax_gate import pt_softmax_gate

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator().manual_seed(0)
    x0, xl, w, b, wg = (torch.randn(*s, generator=g) for s in ((65, 40), (65, 40), (40, 40), (40,), (40, 40)))
    want = pt_gated_cross(x0, xl, w, b, wg)
    leaves = [t.to(dev).requires_grad_() for t in (x0, xl, w, b, wg)]
    out = torch.ops.dtn.gated_cross(*leaves, False)[0]
    assert out.device == dev and torch.cuda.current_device() == 0
    torch.testing.assert_close(out.cpu(), want, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert all(t.grad.device == dev for t in leaves)
    x, experts, gw, gb = torch.randn(33, 20), torch.randn(33, 4, 16), torch.randn(4, 20), torch.randn(4)
    got = torch.ops.dtn.softmax_gate(*(t.to(dev) for t in (x, experts, gw, gb)), None, False)[0]
    torch.testing.assert_close(got.cpu(), pt_softmax_gate(x, experts, gw, gb)[0], atol=1e-4, rtol=1e-4)
