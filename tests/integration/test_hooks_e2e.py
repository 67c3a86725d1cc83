"""The pre-delivery hook in a real `ferrymail run`: mail goes in over SMTP, the hook decides,
the seed's HAProxy and smtp-sink show what came out (source IP and HELO as the MX saw them).

One ferrymail process serves the whole module; each test uses its own recipient domain, which
the hook file (written next to the running config) maps to a decision.
"""

from __future__ import annotations

import re
import smtplib
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import (
    FerrymailProc,
    listener,
    server,
    spool_get,
    start_ferrymail,
    startup_yaml,
)
from tests.integration.outbound_harness import field_of
from tests.realpeers import (
    SinkDump,
    SmtpSink,
    free_port,
    haproxy,
    require_transparent_proxy,
    seed_outbound_haproxy,
    smtp_sink,
)

pytestmark = pytest.mark.timeout(60)

SENDER = "sender@origin.test"

HOOK = """
import time

PROXY = {{"server": "127.0.0.1", "port": {proxy}, "version": 1}}


def explode(qid):
    raise RuntimeError(f"hook exploded for {{qid}}")


def predelivery(ctx, action):
    domain = ctx.recipients[0].rpartition("@")[2]
    if domain == "a.test":
        action.try_(proxyprotocol=PROXY,
                    sourceip=[{{"address": "{a_ip}", "helo": "{a_helo}"}}])
    elif domain == "b.test":
        action.try_(proxyprotocol=False,
                    sourceip=[{{"address": "127.0.0.22", "helo": "b22.hook.test"}}])
    elif domain == "raise.test":
        explode(ctx.queue_id)
    elif domain == "hang.test":
        time.sleep(60)
        action.bounce("too late to count")
    elif domain == "bounce.test":
        action.bounce("bounce.test is refused by policy")
    elif domain == "delete.test":
        action.delete("black hole")
    elif domain == "badopt.test":
        action.try_(port=70000)
"""


def running_yaml(proxy: int, sink: int, dsn_sink: int) -> str:
    return f"""
servers:
  - {{id: in, transport: mx, relay_networks: [127.0.0.0/8]}}
addresses:
  - {{id: t23, address: 127.0.0.23, hostname: t23.transport.test}}
scripting:
  hooks:
    predelivery: hook.py
    timeout: 1s
transportgroups:
  - id: default
    retry:
      count: 5
      intervals: [{{interval: 300}}]
    dsn: {{transport: dsn}}
    transports:
      - id: mx
        connection:
          server: 127.0.0.1
          port: {sink}
          proxyprotocol: {{server: 127.0.0.1, port: {proxy}, version: 2}}
          sourceip: {{ipv4: [t23]}}
      - id: dsn
        connection: {{server: 127.0.0.1, port: {dsn_sink}, proxyprotocol: false}}
"""


@dataclass
class Setup:
    fm: FerrymailProc
    port: int
    sink: SmtpSink
    dsn_sink: SmtpSink
    proxy: int
    workdir: Path

    def write_hook(self, a_ip: str = "127.0.0.21", a_helo: str = "a21.hook.test") -> None:
        (self.workdir / "hook.py").write_text(textwrap.dedent(HOOK).format(
            proxy=self.proxy, a_ip=a_ip, a_helo=a_helo))

    def inject(self, *rcpts: str) -> str:
        """Submit one message over SMTP; the queue id from the 250 reply."""
        msgid = f"<{uuid.uuid4()}@origin.test>"
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as s:
            s.ehlo("client.test")
            assert s.mail(SENDER)[0] == 250
            for r in rcpts:
                assert s.rcpt(r)[0] == 250
            code, reply = s.data(f"Subject: hook test\r\nMessage-ID: {msgid}\r\n\r\n"
                                 f"for {' '.join(rcpts)}\r\n".encode())
        assert code == 250, reply
        m = re.search(rb"queued as (\S+)", reply)
        assert m is not None, reply
        return m.group(1).decode()

    def spool_path(self) -> Path:
        return self.workdir / "spool"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    require_transparent_proxy()
    workdir = tmp_path_factory.mktemp("hooks-e2e")
    proxy, port = free_port(), free_port()
    with smtp_sink() as sink, smtp_sink() as dsn_sink, \
            haproxy(seed_outbound_haproxy("127.0.0.1", proxy), [("127.0.0.1", proxy)]):
        st = Setup(None, port, sink, dsn_sink, proxy, workdir)  # type: ignore[arg-type]
        st.write_hook()
        startup = startup_yaml(workdir, [server("in", [listener(port)])], fsync=False)
        st.fm = start_ferrymail(workdir, startup, running_yaml(proxy, sink.port, dsn_sink.port),
                                wait=[("127.0.0.1", port)])
        try:
            yield st
        finally:
            st.fm.kill()


