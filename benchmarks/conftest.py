"""Benchmark helpers: print the speed-up of dtn_op over the other providers after a run."""
from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    medians = config.__dict__.get("dtn_bench_medians")
    if not medians or "dtn_op" not in medians:
        return
    ours = medians["dtn_op"]
    terminalreporter.section("embedding_bag ratios (median fwd+bwd, vs dtn_op)")
    for provider, med in medians.items():
        terminalreporter.write_line(f"{provider:<14}{med * 1e3:>10.3f} ms  {med / ours:>6.2f}x")
