"""Retries, bounces (RFC 3464 DSNs) and the faults on the way out, against real peers.

4xx then 2xx (scripted MX), 5xx at end of data (``smtp-sink -f .``), expiry with a delay
notice first, the null sender, a proxy that is down, a proxy that cannot bind the source IP,
a silent MX, a null MX from a real DNS server, and pre-delivery hook decisions.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from email.message import Message
from pathlib import Path

import pytest

from tests.integration.outbound_harness import LogCapture, dns_server, engine, field_of, run
from tests.integration.smtpscript import ScriptedSMTP
from tests.realpeers import (
    SinkDump,
    free_port,
    haproxy,
    require_transparent_proxy,
    seed_outbound_haproxy,
    smtp_sink,
)


def config(mx_port: int, dsn_port: int, *, retry: str = "{count: 3, intervals: [1]}",
           connection: str = "", addresses: str = "[]", sourceip: str = "",
           extra: str = "") -> str:
    """Transport ``t`` to 127.0.0.1:mx_port; DSNs go out on transport ``bounces``."""
    return f"""
servers: [{{id: in, transport: t}}]
addresses: {addresses}
transportgroups:
  - id: g
    retry: {retry}
    dsn: {{transport: bounces}}
    transports:
      - id: t
        connection:
          server: 127.0.0.1
          port: {mx_port}
          timeout: {{connect: 2, banner: 2, command: 2, data: 2}}
          {sourceip}
          {connection}
  - id: dsn
    transports:
      - id: bounces
        connection: {{server: 127.0.0.1, port: {dsn_port}}}
{extra}
"""


def parse_dsn(dump: SinkDump) -> tuple[Message, list[Message]]:
    msg = email.message_from_bytes(dump.raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", dump.raw[:2000]
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    return msg, parts[1].get_payload()


def test_4xx_then_2xx_is_retried_and_delivered(tmp_path):
    calls: list[str] = []

    def rcpt(addr: str) -> str:
        calls.append(addr)
        return "451 4.3.0 try again later" if len(calls) == 1 else "250 2.1.5 ok"

    with LogCapture() as logs:
        async def main() -> None:
            async with ScriptedSMTP(rcpt=rcpt) as mx, engine(
                    tmp_path, config(mx.port, free_port())) as h:
                qid = await h.submit()
                await logs.wait("result=deferred")
                (msg,) = await h.spool.list()
                (rec,) = msg.recipients
                assert msg.queue_id == qid and rec.state.value == "deferred"
                assert rec.attempts == 1 and "451 4.3.0" in rec.last_reply
                await h.drained(timeout=10)
                assert len(mx.sessions[-1].messages) == 1

        run(main)
    first, second = logs.lines("delivery.attempt")
    assert field_of(first, "reply_code") == "451" and field_of(first, "enhanced") == "4.3.0"
    assert field_of(first, "result") == "deferred" and field_of(first, "next_attempt")
    assert field_of(second, "result") == "delivered" and field_of(second, "attempt") == "2"
    assert not logs.lines("dsn.queued")


def test_5xx_bounces_with_a_dsn_to_the_sender(tmp_path):
    with smtp_sink(extra=["-f", "."]) as mx, smtp_sink() as dsn_sink, LogCapture() as logs:
        async def main() -> None:
            async with engine(tmp_path, config(mx.port, dsn_sink.port)) as h:
                qid = await h.submit(("gone@dest.test",))
                await logs.wait("event=dsn.queued")
                await h.drained()
                assert qid

        run(main)
        (dump,) = dsn_sink.wait_dumps(1)
    assert dump.mail_from in ("<>", "")
    assert dump.rcpts == ["<sender@origin.test>"]
    msg, (per_msg, block) = parse_dsn(dump)
    assert msg["From"].endswith("<MAILER-DAEMON@mta.ferrymail.test>")
    assert per_msg["Reporting-MTA"] == "dns; mta.ferrymail.test"
    assert block["Final-Recipient"] == "rfc822; gone@dest.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.3.0"
    assert block["Diagnostic-Code"].startswith("smtp; 500 5.3.0")
    assert block["Remote-MTA"] == "dns; 127.0.0.1"
    assert "Subject: outbound test" in msg.get_payload()[2].get_payload()
    attempt, dsn_attempt = logs.lines("delivery.attempt")  # the bounce, then the DSN
    assert field_of(attempt, "rcpts") == "gone@dest.test"
    assert field_of(attempt, "result") == "failed" and field_of(attempt, "enhanced") == "5.3.0"
    assert field_of(dsn_attempt, "rcpts") == "sender@origin.test"
    assert field_of(dsn_attempt, "transport") == "bounces"


def test_expiry_after_retry_count_sends_delay_notice_then_bounce(tmp_path):
    with smtp_sink() as dsn_sink, LogCapture() as logs:
        async def main() -> None:
            async with ScriptedSMTP(rcpt=lambda a: "452 4.2.2 mailbox full") as mx, engine(
                    tmp_path, config(mx.port, dsn_sink.port,
                                     retry="{count: 1, intervals: "
                                           "[{interval: 0.5, notify: true}]}")) as h:
                await h.submit()
                await h.drained(timeout=10)

        run(main)
        dumps = dsn_sink.wait_dumps(2)
    actions = {}
    for d in dumps:
        msg, (_, block) = parse_dsn(d)
        actions[block["Action"]] = (msg, block)
    assert set(actions) == {"delayed", "failed"}
    delayed = actions["delayed"][1]
    assert delayed["Status"] == "4.2.2" and delayed["Will-Retry-Until"]
    assert actions["delayed"][0]["Subject"].startswith("Delayed Mail")
    failed = actions["failed"][1]
    assert failed["Status"] == "5.4.7"
    assert failed["Diagnostic-Code"] == "smtp; 452 4.2.2 mailbox full"
    results = [field_of(ln, "result") for ln in logs.lines("delivery.attempt")
               if field_of(ln, "rcpts") == "rcpt@dest.test"]
    assert results == ["deferred", "failed"]


def test_null_sender_gets_no_dsn(tmp_path):
    with smtp_sink(extra=["-f", "."]) as mx, smtp_sink() as dsn_sink, LogCapture() as logs:
        async def main() -> None:
            async with engine(tmp_path, config(mx.port, dsn_sink.port)) as h:
                await h.submit(sender="")
                await h.drained()

        run(main)
        (line,) = logs.lines("dsn.suppressed")
        assert field_of(line, "reason") == "null sender"
        assert not any(dsn_sink.dump_dir.iterdir())


def test_proxy_down_defers_then_delivers_via_the_other_source(tmp_path):
    dead = free_port()
    addresses = (f"[{{id: p, address: 127.0.0.41, proxyprotocol: {{server: 127.0.0.1, "
                 f"port: {dead}}}}}, {{id: d, address: 127.0.0.42, hostname: d.out.test}}]")
    with smtp_sink() as mx, LogCapture() as logs:
        async def main() -> None:
            # only the proxied source: deferred, the log names the proxy
            async with engine(tmp_path, config(mx.port, free_port(), addresses=addresses,
                                               sourceip="sourceip: {ipv4: [p]}")) as h:
                await h.submit()
                await logs.wait("result=deferred")
                (err,) = logs.lines("delivery.error")
                assert field_of(err, "kind") == "proxy"
                assert f"127.0.0.1:{dead}" in field_of(err, "error")
                assert field_of(err, "proxy") == f"127.0.0.1:{dead}"
                assert field_of(err, "temporary") == "true"
                assert (await h.spool.count()) == 1
                # a second, direct source appears (reload): the retry goes out through it
                h.set_config(config(mx.port, free_port(), addresses=addresses,
                                    sourceip="sourceip: {ipv4: [p, d]}"))
                await h.drained(timeout=10)

        run(main)
        (dump,) = mx.wait_dumps(1)
    assert dump.client_addr == "127.0.0.42" and dump.helo == "d.out.test"


def test_proxy_that_cannot_bind_the_source_is_a_proxy_bind_failure(tmp_path):
    require_transparent_proxy()
    port = free_port()
    addresses = (f"[{{id: far, address: 192.0.2.77, proxyprotocol: {{server: 127.0.0.1, "
                 f"port: {port}}}}}]")
    cfg = seed_outbound_haproxy("127.0.0.1", port, retries=0, connect_timeout="1s")
    with haproxy(cfg, [("127.0.0.1", port)]), smtp_sink() as mx, LogCapture() as logs:
        async def main() -> None:
            async with engine(tmp_path, config(mx.port, free_port(), addresses=addresses,
                                               sourceip="sourceip: {ipv4: [far]}")) as h:
                await h.submit()
                await logs.wait("result=deferred", timeout=15)
                assert (await h.spool.count()) == 1

        run(main)
        assert not any(mx.dump_dir.iterdir())
    err = logs.lines("delivery.error")[0]
    assert field_of(err, "kind") == "proxy" and field_of(err, "result") == "deferred"
    text = field_of(err, "error")
    assert "192.0.2.77" in text and f"127.0.0.1:{port}" in text
    assert "could not bind the source IP" in text


def test_silent_mx_times_out_and_is_deferred(tmp_path):
    with LogCapture() as logs:
        async def main() -> None:
            async with ScriptedSMTP(banner=None) as mx, engine(
                    tmp_path, config(mx.port, free_port()).replace("banner: 2", "banner: 0.5")
            ) as h:
                await h.submit()
                await logs.wait("result=deferred")

        run(main)
    (err,) = logs.lines("delivery.error")
    assert field_of(err, "kind") == "network"
    assert "no banner" in field_of(err, "error") and "0.5s" in field_of(err, "error")


def test_null_mx_bounces_with_a_dsn(tmp_path):
    dns_port = free_port()
    with smtp_sink() as dsn_sink, LogCapture() as logs:
        async def main() -> None:
            zone = {("nullmx.test.", "MX"): ["0 ."]}
            async with dns_server(zone, dns_port) as dns_srv, engine(tmp_path, f"""
