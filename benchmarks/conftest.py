"""Benchmark suite hooks.

* Runs the collected groups in priority order (``harness.priority``: paper batch sizes first, ops
  before whole models, then precision in run order; file order otherwise), so a suite cut short
  has measured the headline groups.
* Records every skipped test with its reason (in ``DTN_BENCH_LOG`` and in pytest-benchmark's
  ``--benchmark-json`` output as ``dtn_skipped``, next to the providers ``harness.run_group`` left
  out), so ``benchmarks/report.py`` can list them under the table.
* Prints the embedding bag's CPU ratios after its ratio benchmark (``test_embedding_bag_fwd_bwd``).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import harness` from any rootdir


def pytest_collection_modifyitems(session, config, items):
    from harness import priority

    here = os.path.dirname(os.path.abspath(__file__))

    def key(item):
        callspec = getattr(item, "callspec", None)
        if callspec is None or not str(item.path).startswith(here):
            return (0, 0, 0)
        return priority(callspec.params, model=item.path.name == "bench_model.py")

    items.sort(key=key)  # stable: file and parametrization order within a priority


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "got empty parameter set" in reason:  # a grid with no case in this subset: nothing was left out
            return
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})
        from harness import log_line

        log_line({"kind": "skipped", **_SKIPPED[-1]})


_SKIPPED: list = []


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from harness import SKIPPED

    output_json["dtn_skipped"] = list(_SKIPPED) + list(SKIPPED)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    medians = config.__dict__.get("dtn_bench_medians")
    if not medians or "dtn_op" not in medians:
        return
    ours = medians["dtn_op"]
    terminalreporter.section("embedding_bag ratios (median fwd+bwd, vs dtn_op)")
    for provider, med in medians.items():
        terminalreporter.write_line(f"{provider:<14}{med * 1e3:>10.3f} ms  {med / ours:>6.2f}x")