def wait_dump(sink: SmtpSink, match: Callable[[SinkDump], bool],
              timeout: float = 10.0) -> SinkDump:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [d for d in sink.dumps() if match(d)]
        if found:
            return found[0]
        time.sleep(0.05)
    raise TimeoutError(f"no such message in {sink.dump_dir}: "
                       f"{[(d.rcpts, d.client_addr) for d in sink.dumps()]}")


def to(address: str) -> Callable[[SinkDump], bool]:
    return lambda d: f"<{address}>" in d.rcpts


def attempt_line(fm: FerrymailProc, qid: str, rcpt: str) -> str:
    (line,) = fm.wait_log(rf"event=delivery\.(attempt|error) .*qid={qid} .*rcpts={rcpt}")[-1:]
    return line


# --------------------------------------------------------------------------- routing


def test_hook_picks_source_ip_and_proxy_per_domain(setup: Setup) -> None:
    qid = setup.inject("x@a.test", "y@b.test", "z@c.test")
    a = wait_dump(setup.sink, to("x@a.test"))
    b = wait_dump(setup.sink, to("y@b.test"))
    c = wait_dump(setup.sink, to("z@c.test"))
    # a.test: the hook's source and HELO, through the hook's proxy (PROXY v1).
    assert (a.client_addr, a.helo) == ("127.0.0.21", "a21.hook.test")
    # b.test: the hook's source, directly although the transport names a proxy.
    assert (b.client_addr, b.helo) == ("127.0.0.22", "b22.hook.test")
    # c.test: the hook did not decide, so the transport's own address and proxy apply.
    assert (c.client_addr, c.helo) == ("127.0.0.23", "t23.transport.test")
    proxy = f"127.0.0.1:{setup.proxy}"
    assert field_of(attempt_line(setup.fm, qid, "x@a.test"), "proxy") == proxy
    assert field_of(attempt_line(setup.fm, qid, "y@b.test"), "proxy") == "direct"
    assert field_of(attempt_line(setup.fm, qid, "z@c.test"), "proxy") == proxy
    for rcpt in ("x@a.test", "y@b.test", "z@c.test"):
        assert field_of(attempt_line(setup.fm, qid, rcpt), "result") == "delivered"


# --------------------------------------------------------------------------- failures


def test_a_raising_hook_leaves_the_message_queued_with_a_traceback(setup: Setup) -> None:
    qid = setup.inject("r@raise.test")
    (line,) = setup.fm.wait_log(rf"event=hook\.error .*qid={qid}")
    assert f"RuntimeError: hook exploded for {qid}" in field_of(line, "error")
    tb = field_of(line, "traceback").replace("\\n", "\n")
    assert "Traceback (most recent call last)" in tb
    assert "in explode" in tb and "hook.py" in tb
    attempt = attempt_line(setup.fm, qid, "r@raise.test")
    assert field_of(attempt, "result") == "deferred"
    assert spool_get(setup.spool_path(), qid) is not None  # still queued
    assert not any(to("r@raise.test")(d) for d in setup.sink.dumps())


