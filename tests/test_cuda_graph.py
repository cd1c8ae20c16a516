"""A training step that never waits for the GPU: the fused DTN step and the trainer's step run
under ``torch.cuda.set_sync_debug_mode("error")``, and the fused step is captured into a CUDA
graph with ``torch.cuda.CUDAGraph`` and with ``torch.compile(mode="reduce-overhead")``, with the
same results as eager steps.

GPU only: every test skips without a CUDA device and the CUDA build of ``dtn_kernels._C``.
The model is the whole fused DTN (``dtn_kernels.set_kernels(model, "fused")``); nothing here
assumes how its kernels work inside.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch

import dtn_kernels

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and dtn_kernels.HAS_CUDA_EXT),
    reason="needs a CUDA device and dtn_kernels._C built with CUDA",
)

B = 64
MULTI_IDS = 96  # ids of the multi-valued field per batch: fixed, so every batch has the same shapes


def make_batches(n: int, seed: int = 0) -> list:
    """n host batches of conftest's tiny_schema (cardinalities 5, 7, 3; a multi-valued field of 9
    rows; 2 numeric fields; 2 tasks), bags of random lengths with a fixed total."""
    from dtn.features import FeatureBatch, JaggedField

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        cat = torch.stack([torch.randint(0, c, (B,), generator=g) for c in (5, 7, 3)], 1)
        cuts = torch.randint(0, MULTI_IDS + 1, (B - 1,), generator=g).sort().values
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([MULTI_IDS])])
        multi = JaggedField(torch.randint(0, 9, (MULTI_IDS,), generator=g), offsets)
        labels = torch.randint(0, 2, (B, 2), generator=g).float()
        out.append((FeatureBatch(cat, torch.randn(B, 2, generator=g), (multi,)), labels))
    return out


def on_device(batches: list) -> list:
    from dtn.train.trainer import batch_to_device

    out = [(batch_to_device(b, "cuda"), y.cuda()) for b, y in batches]
    torch.cuda.synchronize()
    return out


def fused_dtn(schema, cfg, mode: str = "fused"):
    from dtn.models import build_model

    torch.manual_seed(0)
    model = build_model("dtn", schema, dataclasses.replace(cfg, dropout=0.0), device="cuda")
    dtn_kernels.set_kernels(model, mode)
    return model


def train_step(model, opt, batch, labels) -> torch.Tensor:
    loss, _ = model.loss(model(batch), labels)
    loss.backward()
    opt.step()
    return loss.detach()


@contextlib.contextmanager
def no_host_sync():
    """Any synchronising CUDA call inside raises (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def assert_params_close(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["fused", "grouped"])
def test_fused_dtn_steps_have_no_host_sync(tiny_schema, small_model_cfg, mode):
    from dtn_kernels.ops.embedding_bag import raise_pending_errors

    model = fused_dtn(tiny_schema, small_model_cfg, mode)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = on_device(make_batches(4))
    train_step(model, opt, *data[0])  # warm-up: kernel compilation, optimizer state, error flag
    opt.zero_grad(set_to_none=True)
    with no_host_sync():
        for batch, labels in data[1:]:
            train_step(model, opt, batch, labels)
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():  # an inference step too
            model(data[0][0])
        model.train()
    raise_pending_errors()


TRAINER_OPTIONS = {"fp32": {}, "bf16": {"amp": "bf16"}, "fp16-clip": {"amp": "fp16", "grad_clip": 1.0},
                   "cosine": {"lr_schedule": "cosine", "warmup_steps": 2},
                   "uncertainty": {"task_weighting": "uncertainty", "task_weights": None}}


@pytest.mark.parametrize("options", list(TRAINER_OPTIONS))
def test_trainer_step_has_no_host_sync(tiny_schema, small_model_cfg, options):
    # the trainer's steady-state loop body: host check, non-blocking copy, step, device-side stats; with
    # autocast, a GradScaler (device-side inf checks, fused Adam), an lr schedule, learned task weights
    from dtn.config import load_config
    from dtn.train.trainer import Trainer, _EpochStats, batch_to_device

    config = load_config("cpu")
    config = dataclasses.replace(config, model=small_model_cfg, train=dataclasses.replace(
        config.train, device="cuda", progress=False, lr=1e-3, task_weights=[1.0, 0.5]))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **TRAINER_OPTIONS[options]))
    trainer = Trainer(fused_dtn(tiny_schema, small_model_cfg), config)
    trainer.schedule.set_total_steps(4)
    stats = _EpochStats(trainer.device, 2)
    host = make_batches(4, seed=2)
    for step, (batch, labels) in enumerate(host):
        ctx = no_host_sync() if step else contextlib.nullcontext()  # step 0 warms up
        with ctx:
            trainer.check_host_batch(batch)
            trainer.train_step(batch_to_device(batch, trainer.device), labels.to(trainer.device, non_blocking=True),
                               step, stats)
    loss = trainer._sync_point(stats)  # the sync point: finite loss, no pending error
    assert loss == loss and loss > 0


