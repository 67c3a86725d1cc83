"""Smoke test of bench/memory.py: it runs against a real ferrymail and prints its table."""

from __future__ import annotations

import re

from tests.integration.benchrun import run_bench


def test_quick_memory_run_prints_growth_per_message_size():
    out = run_bench("memory.py", "--quick", "--concurrency", "1,2", timeout=120)
    row = r"^\| (\d+) \| 4 MiB \| [\d.]+ MiB \| [\d.]+ MiB \| ([\d.]+) \| ([\d.]+) \|"
    rows = re.findall(row, out, re.M)
    assert [n for n, *_ in rows] == ["1", "2"], out
    for _, per_message, per_all in rows:
        # streamed: far below one message's size (kept whole it was about four times it)
        assert float(per_message) < 1.0 and float(per_all) <= float(per_message)
