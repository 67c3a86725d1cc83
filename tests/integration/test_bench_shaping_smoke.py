"""Smoke test of bench/shaping.py: it runs against real peers (smtp-sink, redis-server) and
prints its table with every variant. No timing assertions."""

from __future__ import annotations

from tests.integration.benchrun import run_bench
from tests.realpeers import require


def test_quick_run_prints_every_variant_and_ratios() -> None:
    require("smtp-sink")
    require("redis-server")
    out = run_bench("shaping.py", "--messages", "150", "--repeat", "1", timeout=90)
    for label in ("no policies", "policies, in-process limiter", "policies, Redis limiter",
                  "policies, host limiter service, 1 engine",
                  "policies, host limiter service, 1 engine, no prefetch",
                  "policies, host limiter service, 2 engine processes"):
        assert f"| {label} |" in out
    assert "| local / none |" in out and "| redis / none |" in out
    assert "| host / local |" in out and "| hostx2 / local |" in out
    assert "| host / host-noprefetch |" in out
