"""Smoke test of bench/metrics_cost.py: one small round, both variants, and its table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.realpeers import require

REPO = Path(__file__).resolve().parents[2]


def test_metrics_cost_quick_run() -> None:
    require("smtp-source")
    require("smtp-sink")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "metrics_cost.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"\| metrics on .* \| [\d,]+ \|", proc.stdout), proc.stdout
    assert re.search(r"\| metrics off .* \| [\d,]+ \|", proc.stdout), proc.stdout
    assert re.search(r"paired ratios \*\*\d\.\d{3}\*\*", proc.stdout), proc.stdout