def _copy_into(static, batch, labels):
    sb, sy = static
    sb.categorical.copy_(batch.categorical)
    sb.numeric.copy_(batch.numeric)
    for s, m in zip(sb.multi, batch.multi):
        s.values.copy_(m.values)
        s.offsets.copy_(m.offsets)
    sy.copy_(labels)


@pytest.mark.parametrize("mode", ["fused", "grouped"])
def test_fused_dtn_step_captured_with_cuda_graph(tiny_schema, small_model_cfg, mode):
    eager = fused_dtn(tiny_schema, small_model_cfg, mode)
    graphed = copy.deepcopy(eager)
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3, capturable=True)
    opt_g = torch.optim.Adam(graphed.parameters(), lr=1e-3, capturable=True)
    data = on_device(make_batches(8, seed=1))
    static = copy.deepcopy(data[0])
    warmup = 3
    side = torch.cuda.Stream()  # warm up on a side stream, as torch.cuda.graphs' recipe does
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(warmup):
            _copy_into(static, *data[i])
            opt_g.zero_grad(set_to_none=True)
            train_step(graphed, opt_g, *static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt_g.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = train_step(graphed, opt_g, *static)
    replayed = []
    for i in range(warmup, len(data)):
        _copy_into(static, *data[i])
        graph.replay()
        replayed.append(static_loss.clone())
    expected = []
    for i, (batch, labels) in enumerate(data):
        opt_e.zero_grad(set_to_none=True)
        loss = train_step(eager, opt_e, batch, labels)
        if i >= warmup:
            expected.append(loss)
    torch.testing.assert_close(torch.stack(replayed), torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert_params_close(graphed, eager, rtol=1e-5, atol=1e-6)


class _LossOf(torch.nn.Module):
    """model -> loss, as one module for torch.compile (the backward is compiled with it)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, labels):
        return self.model.loss(self.model(batch), labels)[0]


def test_fused_dtn_step_with_torch_compile_reduce_overhead(tiny_schema, small_model_cfg):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = fused_dtn(tiny_schema, small_model_cfg)
    compiled_model = copy.deepcopy(eager)
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3)
    opt_c = torch.optim.Adam(compiled_model.parameters(), lr=1e-3)
    step_loss = torch.compile(_LossOf(compiled_model), mode="reduce-overhead")
    data = on_device(make_batches(6, seed=3))
    got, want = [], []
    for batch, labels in data:
        torch.compiler.cudagraph_mark_step_begin()
        loss = step_loss(batch, labels)
        loss.backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
        got.append(loss.detach().clone())
        want.append(train_step(eager, opt_e, batch, labels))
        opt_e.zero_grad(set_to_none=True)
    # CUDA graphs were recorded and replayed, not skipped (a skip names its reason in the log)
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-3, atol=1e-4)
    assert_params_close(compiled_model, eager, rtol=1e-3, atol=1e-3)
