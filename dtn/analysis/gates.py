"""Gate weights of every gated model (DTN: paper Fig. 4) and DTN-trim.

``gate_weights``: the mean gate weight of every candidate over a data split, per gate:

* DTN: each task's gate over its candidate FIMs (own MFI, shared MFI and, with the
  Task-Sensitive Network, the predecessor's MFI);
* MMoE, PLE / CGC and the models built on them (SFM, TFI): each task's gate over its experts
  (a task's specific experts and the shared ones), and, on every PLE level but the last, the
  shared gate over all experts of the level. Gates are named by task (``L<level>/<task>`` and
  ``L<level>/shared`` with more than one level), experts ``<task>/e<i>`` and ``shared/e<i>``.

``trim_model``: switch off candidates whose mean validation weight is under a threshold, remove
FIMs that no gate uses any more, and measure parameters, latency and AUC before and after.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time

import numpy as np
import torch

from . import ensure_dir, inference_latency_ms, markdown_table, plt, predict_probs
from ..fileio import atomic_write_text


def require_dtn(model, command: str = "this analysis"):
    from ..models import DTN

    if not isinstance(model, DTN):
        raise ValueError(f"{command} needs a DTN model (its gates weight FIMs); the checkpoint holds "
                         f"{model.cfg.name!r}")


def require_gated(model, command: str = "this analysis"):
    from ..models import DTN, PLE

    if not isinstance(model, (DTN, PLE)):
        raise ValueError(f"{command} needs a gated model (mmoe, ple, cgc, sfm, tfi or dtn: their gates weight experts "
                         f"or FIMs); the checkpoint holds {model.cfg.name!r}")


def _level_experts(model, i: int):
    """(per-task specific expert names, shared expert names) of PLE level ``i``; TFI's first-level
    experts are FIMs and are named by their kind."""
    level = model.levels[i]
    pre = f"L{i + 1}/" if len(model.levels) > 1 else ""
    kind = getattr(model, "fim_kind", None) if i == 0 else None
    e = kind or "e"
    specific = [[f"{pre}{task}/{e}{j + 1}" for j in range(level.num_specific)] for task in model.tasks]
    return specific, [f"{pre}shared/{e}{j + 1}" for j in range(level.num_shared)]


def expert_gate_names(model) -> list[tuple[str, list[str]]]:
    """(gate name, its candidate experts' names) for every gate of a PLE-family model, level by level,
    in the order ``forward_details`` returns their weights."""
    out = []
    for i, level in enumerate(model.levels):
        pre = f"L{i + 1}/" if len(model.levels) > 1 else ""
        specific, shared = _level_experts(model, i)
        out += [(f"{pre}{task}", specific[t] + shared) for t, task in enumerate(model.tasks)]
        if level.shared_gate is not None:
            out.append((f"{pre}shared", [e for group in specific for e in group] + shared))
    return out


def expert_slot_names(model) -> list[str]:
    """Every expert of a PLE-family model: per level, the tasks' specific experts, then the shared ones."""
    out = []
    for i in range(len(model.levels)):
        specific, shared = _level_experts(model, i)
        out += [e for group in specific for e in group] + shared
    return out


@torch.no_grad()
def mean_expert_gate_weights(model, batches) -> list[torch.Tensor]:
    """Mean gate weight of every candidate expert per gate (the order of :func:`expert_gate_names`)
    over an iterable of batches, summed in float64."""
    sums, count = None, 0
    for batch in batches:
        w = [x for level in model.forward_details(batch)["gate_weights"] for x in level]
        if sums is None:
            sums = [torch.zeros(x.shape[1], dtype=torch.float64) for x in w]
        for s, x in zip(sums, w):
            s += x.double().sum(0).cpu()
        count += batch.batch_size
    return [s / max(count, 1) for s in sums or []]


def slot_names(model) -> list[str]:
    """Task-independent names of the gate candidates: own/<kind>, shared/<kind>, pred/<kind>."""
    return [f"own/{k}" for k in model.kinds] + [f"shared/{k}" for k in model.kinds] + \
        ([f"pred/{k}" for k in model.kinds] if any(p is not None for p in model.predecessor.values()) else [])


def gate_weights(model, data, batch_size: int = 8192) -> dict:
    """Mean gate weight per gate and candidate on ``data`` (an EncodedData); DTN: one gate per task,
    keyed by task (what DTN-trim reads)."""
    from ..models import DTN

    require_gated(model, "gate weights")
    model.eval()
    if not isinstance(model, DTN):
        return _expert_gate_weights(model, data, batch_size)
    weights = model.mean_gate_weights(b for b, _ in data.batches(batch_size))
    out = {"model": model.cfg.name, "kind": "fim", "tasks": list(model.tasks), "gates": list(model.tasks),
           "slots": slot_names(model), "rows": len(data), "weights": {}}
    for t, task in enumerate(model.tasks):
        names = model.candidate_names(t)
        out["weights"][task] = {"candidates": names, "slots": out["slots"][: len(names)],
                                "mean": [float(x) for x in weights[t]],
                                "active": [bool(a) for a in model.active[t, : len(names)].cpu()]}
    return out


def _expert_gate_weights(model, data, batch_size: int) -> dict:
    names = expert_gate_names(model)
    weights = mean_expert_gate_weights(model, (b for b, _ in data.batches(batch_size)))
    slots = expert_slot_names(model)
    out = {"model": model.cfg.name, "kind": "expert", "tasks": list(model.tasks), "gates": [n for n, _ in names],
           "slots": slots, "rows": len(data), "weights": {}}
    for (gate, experts), w in zip(names, weights):
        out["weights"][gate] = {"candidates": experts, "slots": experts, "mean": [float(x) for x in w],
                                "active": [True] * len(experts)}
    return out


def gates_markdown(g: dict) -> str:
    if g.get("kind") == "expert":  # gates x experts, a blank where a gate cannot choose the expert
        rows = []
        for gate in g["gates"]:
            w = g["weights"][gate]
            mean = dict(zip(w["slots"], w["mean"]))
            rows.append([gate] + [f"{mean[s]:.4f}" if s in mean else "" for s in g["slots"]])
        return markdown_table(["gate"] + g["slots"], rows)
    rows = []
    for task in g["tasks"]:
        w = g["weights"][task]
        for slot, name, m, a in zip(w["slots"], w["candidates"], w["mean"], w["active"]):
            rows.append([task, slot, name, f"{m:.4f}", "yes" if a else "trimmed"])
    return markdown_table(["task", "slot", "candidate FIM", "mean gate weight", "active"], rows)


def gates_csv(g: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task" if g.get("kind", "fim") == "fim" else "gate", "slot", "candidate", "mean_gate_weight", "active"])
    for task in g.get("gates", g["tasks"]):
        d = g["weights"][task]
        for row in zip(d["slots"], d["candidates"], d["mean"], d["active"]):
            w.writerow([task, *row])
    return buf.getvalue()


def gates_heatmap(g: dict, path: str, title: str | None = None) -> None:
    """Gates (tasks) x candidate slots; a cell a gate does not have (the first task of a DTN has no
    predecessor; a PLE task gate does not see another task's experts) is blank."""
    pyplot = plt()
    slots = g["slots"]
    gates = g.get("gates", g["tasks"])
    M = np.full((len(gates), len(slots)), np.nan)
    for i, gate in enumerate(gates):
        w = g["weights"][gate]
        if g.get("kind") == "expert":
            for s, m in zip(w["slots"], w["mean"]):
                M[i, slots.index(s)] = m
        else:  # DTN: a task's candidates are the first slots, in order
            M[i, : len(w["mean"])] = w["mean"]
    title = title or f"{g.get('model', 'dtn').upper()} mean gate weights"
    fig, ax = pyplot.subplots(figsize=(1.0 + 0.9 * len(slots), 1.2 + 0.6 * len(gates)))
    im = ax.imshow(np.ma.masked_invalid(M), cmap="viridis", aspect="auto", vmin=0)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            if not np.isnan(M[i, j]):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center",
                        color="white" if M[i, j] < 0.6 * np.nanmax(M) else "black", fontsize=8)
    ax.set_xticks(range(len(slots)), slots, rotation=45, ha="right")
    ax.set_yticks(range(len(gates)), gates)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    pyplot.close(fig)


def write_gates(g: dict, out_dir: str) -> dict:
    ensure_dir(out_dir)
    paths = {"md": os.path.join(out_dir, "gates.md"), "csv": os.path.join(out_dir, "gates.csv"),
             "json": os.path.join(out_dir, "gates.json"), "png": os.path.join(out_dir, "gates.png")}
    atomic_write_text(gates_markdown(g), paths["md"])
    atomic_write_text(gates_csv(g), paths["csv"])
    atomic_write_text(json.dumps(g, indent=2), paths["json"])
    gates_heatmap(g, paths["png"])
    return paths


def split_metrics(model, split, batch_size) -> dict:
    from ..train.metrics import task_metrics

    return task_metrics(split.labels.numpy(), predict_probs(model, split, batch_size), model.tasks)


def trim_model(model, data, threshold: float, latency_batch: int = 2048, latency_repeats: int = 30,
               eval_batch_size: int = 8192, log=print) -> dict:
    """DTN-trim ``model`` in place with gate weights measured on ``data.valid``; before/after report
    (parameters, median forward latency on the first ``latency_batch`` test rows, test metrics)."""
    require_dtn(model, "DTN-trim")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"trim threshold must be in [0, 1), got {threshold}")
    model.eval()
    lat_batch, _ = data.test.batch(slice(0, min(latency_batch, len(data.test))))
    before = {"params": model.num_parameters(), "test": split_metrics(model, data.test, eval_batch_size),
              "latency": inference_latency_ms(model, lat_batch, latency_repeats)}
    log(f"before: {before['params']:,} params, {before['latency']['median_ms']:.2f} ms / batch of "
        f"{lat_batch.batch_size}")
    t0 = time.perf_counter()
    g = gate_weights(model, data.valid, eval_batch_size)
    weights = [torch.tensor(g["weights"][t]["mean"], dtype=torch.float64) for t in model.tasks]
    info = model.trim(weights, threshold)
    trim_seconds = time.perf_counter() - t0
    after = {"params": model.num_parameters(), "test": split_metrics(model, data.test, eval_batch_size),
             "latency": inference_latency_ms(model, lat_batch, latency_repeats)}
    log(f"after:  {after['params']:,} params, {after['latency']['median_ms']:.2f} ms; removed "
        f"{info['removed'] or 'no FIM'}")
    switched_off = {t: [n for n, a in zip(model.candidate_names(i), model.active[i].tolist()) if not a]
                    for i, t in enumerate(model.tasks)}
    return {"threshold": threshold, "removed": info["removed"], "candidates_off": switched_off,
            "gate_weights_valid": g, "before": before, "after": after, "trim_seconds": trim_seconds}


