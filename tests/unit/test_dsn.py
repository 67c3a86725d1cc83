"""RFC 3464 DSN structure, parsed back with Python's email package."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferrymail.delivery.dsn import (
    RecipientStatus,
    build_dsn,
    header_section,
    local_diagnostic,
    smtp_diagnostic,
    status_from_reply,
)
from ferrymail.smtp.protocol import Reply

ORIGINAL = (
    b"Received: from x\r\n\tby y\r\nFrom: a@sender.test\r\nTo: b@rcpt.test\r\n"
    b"Subject: original subject\r\nMessage-ID: <orig-1@sender.test>\r\n\r\n"
    b"Secret body text\r\n--not-a-boundary\r\n"
)
R550 = Reply(550, ("User unknown",), (5, 1, 1))


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def build(recipients: list[RecipientStatus], original: bytes = ORIGINAL, **kw) -> bytes:
    return build_dsn(reporting_mta="mta.example.test", original_sender="a@sender.test",
                     queue_id="0123456789abcdef", arrival=1_700_000_000.0,
                     recipients=recipients, original=original, now=1_700_000_100.0, **kw)


def status_blocks(msg: Message) -> list[Message]:
    report = msg.get_payload()[1]
    assert report.get_content_type() == "message/delivery-status"
    return report.get_payload()


def test_failed_dsn_structure() -> None:
    raw = build([
        RecipientStatus("b@rcpt.test", "failed", status_from_reply(R550), smtp_diagnostic(R550),
                        "mx.rcpt.test", 1_700_000_050.0),
        RecipientStatus("c@rcpt.test", "failed", "5.1.10",
                        local_diagnostic("dns: domain rcpt.test accepts no mail (null MX)")),
    ], envid="ENV-1")
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mta.example.test>"
    assert msg["To"] == "<a@sender.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<orig-1@sender.test>"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    human = parts[0].get_payload(decode=True).decode()
    assert "<b@rcpt.test>: 550 5.1.1 User unknown" in human
    per_msg, first, second = status_blocks(msg)
    assert per_msg["Reporting-MTA"] == "dns; mta.example.test"
    assert per_msg["Original-Envelope-Id"] == "ENV-1"
    assert per_msg["Arrival-Date"].endswith("GMT")
    assert first["Final-Recipient"] == "rfc822; b@rcpt.test"
    assert first["Action"] == "failed" and first["Status"] == "5.1.1"
    assert first["Remote-MTA"] == "dns; mx.rcpt.test"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert first["Last-Attempt-Date"]
    assert second["Status"] == "5.1.10" and second["Remote-MTA"] is None
    assert second["Diagnostic-Code"].startswith("X-Ferrymail; dns: ")
    headers = parts[2].get_payload()
    assert "Subject: original subject" in headers and "Secret body" not in headers


def test_delayed_dsn() -> None:
    r421 = Reply(421, ("try later",), (4, 7, 0))
    raw = build([RecipientStatus("b@rcpt.test", "delayed", status_from_reply(r421, "delayed"),
                                 smtp_diagnostic(r421), "mx.rcpt.test", 1_700_000_050.0,
                                 1_700_400_000.0)])
    msg = parse(raw)
    assert msg["Subject"].startswith("Delayed Mail")
    (_, block) = status_blocks(msg)
    assert block["Action"] == "delayed" and block["Status"] == "4.7.0"
    assert block["Will-Retry-Until"].endswith("GMT")
    assert "retried until" in msg.get_payload()[0].get_payload()


def test_one_action_per_report_and_nonempty() -> None:
    with pytest.raises(ValueError):
        build([])
    with pytest.raises(ValueError):
        build([RecipientStatus("a@b.c", "failed", "5.0.0", "x"),
               RecipientStatus("d@b.c", "delayed", "4.0.0", "x")])


def test_status_from_reply() -> None:
    assert status_from_reply(R550) == "5.1.1"
    assert status_from_reply(Reply(554, ("no",))) == "5.0.0"
    assert status_from_reply(Reply(451, ("later",), (4, 3, 0))) == "5.4.7"  # expired
    assert status_from_reply(Reply(451, ("later",), (4, 3, 0)), "delayed") == "4.3.0"
    assert status_from_reply(Reply(451, ("later",)), "delayed") == "4.0.0"


def test_long_multiline_diagnostic_is_folded_and_unfolds_back() -> None:
    reply = Reply(550, ("first line " + "x" * 30, *["word " * 40] * 3), (5, 7, 1))
    raw = build([RecipientStatus("b@rcpt.test", "failed", "5.7.1", smtp_diagnostic(reply))])
    for line in raw.split(b"\r\n"):
        assert len(line) <= 998
    (_, block) = status_blocks(parse(raw))
    unfolded = " ".join(block["Diagnostic-Code"].split())
    assert unfolded == " ".join(smtp_diagnostic(reply).split())


def test_control_characters_cannot_inject_fields() -> None:
    raw = build([RecipientStatus("b@rcpt.test", "failed", "5.0.0",
                                 "smtp; 550 bad\r\nAction: delivered\r\n")])
    (_, block) = status_blocks(parse(raw))
    assert block["Action"] == "failed"
    assert block.get_all("Action") == ["failed"]


def test_non_ascii_recipient_uses_utf8_address_type() -> None:
    raw = build([RecipientStatus("jörg@rcpt.test", "failed", "5.1.1", "smtp; 550 no")])
    (_, block) = status_blocks(parse(raw))
    assert str(block["Final-Recipient"]).startswith("utf-8; ")


def test_header_section_variants() -> None:
    assert header_section(b"A: 1\nB: 2\n\nbody") == b"A: 1\r\nB: 2\r\n"
    assert header_section(b"A: 1\r\n--x: y\r\n\r\nbody") == b"A: 1\r\n --x: y\r\n"
    assert header_section(b"no body at all") == b"no body at all\r\n"
    big = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(2000)) + b"\r\nbody"
    assert len(header_section(big)) <= 64 * 1024 + 2


def test_original_without_message_id() -> None:
    msg = parse(build([RecipientStatus("b@rcpt.test", "failed", "5.0.0", "smtp; 550 no")],
                      original=b"Subject: x\r\n\r\nbody"))
    assert msg["In-Reply-To"] is None


@given(st.binary(max_size=3000))
def test_any_original_gives_a_parsable_three_part_report(original: bytes) -> None:
    raw = build([RecipientStatus("b@rcpt.test", "failed", "5.1.1", "smtp; 550 5.1.1 no")],
                original=original)
    msg = parse(raw)
    parts = msg.get_payload()
    assert len(parts) == 3
    assert status_blocks(msg)[1]["Final-Recipient"] == "rfc822; b@rcpt.test"
