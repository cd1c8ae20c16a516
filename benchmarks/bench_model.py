"""Whole models: a DTN training step and an inference batch, with MMoE and PLE alongside.

The paper's configuration (``dtn/configs/paper.yaml``: d = 16, FIM width 512, GDCN 2 layers,
serial MaskNet, MemoNet with 2 HCNets x 2 hashes x 100,000 buckets) on a 39-field input shaped
like Census-Income (32 categorical fields with its cardinalities, 7 numeric), two tasks.

* ``train``: ``zero_grad(set_to_none=True)``, forward, weighted BCE over both tasks, backward,
  Adam step; ``infer``: eval mode, ``torch.no_grad()`` forward. In bf16 the forward and the loss
  run under autocast, the backward and the Adam step outside it (the usual bf16 recipe: fp32
  weights, no grad scaler).
* Providers: ``eager`` (every layer and the input layer on their PyTorch references),
  ``fused`` (``dtn_kernels.set_kernels(model, "fused")``: Triton layers + the compiled
  embedding bag; on CPU the layers' ops run their closed-form PyTorch twins through the
  custom-op path, and the embedding bag its C++ kernel), ``grouped`` (``set_kernels(model, "grouped")``:
  the fused ops with each kind of module run once as a group), ``compile`` / ``compile_fused`` /
  ``compile_grouped`` (``torch.compile`` of each model; the optimizer step stays eager in every provider).

    .venv/bin/python -m pytest benchmarks/bench_model.py --benchmark-only
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import dtn_kernels
from bench_embedding_bag import CENSUS_CARDINALITIES
from dtn.config import load_config
from dtn.features import FeatureBatch, FeatureSpec, Schema
from dtn.models import build_model
from harness import (PAPER_BATCHES, SMOKE_BATCH, Case, SkipProvider, autocast, bench_device, compiled, precisions,
                     preset, run_group, subset)

DEVICE = bench_device()
NUM_NUMERIC = 7
MODELS = ("dtn", "mmoe", "ple")
_MODELS: dict = {}
_COMPILED: dict = {}
_BATCHES: dict = {}


def model_grid() -> list[tuple[str, str, int, str]]:
    """(model, mode, batch, precision): DTN at every paper batch size, MMoE and PLE at the first,
    each in every precision. Headline: the DTN training step at every paper batch size and precision
    (smoke: at its one batch size); the rest is in ``rest``."""
    precs = precisions()
    if preset() == "smoke":
        grid = [("dtn", "train", SMOKE_BATCH, p) for p in precs]
        return subset(grid, core=[], headline=grid)
    grid = [("dtn", mode, b, p) for b in PAPER_BATCHES for mode in ("train", "infer") for p in precs]
    grid += [(name, mode, PAPER_BATCHES[0], p) for name in MODELS[1:] for mode in ("train", "infer") for p in precs]
    if preset() == "quick":  # CPU: the first paper batch only
        grid = [g for g in grid if g[2] == PAPER_BATCHES[0]]
    return subset(grid, core=[], headline=[g for g in grid if g[0] == "dtn" and g[1] == "train"])


def schema() -> Schema:
    feats = [FeatureSpec(f"c{i}", cardinality=c) for i, c in enumerate(CENSUS_CARDINALITIES)]
    feats += [FeatureSpec(f"n{i}", kind="numeric") for i in range(NUM_NUMERIC)]
    return Schema(feats, labels=["income", "marital"])


def model_for(name: str, kernels: str):
    key = (name, kernels)
    if key not in _MODELS:
        if (name, "reference") not in _MODELS:
            torch.manual_seed(0)
            cfg = load_config("paper").model
            if preset() == "smoke":  # tiny widths: the suite's own tests
                cfg = copy.deepcopy(cfg)
                cfg.memonet = dict(cfg.memonet, num_buckets=1000)
            m = build_model(name, schema(), cfg).to(DEVICE)
            dtn_kernels.set_kernels(m, "reference")
            _MODELS[(name, "reference")] = m
        if kernels != "reference":  # fused, grouped, or a *_graph provider's own copy
            m = copy.deepcopy(_MODELS[(name, "reference")])
            dtn_kernels.set_kernels(m, KERNELS.get(kernels, kernels))
            _MODELS[key] = m
    return _MODELS[key]


def batch_of(size: int):
    if size not in _BATCHES:
        g = torch.Generator().manual_seed(size)
        cat = torch.stack([torch.randint(0, c, (size,), generator=g) for c in CENSUS_CARDINALITIES], 1)
        num = torch.randn(size, NUM_NUMERIC, generator=g)
        labels = (torch.rand(size, 2, generator=g) < 0.2).float()
        _BATCHES[size] = (FeatureBatch(cat, num).to(DEVICE), labels.to(DEVICE))
    return _BATCHES[size]


KERNELS = {"fused": "fused", "compile_fused": "fused", "grouped": "grouped", "compile_grouped": "grouped",
           "fused_graph": "fused", "grouped_graph": "grouped"}


def model_case(name: str, provider: str, mode: str, size: int, precision: str) -> Case:
    """The step of one provider. ``*_graph`` providers get a model of their own (the harness captures
    the whole step, optimizer included, into one CUDA graph: Adam with ``capturable=True``, autocast
    without its cast cache, as torch's CUDA-graph notes ask). ``check`` (the numerics gate) sets the
    model's weights to the reference model's, then runs forward + backward without the optimizer step
    (or replays the captured step) and returns the logits, the loss and every parameter's gradient."""
    kernels = KERNELS.get(provider, "reference")
    graph = provider.endswith("_graph")
    model = model_for(name, provider if graph else kernels)
    key = (name, provider, mode, size, precision)
    fn = compiled(model, key, _COMPILED) if provider.startswith("compile") else model
    batch, labels = batch_of(size)
    shape = f"B={size} paper config, 39 fields (32 categorical + 7 numeric), 2 tasks"

    def amp():
        return autocast(precision, DEVICE, cache_enabled=not graph)

    def forward_loss():
        with amp():
            logits = fn(batch)
            loss = F.binary_cross_entropy_with_logits(logits, labels)
        return {"logits": logits, "loss": loss}

    def check(replay=None):
        reference = model_for(name, "reference")
        if model is not reference:  # in place: a captured graph keeps its addresses
            model.load_state_dict(reference.state_dict())
        if mode == "infer":
            out = {"logits": replay() if replay is not None else infer()}
            return {k: v.detach() for k, v in out.items()}
        if replay is None:
            model.train()
            model.zero_grad(set_to_none=True)
            out = forward_loss()
            out["loss"].backward()
        else:
            out = replay()
        res = {k: v.detach() for k, v in out.items()}
        res.update({f"grad:{n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
        if replay is None:
            model.zero_grad(set_to_none=True)
        return res

    if mode == "infer":
        def infer():
            model.eval()
            with torch.no_grad(), amp():
                return fn(batch)
        return Case(f"model:{name}", provider, mode, size, step=infer, shape=shape, check=check,
                    compiled=fn if provider.startswith("compile") else None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({"capturable": True} if graph else {}))

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        out = forward_loss()
        out["loss"].backward()
        opt.step()
        return out
    return Case(f"model:{name}", provider, mode, size, step=train_step, params=list(model.parameters()), shape=shape,
                check=check, compiled=fn if provider.startswith("compile") else None)


@pytest.mark.parametrize("name,mode,batch,precision", model_grid(), ids=lambda v: str(v))
def test_model(benchmark, name, mode, batch, precision, request):
    def make(provider):
        if provider.startswith("compile") and DEVICE.type == "cpu" and os.environ.get("DTN_BENCH_MODEL_COMPILE") != "1":
            raise SkipProvider("torch.compile of a whole model takes minutes on CPU (over the CPU suite's budget); "
                               "DTN_BENCH_MODEL_COMPILE=1 includes it")
        return model_case(name, provider, mode, batch, precision)

    # on CPU "fused" and "grouped" run too (the C++ embedding bag; the layers run their reference forward there,
    # see the module docstring); compile_fused needs the Triton layers
    run_group(benchmark, f"model:{name}", mode, batch, precision, make, DEVICE, request, fused_on_cpu=("fused", "grouped"),
              extra=("grouped", "compile_grouped", "grouped_graph"),
              rounds_override=5 if preset() == "quick" else None)