def trim_markdown(r: dict) -> str:
    b, a = r["before"], r["after"]
    rows = [["parameters", f"{b['params']:,}", f"{a['params']:,}"],
            [f"latency ms / batch of {b['latency']['batch_size']} (median of {b['latency']['repeats']})",
             f"{b['latency']['median_ms']:.2f}", f"{a['latency']['median_ms']:.2f}"]]
    for t in b["test"]:
        rows.append([f"{t} test AUC", f"{b['test'][t]['auc']:.4f}", f"{a['test'][t]['auc']:.4f}"])
        rows.append([f"{t} test LogLoss", f"{b['test'][t]['logloss']:.4f}", f"{a['test'][t]['logloss']:.4f}"])
    text = markdown_table(["", "DTN", f"DTN-trim (threshold {r['threshold']})"], rows)
    text += f"\nRemoved FIMs: {', '.join(r['removed']) if r['removed'] else 'none'}.\n"
    off = "; ".join(f"{t}: {', '.join(v) if v else 'none'}" for t, v in r["candidates_off"].items())
    text += f"Gate candidates switched off: {off}.\n"
    return text


def write_trim(r: dict, model, encoder, config, out_dir: str) -> dict:
    from ..fileio import atomic_save
    from ..train.model_file import checkpoint_payload

    ensure_dir(out_dir)
    paths = {"md": os.path.join(out_dir, "trim.md"), "json": os.path.join(out_dir, "trim.json"),
             "checkpoint": os.path.join(out_dir, "trimmed.pt")}
    atomic_write_text(trim_markdown(r), paths["md"])
    atomic_write_text(json.dumps(r, indent=2, default=float), paths["json"])
    atomic_save(checkpoint_payload(model, encoder, config), paths["checkpoint"])
    return paths

