"""Smoke test of bench/outbound.py: it runs against real peers, prints its table, catches lost
and duplicated deliveries, and leaves no process behind when interrupted.

No timing assertions: only that the harness works end to end and that its checks can fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.benchrun import BENCH, REPO, assert_checked_rows, rewrite_section, run_bench
from tests.realpeers import require

# isort: split
import outbound  # bench/ is not a package: on sys.path through benchrun
import peers


def require_peers() -> None:
    for name in ("smtp-source", "smtp-sink", "haproxy", "postfix"):
        require(name)
    if os.geteuid() != 0:
        pytest.skip("Postfix (mail_owner) and HAProxy's usesrc clientip need root")


def test_quick_run_prints_a_table_with_every_variant() -> None:
    require_peers()
    out = run_bench("outbound.py", "--quick", timeout=90)
    assert "| variant | size | msgs/cycle | msg/s (median) |" in out
    assert_checked_rows(out, [(v.label, v.source) for v in outbound.VARIANTS])
    assert "| ferrymail-haproxy-v1 / ferrymail-direct |" in out
    assert "| ferrymail-direct / postfix |" in out


@pytest.fixture()
def one_cycle(tmp_path: Path):
    """ferrymail (direct) after one real 5-message cycle into the dumping sink."""
    require("smtp-source")
    require("smtp-sink")
    plan = outbound.Plan(sizes=[2048], messages=5, repeat=1, warmup=5, sessions=2,
                         concurrency=2, reuse=100)
    v = next(v for v in outbound.VARIANTS if v.key == "ferrymail-direct")
    with peers.workdir("bench-test-out-") as d, contextlib.ExitStack() as stack:
        shared = outbound.Shared(stack.enter_context(peers.dumping_sink(d)))
        mta = outbound.start_mta(v, stack, d, shared, plan)
        offset = mta.log_size()
        cycle = outbound.run_cycle(mta, shared, 5, 2048, plan)
        yield mta, shared, cycle, offset


def test_a_cycle_delivers_and_verifies(one_cycle) -> None:
    mta, shared, cycle, _ = one_cycle
    assert cycle.messages == 5 and cycle.drain > 0
    assert cycle.check == "5/5, distinct, all from 127.0.0.2, as logged"
    assert mta.queued() == 0


def test_check_catches_a_lost_message(one_cycle) -> None:
    """Claim one message more than was delivered: every count disagrees."""
    mta, shared, _, offset = one_cycle
    dump = Path(str(shared.sink.extra["dump"]))
    with pytest.raises(peers.BenchError, match=r"the dump holds 5 messages.*"
                                               r"the MTA logged 5 deliveries"):
        outbound.verify_delivery(mta, dump, 6, offset, sink_received=lambda: 5, settle=0,
                                 log_wait=0.2)


def test_check_catches_a_duplicate_delivery(one_cycle) -> None:
    """The same message twice in the sink's dump (5 + 1 copy): a duplicate, not 6 deliveries."""
    mta, shared, _, offset = one_cycle
    dump = Path(str(shared.sink.extra["dump"]))
    data = dump.read_bytes()
    second = data.index(b"X-Client-Addr:", 1)
    dump.write_bytes(data + data[:second])
    with pytest.raises(peers.BenchError, match=r"1 duplicate deliveries"):
        outbound.verify_delivery(mta, dump, 6, offset, sink_received=lambda: 6, settle=0,
                                 log_wait=0.2)


def test_check_catches_a_wrong_source_address(one_cycle) -> None:
    mta, shared, _, offset = one_cycle
    dump = Path(str(shared.sink.extra["dump"]))
    dump.write_bytes(dump.read_bytes().replace(b"X-Client-Addr: 127.0.0.2\n",
                                               b"X-Client-Addr: 127.0.0.9\n", 1))
    with pytest.raises(peers.BenchError, match=r"sources other than 127.0.0.2: \{'127.0.0.9': 1\}"):
        outbound.verify_delivery(mta, dump, 5, offset, sink_received=lambda: 5, settle=0)


