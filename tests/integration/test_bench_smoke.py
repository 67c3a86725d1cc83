"""Smoke test of bench/inbound.py: it runs against real peers, prints its table, and catches loss.

No timing assertions: only that the harness works end to end and that its checks can fail.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from tests.integration.benchrun import rewrite_section, run_bench
from tests.realpeers import require

# isort: split
import inbound  # bench/ is not a package: on sys.path through benchrun
import peers

VARIANTS = ["smtp-sink", "aiosmtpd-discard", "ferrymail-direct", "ferrymail-proxied"]


def test_quick_run_prints_a_table_with_every_variant() -> None:
    require("smtp-source")
    require("smtp-sink")
    require("haproxy")
    out = run_bench("inbound.py", "--quick", "--only", ",".join(VARIANTS), timeout=60)
    assert "| variant | size | msg/s (median) |" in out
    labels = {v.key: v.label for v in inbound.VARIANTS}
    for key in VARIANTS:
        for size in ("2 KB", "100 KB"):
            row = re.search(rf"^\| {re.escape(labels[key])} \| {size} \| ([\d,]+) \|", out, re.M)
            assert row, f"no row for {key} {size} in:\n{out}"
            assert int(row.group(1).replace(",", "")) > 0
    assert re.search(r"spool (\d+)/\1, all PROXY v2", out), out
    assert "| ferrymail-direct / aiosmtpd-discard |" in out
    assert "| ferrymail-proxied / ferrymail-direct |" in out


def test_spool_check_catches_a_message_that_was_not_stored() -> None:
    """Claim one message more than was sent: the ferrymail spool check must refuse."""
    require("smtp-source")
    with peers.workdir("bench-test-") as d, contextlib.ExitStack() as stack:
        target = inbound.start_ferrymail(False)(stack, d)
        run = peers.run_smtp_source(target.host, target.port, 5, 2048, sessions=2)
        assert run.messages == 5
        with pytest.raises(peers.BenchError, match=r"messages 5 \(want 6\)"):
            target.verify(6, 2048)


def test_spool_check_counts_every_workers_shard() -> None:
    """The workers variant: the check sums every shard, so all stored passes and one
    message more than was sent is refused."""
    require("smtp-source")
    with peers.workdir("bench-test-") as d, contextlib.ExitStack() as stack:
        target = inbound.start_ferrymail(False, 2)(stack, d)
        run = peers.run_smtp_source(target.host, target.port, 40, 2048, sessions=8)
        assert run.messages == 40
        with pytest.raises(peers.BenchError, match=r"messages 40 \(want 41\)"):
            target.verify(41, 2048)
        assert target.verify(40, 2048) == "spool 40/40"


def test_smtp_source_failure_is_an_error() -> None:
    """A server that rejects at end of data makes the run fail, not count."""
    require("smtp-source")
    with peers.workdir("bench-test-") as d:
        port = peers.free_port()
        proc = peers.spawn([peers.binary("smtp-sink"), "-u", "nobody", "-f", ".",
                            f"127.0.0.1:{port}", "16"], d / "sink.log")
        try:
            peers.wait_listening("127.0.0.1", port, alive=lambda: proc.poll() is None)
            with pytest.raises(peers.BenchError, match="end of data rejected"):
                peers.run_smtp_source("127.0.0.1", port, 3, 100, sessions=1, timeout=10)
        finally:
            peers.stop_process(proc)


def test_write_results_replaces_only_the_inbound_section(tmp_path: Path) -> None:
    text = rewrite_section(inbound.write_results, tmp_path / "RESULTS.md",
                           "# Benchmark results\n\nintro\n\n## Inbound\n\nold figures\n\n"
                           "## Outbound\n\nkept as is\n", "new figures")
    assert text == ("# Benchmark results\n\nintro\n\n## Inbound\n\nnew figures\n\n"
                                "## Outbound\n\nkept as is\n")
    fresh = tmp_path / "new.md"
    inbound.write_results("first", fresh)
    text = fresh.read_text()
    assert text.index("## Inbound") < text.index("## Outbound")
    assert "first" in text
