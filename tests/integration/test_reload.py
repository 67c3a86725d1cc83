"""Reload end to end: ``ferrymail run`` routes to sink A, a reload routes to sink B without a
restart, and a broken file keeps B and logs the error with file and line. No mail is lost on
the way.
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

from tests.integration.conftest import (
    listener,
    server,
    spool_count,
    spool_messages,
    startup_yaml,
)
from tests.integration.outbound_harness import field_of
from tests.realpeers import free_port, smtp_sink

HOST = "127.0.0.1"


def running(sink_port: int, *, source: str) -> str:
    return f"""
servers:
  - {{id: in, transport: out, domains: [example.com]}}
addresses:
  - {{id: src, address: {source}, hostname: out.reload.test}}
transportgroups:
  - id: default
    retry: {{count: 5, intervals: [1]}}
    transports:
      - id: out
        connection:
          server: 127.0.0.1
          port: {sink_port}
          sourceip: {{ipv4: [src]}}
          reuse: {{idle: 30}}
"""


def send(port: int, rcpt: str) -> None:
    with smtplib.SMTP(HOST, port, timeout=10) as c:
        c.sendmail("sender@origin.test", [rcpt], f"Subject: {rcpt}\r\n\r\nreload test\r\n")


def test_reload_reroutes_and_broken_file_keeps_last_good(ferrymail_proc, tmp_path: Path):
    port = free_port()
    with smtp_sink() as sink_a, smtp_sink() as sink_b:
        startup = startup_yaml(tmp_path, [server("in", [listener(port)])])
        fm = ferrymail_proc(startup, running(sink_a.port, source="127.0.0.61"),
                            wait=[(HOST, port)])
        send(port, "first@example.com")
        (a1,) = sink_a.wait_dumps(1)
        assert a1.client_addr == "127.0.0.61" and a1.rcpts == ["<first@example.com>"]

        assert fm.running_path is not None
        fm.running_path.write_text(running(sink_b.port, source="127.0.0.62"))
        fm.reload()
        fm.wait_log("event=config.reloaded")
        send(port, "second@example.com")
        (b1,) = sink_b.wait_dumps(1)
        assert b1.client_addr == "127.0.0.62" and b1.rcpts == ["<second@example.com>"]

        # broken: an unknown transport on line 3 -> logged with file and line, B stays
        fm.running_path.write_text(
            "servers:\n  - id: in\n    transport: nowhere\ntransportgroups:\n  - id: g\n")
        fm.reload()
        err = fm.wait_log("event=config.reload_failed")[0]
        assert field_of(err, "file") == str(fm.running_path)
        assert field_of(err, "line") == "3" and "nowhere" in err
        send(port, "third@example.com")
        sink_b.wait_dumps(2)
        deadline = time.monotonic() + 10
        while spool_count(tmp_path / "spool") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spool_count(tmp_path / "spool") == 0
        assert fm.stop() == 0
        assert len(sink_a.dumps()) == 1
        assert sorted(d.rcpts[0] for d in sink_b.dumps()) == [
            "<second@example.com>", "<third@example.com>"]
    attempts = [ln for ln in fm.logs() if "event=delivery.attempt" in ln]
    assert [field_of(ln, "source_ip") for ln in attempts] == [
        "127.0.0.61", "127.0.0.62", "127.0.0.62"]
    assert all(field_of(ln, "result") == "delivered" for ln in attempts)
    assert not [ln for ln in fm.problems() if "config.reload_failed" not in ln]


def test_hold_keeps_mail_until_a_reload_lifts_it(ferrymail_proc, tmp_path: Path):
    port = free_port()
    with smtp_sink() as sink:
        held = running(sink.port, source="127.0.0.63") + "queues: {hold: true}\n"
        fm = ferrymail_proc(startup_yaml(tmp_path, [server("in", [listener(port)])]), held,
                            wait=[(HOST, port)])
        send(port, "held@example.com")
        time.sleep(1.0)
        assert sink.dumps() == [] and spool_count(tmp_path / "spool") == 1
        (msg,) = spool_messages(tmp_path / "spool")
        assert msg.recipients[0].attempts == 0  # held mail is not even tried
        # The Received: header names the queue id the message was stored under.
        assert f"id {msg.queue_id}" in _spool_read(tmp_path / "spool", msg.queue_id)

        assert fm.running_path is not None
        fm.running_path.write_text(running(sink.port, source="127.0.0.63"))
        fm.reload()
        (dump,) = sink.wait_dumps(1)
        assert dump.client_addr == "127.0.0.63" and dump.rcpts == ["<held@example.com>"]
        assert fm.stop() == 0


def _spool_read(path: Path, qid: str) -> str:
    import asyncio

    from ferrymail.spool import SqliteSpool

    async def read() -> bytes:
        async with SqliteSpool(path, readonly=True) as spool:
            return await spool.read(qid)

    return asyncio.run(read()).decode()
