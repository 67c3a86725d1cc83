"""Problems found by trying ferrymail as a new user would, each pinned by a test that failed
before its fix (QA pass over issues 7, 11 and 13)."""

from __future__ import annotations

import smtplib
import socket
import time

from ferrymail.config import parse_running
from ferrymail.delivery.engine import DeliveryEngine
from ferrymail.smtp.protocol import ReplyParser
from ferrymail.spool import SqliteSpool
from tests.integration.conftest import listener, running_yaml, server, startup_yaml
from tests.integration.outbound_harness import MESSAGE, LogCapture, run
from tests.integration.test_adversity import envelope
from tests.realpeers import free_port, smtp_sink


def test_a_revived_destination_delivers_its_backlog_at_once_not_a_parking_period_later(
        tmp_path):
    """The backlog of a dead destination comes due when its parking period ends; one job is
    the probe. The others used to be deferred for another whole ``dead_backoff`` while the
    probe ran, so a destination that answered the probe still sat on its mail for that long
    (up to ``dead_backoff_max``, 10 minutes by default). They wait for the probe's verdict
    instead: the probe succeeds, they leave within seconds."""
    port = free_port()
    backoff = 6.0
    cfg = parse_running(f"""
servers: [{{id: in, transport: t}}]
queues: {{destination: {{dead_after: 1, dead_backoff: {backoff}}}}}
transportgroups:
  - id: g
    connection: {{tls: {{mode: disabled}}}}
    retry: {{intervals: [{{interval: 1s}}]}}
    transports: [{{id: t, connection: {{server: 127.0.0.1, port: {port}}}}}]
""")
    took: list[float] = []
    failed: list[str] = []
    with LogCapture() as logs:
        async def main() -> None:
            spool = SqliteSpool(tmp_path / "spool", fsync=False)
            await spool.start()
            eng = DeliveryEngine(spool, lambda: cfg, hostname="mta.test", stop_grace=0.5)
            await eng.start()
            try:
                for i in range(5):
                    await spool.store(envelope(f"u{i}@d{i}.test"), MESSAGE)
                eng.wake()
                await logs.wait(r"destination\.state .*from=slow_start to=dead", timeout=10)
                with smtp_sink(port=port) as sink:
                    await logs.wait(r"destination\.state .*from=probing to=slow_start "
                                    r".*reason=\"probe succeeded\"", timeout=backoff + 10)
                    t0 = time.monotonic()
                    # Delivered as ferrymail says so, not smtp-sink's dump count: the sink
                    # opens a dump file when a transaction starts, and stopping it then cut
                    # the fifth message short (its retry was a third connect failure).
                    await logs.wait(r"event=delivery\.attempt .*result=delivered",
                                    timeout=backoff + 10, count=5)
                    took.append(time.monotonic() - t0)
                    failed.extend(logs.lines("delivery.connect_failed"))
                    assert len(sink.wait_dumps(5)) == 5
            finally:
                await eng.stop()
                await spool.close()

        run(main, timeout=60)
    assert took[0] < backoff / 2, (took, logs.lines("delivery.error"))
    # still one probe at a time: nothing connected while the destination was dead
    assert 1 <= len(failed) <= 2, failed


def test_the_listening_line_says_tls_off_when_no_certificate_is_configured(ferrymail_proc,
                                                                           tmp_path):
    """``smtp.listening`` said ``tls=starttls`` for a server without ``tls.cert``, whose EHLO
    offers no STARTTLS: an operator reading the log would believe the listener encrypts."""
    port = free_port()
    fm = ferrymail_proc(startup_yaml(tmp_path, [server("plain", [listener(port)])]),
                        running_yaml(["plain"]), wait=[("127.0.0.1", port)])
    line = fm.wait_log(r"event=smtp\.listening ")[0]
    assert " tls=off" in line, line
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("starttls")


def test_a_client_sending_only_noops_is_closed_after_the_junk_limit(ferrymail_proc, tmp_path):
    """NOOP after NOOP, each within the command deadline, used to hold a connection slot
    for ever (300 NOOPs: 300 answers, session still open). Past ``limits.junk_commands``
    each counts toward ``limits.errors``: 421 and close."""
    port = free_port()
    srv = server("plain", [listener(port)], limits={"junk_commands": 5, "errors": 3})
    fm = ferrymail_proc(startup_yaml(tmp_path, [srv]), running_yaml(["plain"]),
                        wait=[("127.0.0.1", port)])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"EHLO client.test\r\n" + b"NOOP\r\n" * 300)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    replies = ReplyParser().feed(got)
    assert [r.code for r in replies[-4:]] == [250, 250, 250, 421], replies[-4:]
    assert len(replies) == 1 + 1 + 5 + 3 + 1  # banner, EHLO, free NOOPs, 3 errors, 421
    fm.wait_log(r"event=smtp\.errors .* errors=3", timeout=5)
