"""Smoke test of bench/memory.py: it runs against a real ferrymail and prints its table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_memory_run_prints_growth_per_message_size():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "memory.py"), "--quick", "--concurrency", "1,2"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = r"^\| (\d+) \| 4 MiB \| [\d.]+ MiB \| [\d.]+ MiB \| ([\d.]+) \| ([\d.]+) \|"
    rows = re.findall(row, proc.stdout, re.M)
    assert [n for n, *_ in rows] == ["1", "2"], proc.stdout
    for _, per_message, per_all in rows:
        # streamed: far below one message's size (kept whole it was about four times it)
        assert float(per_message) < 1.0 and float(per_all) <= float(per_message)
