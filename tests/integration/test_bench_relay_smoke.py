"""Smoke test of bench/relay.py: a tiny steady-state relay run against real peers (smtp-source,
ferrymail with 1 and 2 workers, Postfix, smtp-sink) prints its table with every relayed
message checked.

No timing assertions: only that the harness works end to end.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.benchrun import assert_checked_rows, rewrite_section, run_bench
from tests.realpeers import require

# isort: split
import relay  # bench/ is not a package: on sys.path through benchrun


def test_quick_run_relays_and_checks_every_message() -> None:
    for name in ("smtp-source", "smtp-sink", "postfix"):
        require(name)
    if os.geteuid() != 0:
        pytest.skip("Postfix (mail_owner) needs root")
    out = run_bench("relay.py", "--quick", "--messages", "60", "--workers", "2", timeout=120)
    assert "| variant | size | msgs/cycle | msg/s (median) |" in out
    assert_checked_rows(out, [("ferrymail, 2 workers" if v.many else v.label, v.source)
                              for v in relay.VARIANTS])
    assert "| ferrymail-1 / postfix |" in out
    assert "| ferrymail-n / ferrymail-1 |" in out


def test_write_results_replaces_only_the_relay_section(tmp_path: Path) -> None:
    text = rewrite_section(relay.write_results, tmp_path / "RESULTS.md",
                           "# Benchmark results\n\n## Inbound\n\nin\n\n## Relay\n\nold\n\n"
                           "## Outbound\n\nout\n", "new")
    assert text == ("# Benchmark results\n\n## Inbound\n\nin\n\n## Relay\n\nnew\n\n"
                                "## Outbound\n\nout\n")


def test_cycle_sizes_and_variant_selection() -> None:
    plan = relay.Plan(sizes=[2048, 102400], messages=6000, repeat=1, warmup=20, sessions=20,
                      concurrency=20, reuse=100, workers=2)
    assert relay.messages_for(plan, 2048) == 6000
    assert 1000 < relay.messages_for(plan, 102400) < 1500
    assert relay.label(relay.VARIANTS[1], plan) == "ferrymail, 2 workers"
    keys = [v.key for v in relay.peers.select_variants(relay.VARIANTS, relay.ALIASES,
                                                       "ferrymail")]
    assert keys == ["ferrymail-1", "ferrymail-n"]
