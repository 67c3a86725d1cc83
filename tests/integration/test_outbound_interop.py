"""Outbound interop hardening (issue 7, items 19-23) against real peers: smtp-sink, a scripted
asyncio server, and the ``ferrymail send`` command."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from ferrymail.delivery import DeliveryError, Source, Timeouts
from ferrymail.delivery.errors import SMTPReplyError
from ferrymail.observe import log
from ferrymail.send import send_async
from ferrymail.smtp.client import SMTPClient, TLSMode
from tests.integration.conftest import ferrymail_command
from tests.integration.outbound_harness import LogCapture, engine
from tests.integration.outbound_harness import run as harness_run
from tests.integration.smtpscript import ScriptedSMTP
from tests.realpeers import smtp_sink
from tests.unit.test_outbound_wire import BARE, SMUGGLING

SRC = Source("127.0.0.5", "helo5.example")
FAST = Timeouts(connect=3, banner=3, command=3, data=5)


def run(coro_fn: Callable[[], Awaitable[None]]) -> str:
    """Run ``coro_fn`` on uvloop (bounded) and return the log lines it wrote."""
    buf = io.StringIO()

    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), 30)

    log.configure("info", buf)
    try:
        uvloop.run(bounded())
    finally:
        log.configure("info", None)
    return buf.getvalue()


def verbs(commands: list[str]) -> list[str]:
    return [c.split(" ")[0].upper() for c in commands]


# --------------------------------------------------------------------------- item 21: QUIT


def test_quit_after_a_refused_rset():
    async def main() -> None:
        async with ScriptedSMTP(rcpt=lambda a: "550 5.1.1 no such user",
                                rset="500 5.5.1 RSET? never heard of it") as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            r = await c.send("a@example.com", ["b@example.net"], b"hi\r\n")
            assert r.state == "RCPT" and r.reply.code == 550
            assert not c.usable
            for _ in range(100):  # the server records QUIT when it reads it
                if srv.sessions[0].commands[-1:] == ["QUIT"]:
                    break
                await asyncio.sleep(0.02)
            assert verbs(srv.sessions[0].commands) == ["EHLO", "MAIL", "RCPT", "DATA", "RSET",
                                                       "QUIT"]

    run(main)


def test_no_quit_when_the_session_is_out_of_step():
    async def main() -> None:
        # A malformed reply to RSET: the replies no longer match, so the client only closes.
        async with ScriptedSMTP(rcpt=lambda a: "550 5.1.1 no", rset="") as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            r = await c.send("a@example.com", ["b@example.net"], b"hi\r\n")
            assert r.reply.code == 550 and not c.usable
            await asyncio.sleep(0.2)
            assert verbs(srv.sessions[0].commands)[-1] == "RSET"

    run(main)


# --------------------------------------------------------------------------- item 20: codes


def test_mixed_code_refusal_is_permanent_and_logged():
    async def main() -> None:
        async with ScriptedSMTP(rcpt=lambda a: "250-2.1.5 fine\n550 5.1.1 no such user") as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            r = await c.send("a@example.com", ["b@example.net"], b"hi\r\n")
            assert r.state == "RCPT" and r.reply_for("b@example.net").code == 550
            assert r.reply.enhanced == (5, 1, 1) and r.reply.permanent
            await c.quit()

    logs = run(main)
    assert re.search(r"event=smtp.reply_inconsistent .*code=550 other_codes=250", logs), logs


def test_mixed_code_banner_is_a_permanent_refusal():
    async def main() -> None:
        async with ScriptedSMTP(banner="220-mx.example ESMTP\n521 5.7.1 go away") as srv:
            with pytest.raises(SMTPReplyError) as ei:
                await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            assert ei.value.reply.code == 521 and not ei.value.temporary

    logs = run(main)
    assert "other_codes=220" in logs


# --------------------------------------------------------------------------- item 22: wire


def _smuggling_message(seq: bytes) -> bytes:
    return (b"Subject: t\r\n\r\nhello" + seq
            + b"MAIL FROM:<x@example.com>\r\nRCPT TO:<y@example.com>\r\n")


def test_client_writer_against_every_smuggling_sequence():
    async def main() -> None:
        async with ScriptedSMTP() as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            for seq in SMUGGLING:
                r = await c.send("a@example.com", ["b@example.net"], _smuggling_message(seq))
                assert r.state == "EOD" and r.reply.code == 250
            await c.quit()
            s = srv.sessions[0]
            assert verbs(s.commands).count("MAIL") == len(SMUGGLING)  # nothing smuggled
            assert len(s.messages) == len(SMUGGLING)
            for m in s.messages:
                assert not BARE.search(m.data), m.data
                assert b"\r\nMAIL FROM:<x@example.com>\r\n" in m.data

    run(main)


def test_smtp_sink_sees_one_message_per_transaction():
    with smtp_sink() as sink:
        async def main() -> None:
            c = await SMTPClient.connect(SRC, "127.0.0.1", sink.port, timeouts=FAST)
            for seq in SMUGGLING:
                r = await c.send("a@example.com", ["b@example.net"], _smuggling_message(seq))
                assert r.reply.code == 250
            await c.quit()

        run(main)
        dumps = sink.wait_dumps(len(SMUGGLING))
        assert len(dumps) == len(SMUGGLING)
        assert all(d.rcpts == ["<b@example.net>"] for d in dumps)


@pytest.mark.parametrize("content", [
    b"hello\r.\rMAIL FROM:<x@example.com>\r\n.\r\n",
    b"Subject: t\rBcc: x@example.com",
])
def test_send_file_puts_no_bare_line_ending_on_the_wire(tmp_path: Path, content: bytes):
    path = tmp_path / "msg.eml"
    path.write_bytes(content)

    async def main() -> None:
        async with ScriptedSMTP() as srv:
            proc = await asyncio.create_subprocess_exec(
                *ferrymail_command("send", "--from", "a@example.com", "--to", "b@example.net",
                                   "--server", "127.0.0.1", "--port", str(srv.port),
                                   "--tls", "disabled", "--timeout", "5", "--file", str(path)),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode == 0, (out, err)
            s = srv.sessions[0]
            assert verbs(s.commands) == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
            (m,) = s.messages
            assert not BARE.search(m.data), m.data
            assert m.data == content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(
                b"\n", b"\r\n").rstrip(b"\r\n") + b"\r\n"

    run(main)



# --------------------------------------------------------------------------- item 19: TLS


def _broken_tls() -> ssl.SSLContext:
    """A server context with no certificate: STARTTLS is offered, every handshake fails."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


