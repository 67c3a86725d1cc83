"""Smoke test of bench/metrics_cost.py: one small round, both variants, and its table."""

from __future__ import annotations

import re

from tests.integration.benchrun import run_bench
from tests.realpeers import require


def test_metrics_cost_quick_run() -> None:
    require("smtp-source")
    require("smtp-sink")
    out = run_bench("metrics_cost.py", "--quick", timeout=120)
    assert re.search(r"\| metrics on .* \| [\d,]+ \|", out), out
    assert re.search(r"\| metrics off .* \| [\d,]+ \|", out), out
    assert re.search(r"paired ratios \*\*\d\.\d{3}\*\*", out), out


def test_metrics_scrape_cost_with_workers_quick_run() -> None:
    require("smtp-source")
    require("smtp-sink")
    out = run_bench("metrics_cost.py", "--workers", "2", "--quick", timeout=120)
    assert re.search(r"\| 1 \| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \| [\d,]+ \|", out), out
    assert re.search(r"\| 2 \| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \| [\d,]+ \|", out), out
    assert re.search(r"Ratio 2 / 1: latency \*\*\d+\.\d\d\*\*", out), out
