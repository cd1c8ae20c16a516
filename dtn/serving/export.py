"""``dtn export``: a trained model and its feature encoders as one self-contained folder.

The folder holds

* ``model.pt2``     the model traced by ``torch.export`` (aten ops only: the input layer and
                    the FIMs run their pure-PyTorch reference kernels, so loading needs
                    neither ``dtn`` nor ``dtn_kernels``), from plain tensors to probabilities,
                    with a dynamic batch size and dynamic multi-valued bag sizes;
* ``encoders.json`` the fitted encoders (vocabularies, numeric statistics, bucket edges, schema);
* ``predict.py``    the predictor (:mod:`dtn.serving.predict`): raw rows -> probabilities;
* ``dtn_codec.py``  the encoding primitives (:mod:`dtn.data.codec`) that training used;
* ``meta.json``     model name, tasks, input signature, versions, trim, export check.

The program's inputs (:class:`FlatModel`): ``categorical`` int64 [B, C], ``numeric`` float32
[B, N], then for each multi-valued feature ``values`` int64 [n], ``offsets`` int64 [B + 1]
and, if weighted, ``weights`` float32 [n]; output float32 [B, T] probabilities in task order.
"""
from __future__ import annotations

import copy
import datetime
import io
import json
import os

import torch
from torch import nn

from ..features import FeatureBatch, JaggedField, Schema
from ..fileio import atomic_write_all
from . import predict as _predict_module
from ..data import codec as _codec_module

MIN_BATCH = 2  # batch sizes 0 and 1 are specialised by torch.export; the predictor pads a single row


class FlatModel(nn.Module):
    """A multi-task model as a function of plain tensors -> probabilities [B, T]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.weighted = [f.weighted for f in model.schema.multi]

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor, *multi: torch.Tensor) -> torch.Tensor:
        fields, i = [], 0
        for weighted in self.weighted:
            values, offsets = multi[i], multi[i + 1]
            weights = multi[i + 2] if weighted else None
            i += 3 if weighted else 2
            fields.append(JaggedField(values, offsets, weights))
        return torch.sigmoid(self.model(FeatureBatch(categorical, numeric, tuple(fields))))


def input_names(schema: Schema) -> list[str]:
    names = ["categorical", "numeric"]
    for f in schema.multi:
        names += [f"{f.name}.values", f"{f.name}.offsets"] + ([f"{f.name}.weights"] if f.weighted else [])
    return names


def random_inputs(schema: Schema, batch: int, seed: int = 0, max_bag: int = 4) -> tuple[torch.Tensor, ...]:
    """Valid random inputs (ids within every table, some empty bags) for tracing and checking."""
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, max(f.cardinality, 1), (batch,), generator=g) for f in schema.categorical], 1) \
        if schema.categorical else torch.zeros(batch, 0, dtype=torch.long)
    out = [cat, torch.randn(batch, len(schema.numeric), generator=g)]
    for f in schema.multi:
        lens = torch.randint(0, max_bag + 1, (batch,), generator=g)
        lens[0] = max(int(lens[0]), 1)
        offsets = torch.zeros(batch + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lens, 0)
        n = int(offsets[-1])
        out += [torch.randint(0, max(f.cardinality, 1), (n,), generator=g), offsets]
        if f.weighted:
            out.append(torch.rand(n, generator=g) * 2)
    return tuple(out)


def dynamic_shapes(schema: Schema):
    batch = torch.export.Dim("batch", min=MIN_BATCH)
    shapes = [{0: batch}, {0: batch}]
    for j, f in enumerate(schema.multi):
        n = torch.export.Dim(f"nnz_{j}", min=0)
        shapes += [{0: n}, {0: batch + 1}] + ([{0: n}] if f.weighted else [])
    # forward(categorical, numeric, *multi): the varargs are one more (nested) element when present
    return (shapes[0], shapes[1], tuple(shapes[2:])) if schema.multi else (shapes[0], shapes[1])


def for_export(model: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy of ``model`` on the pure-PyTorch kernels (aten ops only)."""
    import dtn_kernels

    if getattr(model.input_layer, "ebc", None) is not None:  # TorchRec tables: the own input layer, same weights
        from ..features.torchrec_input import own_twin

        model = own_twin(model)
    m = copy.deepcopy(model).cpu().eval()
    dtn_kernels.set_kernels(m, "reference")
    m.input_layer.embedding_kernel = "reference"
    return m


