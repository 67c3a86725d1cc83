"""The outbound SMTP client against real peers: smtp-sink and a scripted asyncio server."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from ferrymail.delivery import DeliveryError, Source, Timeouts
from ferrymail.delivery.errors import SMTPReplyError
from ferrymail.smtp.client import SMTPClient, TLSMode
from tests.integration.smtpscript import ScriptedSMTP, self_signed, server_context
from tests.realpeers import smtp_sink

SRC = Source("127.0.0.5", "helo5.example")
FAST = Timeouts(connect=3, banner=3, command=3, data=5)
MSG = b"Subject: test\r\nFrom: <a@example.com>\r\n\r\nline one\r\n.leading dot\r\n..two\r\n"


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), 20)

    uvloop.run(bounded())


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"), "mx.test")


# --------------------------------------------------------------------------- smtp-sink


def test_direct_sink_source_ip_helo_pipelining_several_messages():
    with smtp_sink() as sink:
        async def main() -> None:
            c = await SMTPClient.connect(SRC, "127.0.0.1", sink.port, timeouts=FAST)
            assert c.local_ip == "127.0.0.5" and c.remote_port == sink.port
            assert c.pipelining and c.banner is not None and c.banner.code == 220
            for i in range(3):
                r = await c.send("a@example.com", [f"b{i}@example.net", f"c{i}@example.net"],
                                 MSG)
                assert r.state == "EOD" and r.reply.code == 250
                assert r.accepted == (f"b{i}@example.net", f"c{i}@example.net")
                assert c.usable
            assert c.transactions == 3
            await c.quit()
            assert not c.usable

        run(main)
        dumps = sink.wait_dumps(3)
    assert len(dumps) == 3
    for d in dumps:
        assert d.client_addr == "127.0.0.5"
        assert d.helo == "helo5.example"
        assert d.mail_from == "<a@example.com>"
    assert sorted(r for d in dumps for r in d.rcpts)[:2] == ["<b0@example.net>",
                                                            "<b1@example.net>"]
    body = dumps[0].message.get_payload()
    assert ".leading dot" in body and "\n..two" in body


def test_large_message_through_flow_control():
    big = b"Subject: big\r\n\r\n" + b"".join(b"%07d " % i + b"z" * 70 + b"\r\n"
                                              for i in range(40000))  # ~3 MB
    with smtp_sink() as sink:
        async def main() -> None:
            c = await SMTPClient.connect(SRC, "127.0.0.1", sink.port, timeouts=FAST)
            r = await c.send("a@example.com", ["b@example.net"], big)
            assert r.state == "EOD" and r.reply.code == 250
            await c.quit()

        run(main)
        (d,) = sink.wait_dumps(1)
    assert b"0039999 " in d.raw and d.raw.count(b"z" * 70) == 40000


def test_sink_rejects_at_end_of_data_lockstep():
    # -f . rejects "." with 5xx and implies -p: no PIPELINING, so this is the lock-step path
    with smtp_sink(extra=["-f", "."]) as sink:
        async def main() -> None:
            c = await SMTPClient.connect(SRC, "127.0.0.1", sink.port, timeouts=FAST)
            assert not c.pipelining
            r = await c.send("a@example.com", ["b@example.net"], MSG)
            assert r.state == "EOD" and r.data is not None and r.data.code >= 500
            assert r.reply_for("b@example.net") == r.data and r.accepted == ()
            assert c.usable  # a rejected message does not spoil the connection
            r2 = await c.send("a@example.com", ["c@example.net"], MSG)
            assert r2.state == "EOD" and r2.reply.permanent
            await c.quit()

        run(main)


def test_sink_421_on_rcpt_in_a_pipeline():
    with smtp_sink(extra=["-Q", "RCPT"]) as sink:
        async def main() -> None:
            c = await SMTPClient.connect(SRC, "127.0.0.1", sink.port, timeouts=FAST)
            assert c.pipelining
            r = await c.send("a@example.com", ["b@example.net", "c@example.net"], MSG)
            assert r.state == "RCPT"
            assert [x.reply.code for x in r.recipients] == [421, 421]
            assert r.reply_for("c@example.net").transient
            assert not c.usable
            with pytest.raises(DeliveryError) as ei:
                await c.send("a@example.com", ["b@example.net"], MSG)
            assert ei.value.kind == "network" and ei.value.temporary
            await c.quit()

        run(main)


# --------------------------------------------------------------------------- scripted server


def _reject(*bad: str) -> Callable[[str], str]:
    return lambda a: "550 5.1.1 no such user" if a in bad else "250 2.1.5 ok"


def test_pipelined_single_write_and_per_recipient_results():
    async def main() -> None:
        # The server holds its MAIL/RCPT replies until DATA arrives: a client that waited
        # for each reply would stall into the 3 s command timeout.
        async with ScriptedSMTP(rcpt=_reject("bad@example.net"), hold_until_data=True) as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            t0 = time.monotonic()
            r = await c.send("a@example.com", ["ok1@example.net", "bad@example.net",
                                               "ok2@example.net"], MSG)
            assert time.monotonic() - t0 < 2
            assert r.state == "EOD"
            assert r.reply_for("bad@example.net").code == 550
            assert r.reply_for("bad@example.net").enhanced == (5, 1, 1)
            assert r.reply_for("ok1@example.net").code == 250
            assert r.reply_for("ok1@example.net").lines == ("queued as 42",)
            assert r.accepted == ("ok1@example.net", "ok2@example.net")
            with pytest.raises(KeyError):
                r.reply_for("other@example.net")
            await c.quit()
            (s,) = srv.sessions
            (m,) = s.messages
            assert m.data == MSG
            assert s.commands[1].startswith("MAIL FROM:<a@example.com> SIZE=")
            assert s.commands[-1] == "QUIT"

    run(main)


def test_all_recipients_rejected_then_rset_and_reuse():
    async def main() -> None:
        async with ScriptedSMTP(rcpt=_reject("x@example.net", "y@example.net")) as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            r = await c.send("a@example.com", ["x@example.net", "y@example.net"], MSG)
            assert r.state == "RCPT" and r.data is None
            assert r.reply.code == 550 and r.accepted == ()
            assert c.usable
            r2 = await c.send("a@example.com", ["z@example.net"], MSG)
            assert r2.state == "EOD" and r2.accepted == ("z@example.net",)
            await c.quit()
            cmds = [x.split(" ")[0] for x in srv.sessions[0].commands]
            assert cmds == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "RSET", "MAIL", "RCPT",
                            "DATA", "QUIT"]
            assert c.transactions == 2

    run(main)


def test_mail_rejected_decides_every_recipient_lockstep_and_pipelined():
    for exts in (("PIPELINING",), ()):
        async def main(exts: tuple[str, ...] = exts) -> None:
            async with ScriptedSMTP(extensions=exts,
                                    mail=lambda c: "452 4.3.1 try later") as srv:
                c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
                r = await c.send("a@example.com", ["b@example.net", "c@example.net"], MSG)
                assert r.state == "MAIL" and r.reply.code == 452
                assert r.reply_for("c@example.net").code == 452
                assert c.usable
                await c.quit()
                verbs = [x.split(" ")[0] for x in srv.sessions[0].commands]
                if exts:
                    assert verbs[1:5] == ["MAIL", "RCPT", "RCPT", "DATA"]
                else:
                    assert verbs[1:3] == ["MAIL", "RSET"]  # lock-step stops at MAIL

        run(main)


def test_lockstep_partial_rejection_and_data_refused():
    async def main() -> None:
        async with ScriptedSMTP(extensions=(), rcpt=_reject("bad@example.net"),
                                data="451 4.3.0 not now") as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            r = await c.send("a@example.com", ["bad@example.net", "ok@example.net"], MSG)
            assert r.state == "DATA" and r.reply.code == 451
            assert r.reply_for("bad@example.net").code == 550
            assert r.reply_for("ok@example.net").code == 451
            await c.quit()
            verbs = [x.split(" ")[0] for x in srv.sessions[0].commands]
            assert verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "RSET", "QUIT"]

    run(main)


def test_banner_refusal_is_an_smtp_result():
    for banner, temporary in (("554 5.7.1 go away", False), ("421 4.3.2 busy", True)):
        async def main(banner: str = banner, temporary: bool = temporary) -> None:
            async with ScriptedSMTP(banner=banner) as srv:
                with pytest.raises(SMTPReplyError) as ei:
                    await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
                e = ei.value
                assert e.state == "CONNECT" and e.reply.code == int(banner[:3])
                assert e.temporary is temporary and e.kind == "smtp"
                assert f"127.0.0.1:{srv.port}" in e.message

        run(main)


def test_silent_mx_banner_timeout_names_the_mx():
    async def main() -> None:
        async with ScriptedSMTP(banner=None) as srv:
            t0 = time.monotonic()
            with pytest.raises(DeliveryError) as ei:
                await SMTPClient.connect(SRC, "127.0.0.1", srv.port, mx_host="mx.silent.test",
                                         timeouts=Timeouts(connect=2, banner=1))
            assert time.monotonic() - t0 < 3
            e = ei.value
            assert e.kind == "network" and e.temporary
            assert "no banner" in e.message and "mx.silent.test" in e.message
            assert f"[127.0.0.1]:{srv.port}" in e.message and "127.0.0.5" in e.message

    run(main)


def test_ehlo_refused_falls_back_to_helo():
    async def main() -> None:
        async with ScriptedSMTP(ehlo="502 5.5.2 what?") as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            assert not c.esmtp and c.extensions == {}
            r = await c.send("a@example.com", ["b@example.net"], MSG)
            assert r.state == "EOD" and r.reply.code == 250
            await c.quit()
            s = srv.sessions[0]
            assert s.commands[:2] == ["EHLO helo5.example", "HELO helo5.example"]
            assert s.commands[2] == "MAIL FROM:<a@example.com>"  # no ESMTP parameters

    run(main)


def test_ehlo_refused_with_tls_required_is_a_tls_error():
    async def main() -> None:
        async with ScriptedSMTP(ehlo="502 5.5.2 what?") as srv:
            with pytest.raises(DeliveryError) as ei:
                await SMTPClient.connect(SRC, "127.0.0.1", srv.port, tls=TLSMode.REQUIRE,
                                         timeouts=FAST)
            assert ei.value.kind == "tls" and ei.value.temporary
            assert "HELO" not in [c.split(" ")[0] for c in srv.sessions[0].commands]

    run(main)


def test_size_8bit_smtputf8_refusals_send_nothing_and_keep_the_connection():
    async def main() -> None:
        async with ScriptedSMTP(extensions=("PIPELINING", "SIZE 100")) as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            cases = [
                (b"x" * 101 + b"\r\n", "a@example.com", "size limit"),
                (b"Content-Type: multipart/signed; boundary=b\r\n\r\n--b\r\n\r\n"
                 b"caf\xc3\xa9\r\n--b--\r\n", "a@example.com", "8BITMIME"),
                (b"hi\r\n", "j\u00f6rg@example.com", "SMTPUTF8"),
                (b"hi\r\n", "evil@example.com>\r\nRSET", "control character"),
            ]
            for data, sender, words in cases:
                with pytest.raises(DeliveryError) as ei:
                    await c.send(sender, ["b@example.net"], data)
                e = ei.value
                assert e.kind == "protocol" and not e.temporary and words in e.message
                assert c.usable
            r = await c.send("a@example.com", ["b@example.net"], b"hi\r\n")
            assert r.state == "EOD"
            await c.quit()
            cmds = srv.sessions[0].commands
            assert [x.split(" ")[0] for x in cmds] == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
            assert cmds[1] == "MAIL FROM:<a@example.com> SIZE=4"

    run(main)


def test_8bitmime_and_smtputf8_parameters_when_offered():
    async def main() -> None:
        exts = ("PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE")
        async with ScriptedSMTP(extensions=exts) as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            body = "Subject: caf\u00e9\r\n\r\nh\u00e9\r\n".encode()
            r = await c.send("j\u00f6rg@example.com", ["b@b\u00fccher.example"], body,
                             mail_params={"ENVID": "abc"})
            assert r.state == "EOD"
            await c.quit()
            s = srv.sessions[0]
            assert s.commands[1] == (f"MAIL FROM:<j\u00f6rg@example.com> SIZE={len(body)} "
                                     "BODY=8BITMIME SMTPUTF8 ENVID=abc")
            assert s.messages[0].data == body

    run(main)


def test_eof_mid_transaction_is_a_temporary_network_error():
    async def main() -> None:
        async with ScriptedSMTP(extensions=(), drop_on="RCPT") as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            with pytest.raises(DeliveryError) as ei:
                await c.send("a@example.com", ["b@example.net"], MSG)
            e = ei.value
            assert e.kind == "network" and e.temporary and "RCPT" in e.message
            assert f"127.0.0.1:{srv.port}" in e.message
            assert not c.usable
            await c.quit()  # never raises, even on a dead connection

    run(main)


def test_a_reply_no_command_may_get_is_a_protocol_error():
    async def main() -> None:
        async with ScriptedSMTP(data="250 2.0.0 sure") as srv:  # 250 instead of 354 to DATA
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            with pytest.raises(DeliveryError) as ei:
                await c.send("a@example.com", ["b@example.net"], MSG)
            e = ei.value
            assert e.kind == "protocol" and e.temporary and "unexpected reply to DATA" in e.message
            assert not c.usable
            await c.quit()

    run(main)


def test_invalid_helo_name_is_refused_before_connecting():
    async def main() -> None:
        async with ScriptedSMTP() as srv:
            for helo in ("", "a b", "x\r\nMAIL FROM:<>"):
                with pytest.raises(DeliveryError) as ei:
                    await SMTPClient.connect(Source("127.0.0.5", helo), "127.0.0.1", srv.port,
                                             timeouts=FAST)
                assert ei.value.kind == "config" and not ei.value.temporary
            assert srv.sessions == []

    run(main)


def test_empty_recipient_list_is_a_caller_error():
    async def main() -> None:
        async with ScriptedSMTP() as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            with pytest.raises(ValueError):
                await c.send("a@example.com", [], MSG)
            await c.quit()

    run(main)


# --------------------------------------------------------------------------- STARTTLS


def test_starttls_optional_upgrades_and_re_ehlos(cert):
    ctx = server_context(*cert)

    async def main() -> None:
        async with ScriptedSMTP(tls_context=ctx) as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, mx_host="mx.test",
                                         timeouts=FAST)
            assert c.tls_started and c.tls_version in ("TLSv1.2", "TLSv1.3") and c.tls_cipher
            assert "STARTTLS" not in c.extensions and "PIPELINING" in c.extensions
            r = await c.send("a@example.com", ["b@example.net"], MSG)
            assert r.state == "EOD"
            info = c.connection_info()
            assert info["tls"] == {"started": True, "protocol": c.tls_version,
                                   "cipher": c.tls_cipher}
            await c.quit()
            s = srv.sessions[0]
            assert [x.split(" ")[0] for x in s.commands[:3]] == ["EHLO", "STARTTLS", "EHLO"]
            assert s.messages[0].tls and s.messages[0].data == MSG

    run(main)


def test_starttls_disabled_and_not_offered():
    async def main() -> None:
        async with ScriptedSMTP() as srv:  # no STARTTLS offered
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            assert not c.tls_started
            await c.quit()
            with pytest.raises(DeliveryError) as ei:
                await SMTPClient.connect(SRC, "127.0.0.1", srv.port, tls=TLSMode.REQUIRE,
                                         mx_host="mx.test", timeouts=FAST)
            e = ei.value
            assert e.kind == "tls" and e.temporary
            assert "does not offer STARTTLS" in e.message and "mx.test" in e.message

    run(main)


def test_starttls_disabled_mode_ignores_the_offer(cert):
    async def main() -> None:
        async with ScriptedSMTP(tls_context=server_context(*cert)) as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, tls=TLSMode.DISABLED,
                                         timeouts=FAST)
            assert not c.tls_started and "STARTTLS" in c.extensions
            await c.quit()
            assert "STARTTLS" not in srv.sessions[0].commands

    run(main)


def test_starttls_verify_fails_on_self_signed(cert):
    async def main() -> None:
        async with ScriptedSMTP(tls_context=server_context(*cert)) as srv:
            for mode in (TLSMode.REQUIRE_VERIFY, TLSMode.OPTIONAL_VERIFY):
                with pytest.raises(DeliveryError) as ei:
                    await SMTPClient.connect(SRC, "127.0.0.1", srv.port, tls=mode,
                                             mx_host="mx.test", timeouts=FAST)
                e = ei.value
                assert e.kind == "tls" and e.temporary
                assert "verification failed" in e.message and "self-signed" in e.message
                assert "mx.test" in e.message

    run(main)


def test_starttls_verify_succeeds_with_a_trusting_context(cert):
    certfile, _ = cert

    def factory(verify: bool) -> ssl.SSLContext:
        assert verify
        ctx = ssl.create_default_context(cafile=str(certfile))
        return ctx

    async def main() -> None:
        async with ScriptedSMTP(tls_context=server_context(*cert)) as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, tls=TLSMode.REQUIRE_VERIFY,
                                         mx_host="mx.test", timeouts=FAST,
                                         tls_context_factory=factory)
            assert c.tls_started
            await c.quit()
            # the same certificate does not match another MX name
            with pytest.raises(DeliveryError) as ei:
                await SMTPClient.connect(SRC, "127.0.0.1", srv.port,
                                         tls=TLSMode.REQUIRE_VERIFY, mx_host="mx.other.test",
                                         timeouts=FAST, tls_context_factory=factory)
            assert ei.value.kind == "tls" and "mx.other.test" in ei.value.message

    run(main)


def test_starttls_refused_optional_goes_on_required_fails(cert):
    async def main() -> None:
        async with ScriptedSMTP(tls_context=server_context(*cert),
                                starttls="454 4.7.0 TLS not available") as srv:
            c = await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            assert not c.tls_started
            assert (await c.send("a@example.com", ["b@example.net"], MSG)).state == "EOD"
            await c.quit()
            with pytest.raises(DeliveryError) as ei:
                await SMTPClient.connect(SRC, "127.0.0.1", srv.port, tls=TLSMode.REQUIRE,
                                         timeouts=FAST)
            assert ei.value.kind == "tls" and "454" in ei.value.message

    run(main)


def test_plaintext_after_starttls_reply_is_refused(cert):
    # Response injection: bytes sent in the clear after "220 ready" must not be read as TLS data
    async def main() -> None:
        async with ScriptedSMTP(tls_context=server_context(*cert),
                                extra_after_starttls=b"250 injected\r\n") as srv:
            with pytest.raises(DeliveryError) as ei:
                await SMTPClient.connect(SRC, "127.0.0.1", srv.port, timeouts=FAST)
            assert ei.value.kind == "tls" and "after its STARTTLS reply" in ei.value.message

    run(main)
