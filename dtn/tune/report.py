"""What ``dtn tune`` leaves behind, read back: ``tune.md`` (one row a model) and the tuned configs
(``<out>/<model>/best.yaml``) that ``dtn train`` / ``dtn table3 --tuned`` take."""
from __future__ import annotations

import json
import os

from ..models import canonical_name

def tune_markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"Studies: {s['trials']} trials per model (TPE, median pruning on the per-epoch validation AUC), each "
             f"trial on {s['subsample']:.0%} of the train split for at most {s['max_epochs'] or 'the config'} epochs; "
             f"score: the best mean validation AUC over the trial's epochs. {_span(summary)}\n",
             "| Model | trials (complete / pruned / diverged) | base config score | best score | gain | best trial | "
             "trial time (min) | best parameters |", "|---|---|---|---|---|---|---|---|"]
    for m, st in summary["studies"].items():
        c, b, d = st["counts"], st["best"], st["default"]
        params = ", ".join(f"{k.split('.', 1)[1]}={_short(v)}" for k, v in (b["params"] if b else {}).items())
        cells = [m, f"{c['finished']} ({c['complete']} / {c['pruned']} / {c['diverged']})",
                 f"{d['value']:.5f}" if d else "-", f"{b['value']:.5f}" if b else "-",
                 f"{b['value'] - d['value']:+.5f}" if b and d else "-", str(b["number"]) if b else "-",
                 f"{st['trial_seconds'] / 60:.1f}", params or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _span(summary: dict) -> str:
    span, (first, last) = summary.get("trials_span_seconds"), summary.get("trials_span") or (None, None)
    if span is None:
        return "No trial ran."
    return (f"The trials ran from {first[:16].replace('T', ' ')} to {last[:16].replace('T', ' ')} (machine clock): "
            f"{span / 60:.0f} min wall, pauses between sessions included; this invocation ran "
            f"{summary['jobs']} study(ies) at a time for {summary['wall_seconds'] / 60:.1f} min.")


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return json.dumps(v).replace(" ", "")


def load_tuned(folder: str, models: list[str]) -> dict[str, str]:
    """``{model: <folder>/<model>/best.yaml}`` for ``models``; a missing one is an error naming it."""
    out = {canonical_name(m): os.path.join(folder, canonical_name(m), "best.yaml") for m in models}
    missing = [p for p in out.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"--tuned {folder}: no tuned config {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                + "; run dtn tune for that model first")
    return out