def test_reload_waits_until_the_process_handles_sighup() -> None:
    """ferrymail listens before it installs its SIGHUP handler; a reload sent in between
    killed it (the default action) and failed a fixture's setup now and then."""
    code = ("import signal, sys, time; time.sleep(0.4); "
            "signal.signal(signal.SIGHUP, lambda *a: print('hup', flush=True)); "
            "print('ready', flush=True); time.sleep(20)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert outbound.catches_sighup(proc.pid) is False
        t0 = time.monotonic()
        outbound.wait_catching_sighup(proc.pid, timeout=10)
        assert time.monotonic() - t0 >= 0.3
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGHUP)
        assert proc.stdout.readline() == "hup\n"  # handled, not killed
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert outbound.catches_sighup(proc.pid) is None  # reaped: gone
    with pytest.raises(peers.BenchError, match="exited"):
        outbound.wait_catching_sighup(proc.pid, timeout=1)


def _our_processes(marker: str) -> list[str]:
    """Command lines of live processes whose command line or environment names `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd or marker.encode() in env:
            found.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.fixture()
def scratch() -> Iterator[Path]:
    """An empty BENCH_TMPDIR the postfix user can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="bench-out-test-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_interrupt_stops_every_peer(scratch: Path) -> None:
    """SIGTERM while Postfix is delivering: exit 130, and nothing the run started is left."""
    require_peers()
    env = {**os.environ, "BENCH_TMPDIR": str(scratch)}
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "outbound.py"), "--quick", "--sizes", "2048",
         "--only", "ferrymail-haproxy-v1,postfix"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        for line in proc.stderr:
            if line.startswith("  postfix") and "warm-up" in line:
                break
            assert time.monotonic() < deadline, "no Postfix cycle within 60 s"
        else:
            pytest.fail(f"the run ended before Postfix started: {proc.wait()}")
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(30) == 130, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted: peers stopped" in rest
    time.sleep(0.5)
    assert _our_processes(str(scratch)) == []
    assert list(scratch.iterdir()) == []


def test_write_results_replaces_only_the_outbound_section(tmp_path: Path) -> None:
    text = rewrite_section(outbound.write_results, tmp_path / "RESULTS.md",
                           "# Benchmark results\n\n## Inbound\n\ninbound figures\n\n"
                           "## Outbound\n\nold\n\n## Later\n\nkept\n", "new figures")
    assert text == ("# Benchmark results\n\n## Inbound\n\ninbound figures\n\n"
                                "## Outbound\n\nnew figures\n\n## Later\n\nkept\n")
    last = tmp_path / "last.md"
    last.write_text("# Benchmark results\n\n## Inbound\n\nin\n\n## Outbound\n\nNot measured yet.\n")
    outbound.write_results("figures", last)
    assert last.read_text() == ("# Benchmark results\n\n## Inbound\n\nin\n\n"
                                "## Outbound\n\nfigures\n")
    fresh = tmp_path / "fresh.md"
    fresh.write_text("# Benchmark results\n\n## Inbound\n\nin\n")
    outbound.write_results("first", fresh)
    assert fresh.read_text().endswith("## Inbound\n\nin\n\n## Outbound\n\nfirst\n")


def test_variant_selection_and_cycle_sizes() -> None:
    assert [v.key for v in outbound.select("haproxy")] == ["ferrymail-haproxy-v1",
                                                           "ferrymail-haproxy-v2"]
    assert len(outbound.select("ferrymail,postfix")) == 4
    with pytest.raises(SystemExit, match="unknown variant"):
        outbound.select("sendmail")
    plan = outbound.Plan(sizes=[2048, 102400], messages=8000, repeat=1, warmup=200,
                         sessions=20, concurrency=20, reuse=100)
    assert outbound.messages_for(plan, 2048) == 8000
    assert 1000 < outbound.messages_for(plan, 102400) < 2000
    small = outbound.Plan(sizes=[102400], messages=30, repeat=1, warmup=20, sessions=20,
                          concurrency=20, reuse=100)
    assert outbound.messages_for(small, 102400) == 20  # never fewer than the sessions
