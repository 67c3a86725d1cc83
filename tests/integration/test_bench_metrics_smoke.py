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
