"""Smoke test of bench/adversity.py with tiny counts: both MTAs start with the shared
topology (smtp-sink, hostile.py, a refusing port), the live mail of a dead-half row arrives
and none of the dead half does, and the table and ratios are printed. No timing assertions."""

from __future__ import annotations

import os
import re

import pytest

from tests.integration.benchrun import run_bench
from tests.realpeers import require


def test_tiny_run_prints_rates_and_ratios_for_both_mtas() -> None:
    for name in ("smtp-sink", "postfix"):
        require(name)
    if os.geteuid() != 0:
        pytest.skip("the Postfix peer needs root (mail_owner)")
    out = run_bench("adversity.py", "--live", "6", "--domains", "3", "--rows", "a,b",
                    "--timeout", "30", "--repeat", "1", timeout=120)
    assert "| Row | ferrymail msg/s | postfix msg/s | ferrymail/postfix |" in out
    for title in ("(a) live only", "(b) live + dead half"):
        cell = r"\d+ \(\d+-\d+\)"
        assert re.search(rf"^\| {re.escape(title)} \| {cell} \| {cell} \| [\d.]+ \|$", out,
                         re.M), out
    assert re.search(r"^\| \(b\)/\(a\) \| [\d.]+ \| [\d.]+ \| ≥ 0.8 \|$", out, re.M), out