def test_optional_tls_falls_back_to_plaintext_on_the_same_attempt():
    async def main() -> None:
        async with ScriptedSMTP(tls_context=_broken_tls()) as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, tls=TLSMode.OPTIONAL,
                                         timeouts=FAST)
            assert c.tls_fallback and not c.tls_started
            r = await c.send("a@example.com", ["b@example.net"], b"hi\r\n")
            assert r.reply.code == 250
            await c.quit()
            first, second = srv.sessions
            assert verbs(first.commands) == ["EHLO", "STARTTLS"]
            assert verbs(second.commands) == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
            assert not second.messages[0].tls

    logs = run(main)
    assert re.search(r"event=smtp.tls_fallback .*then=\"plaintext on a new connection\"", logs)


@pytest.mark.parametrize("mode", [TLSMode.OPTIONAL_VERIFY, TLSMode.REQUIRE,
                                  TLSMode.REQUIRE_VERIFY])
def test_verify_and_require_modes_never_fall_back(mode):
    async def main() -> None:
        async with ScriptedSMTP(tls_context=_broken_tls()) as srv:
            with pytest.raises(DeliveryError) as ei:
                await SMTPClient.connect(SRC, "127.0.0.1", srv.port, tls=mode, timeouts=FAST)
            assert ei.value.kind == "tls" and "handshake" in ei.value.message
            assert len(srv.sessions) == 1

    logs = run(main)
    assert "tls_fallback" not in logs


def test_send_with_optional_tls_delivers_in_plaintext():
    async def main() -> None:
        async with ScriptedSMTP(tls_context=_broken_tls()) as srv:
            res = await send_async(b"Subject: t\r\n\r\nhi\r\n", "a@example.com",
                                   ["b@example.net"], {"server": "127.0.0.1", "port": srv.port,
                                                       "tls": "optional", "timeout": 5},
                                   log=lambda line: None)
            assert res["result"]["code"] == 250 and res["connection"]["tls"]["started"] is False
            assert len(srv.sessions) == 2

    run(main)


# --------------------------------------------------------------------------- item 23: 8-bit

EIGHT_BIT = ("From: a@example.com\r\nTo: b@example.net\r\nSubject: 8-bit\r\nMIME-Version: 1.0\r\n"
             "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
             "\r\nGr\u00fc\u00dfe aus K\u00f6ln\r\n.dot line\r\n").encode()