servers: [{{id: in, transport: bymx}}]
resolver: {{nameservers: [127.0.0.1], port: {dns_port}, timeout: 2}}
transportgroups:
  - id: g
    dsn: {{transport: bounces}}
    transports:
      - id: bymx
  - id: dsn
    transports:
      - id: bounces
        connection: {{server: 127.0.0.1, port: {dsn_sink.port}}}
""") as h:
                await h.submit(("user@nullmx.test",))
                await h.drained()
                assert ("nullmx.test.", "MX") in dns_srv.queries

        run(main)
        (dump,) = dsn_sink.wait_dumps(1)
    _, (_, block) = parse_dsn(dump)
    assert block["Final-Recipient"] == "rfc822; user@nullmx.test"
    assert block["Action"] == "failed" and block["Status"] == "5.1.10"
    assert "null MX" in " ".join(block["Diagnostic-Code"].split())
    (err,) = logs.lines("delivery.error")
    assert field_of(err, "kind") == "dns" and field_of(err, "dns") == "nullmx"
    assert field_of(err, "result") == "failed"


def test_unknown_transport_after_reload_defers_with_config_error(tmp_path):
    with LogCapture() as logs:
        async def main() -> None:
            async with engine(tmp_path, config(free_port(), free_port())) as h:
                await h.submit(transport="vanished")
                await logs.wait("result=deferred")
                assert (await h.spool.count()) == 1

        run(main)
    (err,) = logs.lines("delivery.error")
    assert field_of(err, "kind") == "config" and "vanished" in field_of(err, "error")


# -- the pre-delivery hook, engine side --------------------------------------------------------

HOOK = '''
def predelivery(ctx, action):
    rcpt = ctx.recipients[0]
    if rcpt.startswith("bounce"):
        action.bounce(reason="not today")
    elif rcpt.startswith("delete"):
        action.delete(reason="spam")
    elif rcpt.startswith("queue"):
        action.queue(delay=0.3, reason="warming up") if ctx.retry == 0 else action.try_()
    elif rcpt.startswith("raise"):
        raise RuntimeError("hook bug")
    elif rcpt.startswith("route"):
        action.try_(sourceip=[{"address": "127.0.0.51", "helo": "hooked.out.test"}],
                    proxyprotocol=False)
'''


@pytest.fixture
def hook_file(tmp_path: Path) -> Path:
    path = tmp_path / "hook.py"
    path.write_text(HOOK)
    return path


def test_hook_decisions(tmp_path, hook_file):
    with smtp_sink() as mx, smtp_sink() as dsn_sink, LogCapture() as logs:
        async def main() -> None:
            extra = f"scripting: {{hooks: {{predelivery: '{hook_file}', timeout: 2}}}}"
            async with engine(tmp_path, config(mx.port, dsn_sink.port, extra=extra)) as h:
                await h.submit(("bounce@dest.test",))
                await h.submit(("delete@dest.test",))
                await h.submit(("queue@dest.test",))
                await h.submit(("route@dest.test",))
                await h.submit(("raise@dest.test",))
                await logs.wait("event=hook.error")
                await logs.wait("rcpts=queue@dest.test .*result=delivered")
                await asyncio.sleep(0.2)
                left = await h.spool.list()
                assert [m.recipients[0].address for m in left] == ["raise@dest.test"]
                assert left[0].recipients[0].state.value == "deferred"

        run(main)
        delivered = {d.rcpts[0]: d for d in mx.wait_dumps(2)}
        (dsn,) = dsn_sink.wait_dumps(1)
    assert set(delivered) == {"<queue@dest.test>", "<route@dest.test>"}
    routed = delivered["<route@dest.test>"]
    assert routed.client_addr == "127.0.0.51" and routed.helo == "hooked.out.test"
    _, (_, block) = parse_dsn(dsn)
    assert block["Final-Recipient"] == "rfc822; bounce@dest.test"
    assert "not today" in block["Diagnostic-Code"]
    (err,) = logs.lines("hook.error")
    assert "RuntimeError: hook bug" in field_of(err, "error")
    assert "Traceback" in field_of(err, "traceback")
    by_rcpt = {field_of(ln, "rcpts"): ln for ln in logs.lines("delivery.attempt")
               if "queue@" not in ln}
    assert field_of(by_rcpt["delete@dest.test"], "result") == "deleted"
    assert field_of(by_rcpt["bounce@dest.test"], "result") == "failed"
