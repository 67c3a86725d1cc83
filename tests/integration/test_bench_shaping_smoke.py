"""Smoke test of bench/shaping.py: it runs against real peers (smtp-sink, redis-server) and
prints its table with every variant. No timing assertions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.realpeers import require

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_prints_every_variant_and_ratios() -> None:
    require("smtp-sink")
    require("redis-server")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "shaping.py"), "--messages", "150",
         "--repeat", "1"], capture_output=True, text=True, timeout=90, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for label in ("no policies", "policies, in-process limiter", "policies, Redis limiter"):
        assert f"| {label} |" in out
    assert "| local / none |" in out and "| redis / none |" in out