SIGNED = (b"From: a@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/signed; "
          b"protocol=\"application/pgp-signature\"; boundary=b\r\n\r\n--b\r\n"
          b"Content-Type: text/plain; charset=utf-8\r\n\r\ncaf\xc3\xa9\r\n--b\r\n"
          b"Content-Type: application/pgp-signature\r\n\r\nsig\r\n--b--\r\n")


def test_8bit_to_a_sink_without_8bitmime_arrives_as_quoted_printable():
    with smtp_sink(extra=["-8"]) as sink:
        async def main() -> None:
            c = await SMTPClient.connect(SRC, "127.0.0.1", sink.port, timeouts=FAST)
            assert "8BITMIME" not in c.extensions
            r = await c.send("a@example.com", ["b@example.net"], EIGHT_BIT)
            assert r.reply.code == 250
            await c.quit()

        logs = run(main)
        (dump,) = sink.wait_dumps(1)
    assert "BODY=8BITMIME" not in dump.mail_from
    assert dump.raw.isascii()
    msg = email.message_from_bytes(dump.raw, policy=email.policy.default)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    # (smtp-sink's dump ends with one more empty line)
    text = msg.get_content().replace("\r\n", "\n").rstrip("\n")
    assert text == "Gr\u00fc\u00dfe aus K\u00f6ln\n.dot line"
    assert "event=smtp.8bit_converted" in logs


def test_signed_8bit_message_bounces_with_a_clear_reason(tmp_path: Path):
    with smtp_sink(extra=["-8"]) as sink:
        running = f"""
servers: [{{id: in, transport: t}}]
transportgroups:
  - id: g
    transports:
      - id: t
        connection: {{server: 127.0.0.1, port: {sink.port}, tls: {{mode: disabled}}}}
"""

        async def main() -> None:
            async with engine(tmp_path, running) as h:
                await h.submit(("rcpt@dest.test",), data=SIGNED)
                await h.drained()

        with LogCapture() as logs:
            harness_run(main)
        (dsn,) = sink.wait_dumps(1)  # only the bounce: the signed message was never sent
    (line,) = logs.lines("delivery.error")
    assert "result=failed" in line and "8BITMIME" in line and "multipart/signed" in line
    assert dsn.mail_from == "<>" and dsn.rcpts == ["<sender@origin.test>"]
    assert b"5.6.3" in dsn.raw and b"signature" in dsn.raw


def test_engine_delivers_in_plaintext_within_the_same_attempt(tmp_path: Path):
    """Before: every attempt retried TLS and the message bounced after the retry count."""
    with LogCapture() as logs:
        async def main() -> None:
            async with ScriptedSMTP(tls_context=_broken_tls()) as srv:
                running = f"""
servers: [{{id: in, transport: t}}]
transportgroups:
  - id: g
    transports:
      - id: t
        connection: {{server: 127.0.0.1, port: {srv.port}, tls: {{mode: optional}}}}
"""
                async with engine(tmp_path, running) as h:
                    await h.submit(("rcpt@dest.test",))
                    await h.drained()
                assert [len(s.messages) for s in srv.sessions] == [0, 1]

        harness_run(main)
    (line,) = logs.lines("delivery.attempt")
    assert "result=delivered" in line and "attempt=1" in line and "tls_fallback=true" in line
    assert "tls=false" in line
    assert len(logs.lines("smtp.tls_fallback")) == 1


def test_engine_ends_with_quit_after_a_refusal_before_sending(tmp_path: Path):
    """A message the peer cannot take (non-ASCII address, no SMTPUTF8) is refused before any
    command; the session is still in step and ends with QUIT, not a reset."""
    async def main() -> None:
        async with ScriptedSMTP(extensions=("PIPELINING",)) as srv:
            running = f"""
servers: [{{id: in, transport: t}}]
transportgroups:
  - id: g
    transports:
      - id: t
        connection: {{server: 127.0.0.1, port: {srv.port}, tls: {{mode: disabled}}}}
"""
            async with engine(tmp_path, running) as h:
                await h.submit(("j\u00f6rg@dest.test",), sender="")
                await h.drained()
            for _ in range(100):
                if srv.sessions[0].commands[-1:] == ["QUIT"]:
                    break
                await asyncio.sleep(0.02)
            assert verbs(srv.sessions[0].commands) == ["EHLO", "QUIT"]

    harness_run(main)