def test_a_hanging_hook_times_out_and_the_message_stays(setup: Setup) -> None:
    started = time.monotonic()
    qid = setup.inject("h@hang.test")
    (line,) = setup.fm.wait_log(rf"event=hook\.error .*qid={qid}", timeout=10)
    assert "exceeded its time limit of 1s" in field_of(line, "error")
    assert "time.sleep" in field_of(line, "traceback") or "sleep" in field_of(line, "traceback")
    assert field_of(attempt_line(setup.fm, qid, "h@hang.test"), "result") == "deferred"
    assert spool_get(setup.spool_path(), qid) is not None
    # Meanwhile other mail still flows (the hung hook holds a thread, not the event loop).
    other = setup.inject("meanwhile@b.test")
    wait_dump(setup.sink, to("meanwhile@b.test"))
    assert field_of(attempt_line(setup.fm, other, "meanwhile@b.test"), "result") == "delivered"
    assert time.monotonic() - started < 20


def test_invalid_try_options_are_a_hook_error(setup: Setup) -> None:
    qid = setup.inject("o@badopt.test")
    (line,) = setup.fm.wait_log(rf"event=hook\.error .*qid={qid}")
    assert "port: expected a port number 1-65535, got 70000" in field_of(line, "error")
    assert spool_get(setup.spool_path(), qid) is not None


# --------------------------------------------------------------------------- bounce, delete


def test_bounce_sends_a_dsn_to_the_sender(setup: Setup) -> None:
    qid = setup.inject("nope@bounce.test")
    dsn = wait_dump(setup.dsn_sink, lambda d: b"nope@bounce.test" in d.raw)
    assert dsn.mail_from == "<>"
    assert dsn.rcpts == [f"<{SENDER}>"]
    assert b"bounce.test is refused by policy" in dsn.raw
    assert dsn.message.get_content_type() == "multipart/report"
    line = attempt_line(setup.fm, qid, "nope@bounce.test")
    assert field_of(line, "hook") == "bounce" and field_of(line, "result") == "failed"
    _wait_gone(setup, qid)
    assert not any(to("nope@bounce.test")(d) for d in setup.sink.dumps())


def test_delete_drops_the_message_without_a_dsn(setup: Setup) -> None:
    qid = setup.inject("gone@delete.test")
    line = attempt_line(setup.fm, qid, "gone@delete.test")
    assert field_of(line, "hook") == "delete" and field_of(line, "result") == "deleted"
    assert field_of(line, "reason") == "black hole"
    _wait_gone(setup, qid)
    assert not [ln for ln in setup.fm.logs() if "event=dsn.queued" in ln and f"qid={qid}" in ln]
    assert not any(b"gone@delete.test" in d.raw for d in setup.dsn_sink.dumps())
    assert not any(to("gone@delete.test")(d) for d in setup.sink.dumps())


def _wait_gone(setup: Setup, qid: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while spool_get(setup.spool_path(), qid) is not None:
        assert time.monotonic() < deadline, f"{qid} is still in the spool"
        time.sleep(0.05)


# --------------------------------------------------------------------------- reload


def test_reload_picks_up_a_changed_hook_file(setup: Setup) -> None:
    before = len([ln for ln in setup.fm.logs() if "event=hook.loaded" in ln])
    setup.write_hook(a_ip="127.0.0.24", a_helo="a24.reloaded.test")
    # A new running config object is what makes the engine load the hook again.
    setup.fm.running_path.write_text(setup.fm.running_path.read_text() + "\n# reloaded\n")
    setup.fm.reload()
    setup.fm.wait_log(r"event=hook\.loaded", count=before + 1)
    setup.inject("after-reload@a.test")
    dump = wait_dump(setup.sink, to("after-reload@a.test"))
    assert (dump.client_addr, dump.helo) == ("127.0.0.24", "a24.reloaded.test")
    setup.write_hook()  # back to the original for any later test


def test_stop_is_not_held_up_by_a_hung_hook_thread(setup: Setup) -> None:
    qid = setup.inject("h2@hang.test")
    setup.fm.wait_log(rf"event=hook\.error .*qid={qid} .*exceeded")
    # A sync hook is still sleeping in its thread; a graceful stop must not wait for it.
    started = time.monotonic()
    assert setup.fm.stop(timeout=15) == 0
    assert time.monotonic() - started < 12
