"""ConnectionLimiter and LimitLog: bounds never exceeded, counts exact, log lines bounded."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from ferrymail.smtp.connlimit import ConnectionLimiter, LimitLog

_OPS = st.lists(st.tuples(st.sampled_from(["open", "close"]), st.sampled_from("abcd")),
                max_size=200)


@given(ops=_OPS, max_total=st.integers(0, 6), max_per=st.integers(0, 4))
def test_limits_hold_and_every_refusal_is_counted(ops, max_total, max_per):
    lim = ConnectionLimiter(max_total, max_per)
    live: list[str | None] = []  # per connection: the client it claimed (None: refused)
    refused = {"server": 0, "client": 0}
    for op, client in ops:
        if op == "open":
            if not lim.open():
                refused["server"] += 1
                assert max_total and len(live) >= max_total
                continue
            if lim.claim(client):
                live.append(client)
            else:
                refused["client"] += 1
                assert max_per and live.count(client) >= max_per
                lim.release(None)
        elif live:
            gone = next((c for c in live if c == client), live[0])
            live.remove(gone)
            lim.release(gone)
        assert lim.total == len(live)
        assert not max_total or lim.total <= max_total
        for c, n in lim.per_client.items():
            assert n == live.count(c) > 0 and (not max_per or n <= max_per)
    assert lim.counters.refused_server == refused["server"]
    assert lim.counters.refused_client == refused["client"]
    assert lim.counters.accepted == sum(1 for op, _ in ops if op == "open") - refused["server"]


def test_zero_means_unlimited():
    lim = ConnectionLimiter(0, 0)
    for _ in range(5000):
        assert lim.open() and lim.claim("192.0.2.1")
    assert lim.total == 5000 and lim.per_client == {"192.0.2.1": 5000}


@given(times=st.lists(st.floats(0, 100, allow_nan=False), max_size=300))
def test_limit_log_writes_at_most_one_line_per_interval_and_loses_no_count(times):
    log = LimitLog(interval=10.0)
    lines = []
    for now in sorted(times):
        n = log.hit(now)
        if n:
            lines.append((now, n))
    assert len(lines) <= 11 if times else not lines
    assert all(b[0] - a[0] >= 10.0 for a, b in itertools.pairwise(lines))
    logged = sum(n for _, n in lines)
    assert logged + log._pending == len(times)  # the next line reports the rest
    assert not times or lines[0] == (min(times), 1)


_FD_SCRIPT = """
import io, resource
from ferrymail.config import parse_startup
from ferrymail.observe import log
from ferrymail.smtp.server import SMTPServer
buf = io.StringIO()
log.configure("info", buf)
cfg = parse_startup("environment: {hostname: mx.example.com}\\nservers:\\n  - id: in\\n"
                    "    listeners: [{port: 2525}]\\n    limits: {connections: 500}\\n")
srv = SMTPServer(cfg.servers[0], hostname="mx.example.com", spool=None, running=lambda: None)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024))
srv._check_descriptors()
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 300))
srv._check_descriptors()
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
print(buf.getvalue())
"""


def test_descriptors_are_raised_for_the_connection_limit_or_a_warning_says_why_not():
    # Descriptors running out meant a bare EOF for new clients with nothing logged.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FD_SCRIPT], capture_output=True, text=True,
                         timeout=30, check=True).stdout.splitlines()
    assert out[0] == "564"  # 500 connections + 64 in reserve, within the hard limit
    assert out[1] == "256"  # the hard limit (300) is too low: unchanged, and a warning
    log_text = "\n".join(out[2:])
    assert "event=smtp.limits.descriptors" in log_text and "was=256" in log_text
    assert "level=warning event=smtp.limits.descriptors" in log_text