def non_aten_ops(program) -> list[str]:
    """Operators in an ExportedProgram's graph outside the aten namespace (e.g. torch.ops.dtn.*)."""
    bad = set()
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace != "aten":
                bad.add(str(node.target))
    return sorted(bad)


def export_program(model: nn.Module):
    """torch.export the model (reference kernels) over plain tensors; fails if a custom op remains."""
    flat = FlatModel(for_export(model))
    ep = torch.export.export(flat, random_inputs(model.schema, 8), dynamic_shapes=dynamic_shapes(model.schema))
    bad = non_aten_ops(ep)
    if bad:
        raise RuntimeError(f"the exported graph still calls non-aten operators {bad}; it would need dtn_kernels to load")
    return ep, flat


# several files written as one step (dtn.fileio); the old name, for callers that use it
write_all = atomic_write_all


@torch.no_grad()
def export_model(model: nn.Module, encoder, out_dir: str, model_name: str | None = None,
                 extra_meta: dict | None = None) -> dict:
    """Write the artifact folder ``out_dir`` for a trained ``model`` and its fitted ``encoder``;
    returns the paths. The saved program is reloaded and checked against the eager model on
    random inputs (its largest absolute difference goes into meta.json)."""
    if encoder is None or not encoder.fitted:
        raise ValueError("export needs the fitted feature encoders (the checkpoint has none)")
    os.makedirs(out_dir, exist_ok=True)
    paths = {"model": os.path.join(out_dir, "model.pt2"), "encoders": os.path.join(out_dir, "encoders.json"),
             "meta": os.path.join(out_dir, "meta.json"), "predictor": os.path.join(out_dir, "predict.py"),
             "codec": os.path.join(out_dir, "dtn_codec.py")}
    ep, flat = export_program(model)
    # the program is serialised in memory and written by Python (a failed write is an OSError naming the
    # file; torch's own file writer aborts the process on a full disk)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    program = buf.getvalue()
    # check: the program as loaded back against the eager model, on batches of several sizes
    loaded = torch.export.load(io.BytesIO(program)).module()
    eager = copy.deepcopy(model).cpu().eval()
    diff = 0.0
    for b, seed in ((MIN_BATCH, 1), (37, 2), (256, 3)):
        x = random_inputs(model.schema, b, seed)
        diff = max(diff, float((loaded(*x) - FlatModel(eager)(*x)).abs().max()))
    if diff > 1e-5:
        raise RuntimeError(f"the exported program differs from the eager model by {diff:.3g} (> 1e-5)")
    schema = model.schema
    meta = {
        "format": _predict_module.FORMAT,
        "model": model_name or model.cfg.name,
        "tasks": list(schema.labels),
        "label_columns": list(schema.label_columns or schema.labels),
        "inputs": input_names(schema),
        "min_batch": MIN_BATCH,
        "fields": {"categorical": [f.name for f in schema.categorical], "numeric": [f.name for f in schema.numeric],
                   "multi": [f.name for f in schema.multi]},
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "check_max_abs_diff": diff,
        **(extra_meta or {}),
    }
    with open(_predict_module.__file__, "rb") as fh:
        predictor = fh.read()
    with open(_codec_module.__file__, "rb") as fh:
        codec_src = fh.read()
    atomic_write_all({paths["model"]: program,
               paths["encoders"]: json.dumps(encoder.state_dict(), indent=1).encode(),
               paths["predictor"]: predictor, paths["codec"]: codec_src,
               paths["meta"]: json.dumps(meta, indent=2, default=float).encode()})
    return paths


__all__ = ["FlatModel", "MIN_BATCH", "input_names", "random_inputs", "dynamic_shapes", "for_export", "non_aten_ops",
           "export_program", "export_model"]
