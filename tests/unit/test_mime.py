"""The MIME builder: headers, transfer encodings, multipart, errors; parsed back by `email`."""

from __future__ import annotations

import email
import email.policy
import email.utils
from datetime import UTC, datetime
from email.message import EmailMessage
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.mime import MIME


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def text(part: EmailMessage) -> str:
    """A text part's content with the CRLFs of the wire turned back into newlines."""
    return part.get_content().replace("\r\n", "\n")


def lines_ok(raw: bytes) -> None:
    """CRLF only, 7-bit, no line over 998 octets (RFC 5322 2.1.1), headers and body apart."""
    assert raw.isascii()
    assert raw.count(b"\n") == raw.count(b"\r\n") and raw.count(b"\r") == raw.count(b"\r\n")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\r\n\r\n" in raw


def test_the_seed_chain() -> None:
    msgid = f"<{uuid4()}@example.com>"
    mime = (MIME().add_header("Subject", "Hello").set_body("Hello World")
            .add_header("From", "<>").add_header("Message-ID", msgid))
    raw = mime.to_bytes()
    lines_ok(raw)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"Subject: Hello\r\nFrom: <>\r\nMessage-ID: " + msgid.encode())
    assert body == b"Hello World\r\n"
    msg = parse(raw)
    assert msg["Message-ID"] == msgid  # kept, not replaced
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert email.utils.parsedate_to_datetime(msg["Date"]) is not None  # added
    assert len(msg.get_all("Message-ID")) == 1


def test_date_and_message_id_are_added_once_and_stay_stable() -> None:
    mime = MIME().add_header("From", "Sender <s@mail.example.org>").set_body("x")
    first, second = mime.to_bytes(), mime.to_bytes()
    assert first == second
    msg = parse(first)
    assert msg["Message-ID"].endswith("@mail.example.org>")
    assert str(mime) == first.decode()


def test_given_date_is_kept_and_set_date_forms() -> None:
    mime = MIME().add_header("Date", "Mon, 1 Jan 2024 00:00:00 +0000").set_body("x")
    (date,) = parse(mime.to_bytes()).get_all("Date")
    assert date.datetime == datetime(2024, 1, 1, tzinfo=UTC)
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse(MIME().set_date(when).to_bytes())["Date"].datetime == when
    assert parse(MIME().set_date(when.timestamp()).to_bytes())["Date"].datetime == when
    assert "2024" in parse(MIME().set_date("Wed, 01 May 2024 12:00:00 +0000").to_bytes())["Date"]
    with pytest.raises(ValueError, match="RFC 5322 date"):
        MIME().set_date("yesterday")


@pytest.mark.parametrize(
    ("body", "cte"),
    [
        ("Hello World", "7bit"),
        ("line one\nline two\r\nline three", "7bit"),
        ("x" * 200, "quoted-printable"),  # ASCII but a line longer than 78
        ("Hello Jörg, see you tomorrow at the usual place.", "quoted-printable"),
        ("Ελληνικά κείμενα εδώ " * 3, "base64"),  # mostly non-ASCII
        ("日本語のテキスト", "base64"),
    ],
)
def test_transfer_encoding_follows_the_content(body: str, cte: str) -> None:
    raw = MIME().set_body(body).to_bytes()
    lines_ok(raw)
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == cte
    assert text(msg) == body.replace("\r\n", "\n") + "\n"


def test_binary_body_is_base64() -> None:
    data = bytes(range(256)) * 4
    raw = MIME().set_type("application/octet-stream").set_body(data).to_bytes()
    lines_ok(raw)
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert msg.get_content() == data


def test_utf8_bytes_for_a_text_type_and_non_utf8_refused() -> None:
    msg = parse(MIME().set_type("text/html").set_body("<p>é</p>".encode()).to_bytes())
    assert msg.get_content_type() == "text/html"
    assert text(msg).strip() == "<p>é</p>"
    with pytest.raises(ValueError, match="must be UTF-8"):
        MIME().set_body(b"\xff\xfe").to_bytes()


def test_non_ascii_headers_are_encoded_and_long_ones_folded() -> None:
    subject = "Grüße " + "lang " * 40
    raw = (MIME().add_header("Subject", subject)
           .add_header("To", "Jörg Müller <j@example.com>").set_body("x").to_bytes())
    lines_ok(raw)
    head = raw.partition(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    msg = parse(raw)
    assert msg["Subject"] == subject.strip() or msg["Subject"] == subject
    assert msg["To"].addresses[0].display_name == "Jörg Müller"
    assert msg["To"].addresses[0].addr_spec == "j@example.com"


def test_headers_repeat_in_order() -> None:
    raw = (MIME().add_header("Received", "one").add_header("Received", "two")
           .set_body("x").to_bytes())
    assert parse(raw).get_all("Received") == ["one", "two"]


def test_multipart_alternative_with_attachments() -> None:
    mime = (MIME().add_header("Subject", "parts").set_type("multipart/alternative")
            .set_boundary("b0undary-1")
            .append_part(MIME().set_body("plain text"))
            .append_part(MIME().set_type("text/html").set_body("<p>html ü</p>")))
    mime.add_attachment(b"%PDF-1.4\x00\xff", "report.pdf")
    mime.add_attachment("a,b\n1,2\n", "data.csv")
    raw = mime.to_bytes()
    lines_ok(raw)
    assert b'boundary="b0undary-1"' in raw
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "text/html", "application/pdf", "text/csv"]
    assert text(parts[0]) == "plain text\n"
    assert text(parts[1]) == "<p>html ü</p>\n"
    assert parts[2].get_filename() == "report.pdf"
    assert parts[2].get_content_disposition() == "attachment"
    assert parts[2].get_content() == b"%PDF-1.4\x00\xff"
    assert parts[3].get_filename() == "data.csv"
    assert text(parts[3]) == "a,b\n1,2\n"
    for part in parts:  # parts carry no message-level headers
        assert part["Date"] is None and part["MIME-Version"] is None


def test_a_body_with_parts_becomes_the_first_part_of_a_mixed_message() -> None:
    mime = MIME().set_body("see attached").add_attachment(b"\x00", "blob.bin")
    msg = parse(mime.to_bytes())
    assert msg.get_content_type() == "multipart/mixed"
    first, second = msg.iter_parts()
    assert text(first) == "see attached\n"
    assert second.get_content_type() == "application/octet-stream"


def test_nested_parts_and_inline_disposition() -> None:
    inner = (MIME().set_type("multipart/related")
             .append_part(MIME().set_type("text/html").set_body("<img src=cid:x>"))
             .append_part(MIME().set_type("image/png").set_body(b"\x89PNG")
                          .add_header("Content-ID", "<x>").set_disposition("inline")))
    msg = parse(MIME().append_part(inner).to_bytes())
    related = next(msg.iter_parts())
    assert related.get_content_type() == "multipart/related"
    png = list(related.iter_parts())[1]
    assert png["Content-ID"] == "<x>"
    assert png.get_content_disposition() == "inline"


def test_message_rfc822_part_is_7bit() -> None:
    inner = b"Subject: inner\r\n\r\nhello\r\n"
    raw = MIME().set_type("message/rfc822").set_body(inner).to_bytes()
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert msg.get_content()["Subject"] == "inner"
    with pytest.raises(ValueError, match="7-bit"):
        MIME().set_type("message/rfc822").set_body("Subject: é\r\n\r\n").to_bytes()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MIME().add_header("Subject", "a\r\nBcc: victim@example.com"), "CR, LF"),
        (lambda: MIME().add_header("Bad Name", "x"), "invalid header name"),
        (lambda: MIME().add_header("X:Y", "x"), "invalid header name"),
        (lambda: MIME().add_header("Subject", 5), "must be a string"),
        (lambda: MIME().add_header("Date", "not a date"), "not an RFC 5322 date"),
        (lambda: MIME().add_header("To", "Jörg <jörg@exämple.com>"), "non-ASCII address"),
        (lambda: MIME().add_header("Content-Type", "text/html"), "use set_type()"),
        (lambda: MIME().add_header("content-transfer-encoding", "8bit"), "managed"),
        (lambda: MIME().set_type("html"), "content type must look like"),
        (lambda: MIME().set_boundary("x" * 71), "invalid multipart boundary"),
        (lambda: MIME().set_boundary(""), "invalid multipart boundary"),
        (lambda: MIME().set_filename("a\nb"), "invalid file name"),
        (lambda: MIME().set_disposition("at tach"), "invalid disposition"),
        (lambda: MIME().set_body(5), "must be str or bytes"),
        (lambda: MIME().append_part("text"), "takes a MIME object"),
        (lambda: MIME().set_type("multipart/mixed").to_bytes(), "at least one part"),
    ],
)
def test_bad_input_is_a_clear_valueerror(build, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value)


def test_a_part_cannot_contain_itself() -> None:
    outer, inner = MIME(), MIME()
    outer.append_part(inner)
    with pytest.raises(ValueError, match="cannot contain itself"):
        inner.append_part(outer)
    with pytest.raises(ValueError, match="cannot contain itself"):
        outer.append_part(outer)


_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x0b\x0c\x1c\x1d\x1e"
                  "\x85\u2028\u2029"),
    max_size=400,
)


@settings(max_examples=150, deadline=None)
@given(body=_text, subject=st.text(st.characters(blacklist_categories=("Cs", "Cc")),
                                   max_size=120))
def test_any_text_round_trips(body: str, subject: str) -> None:
    raw = MIME().add_header("Subject", subject).set_body(body).to_bytes()
    lines_ok(raw)
    msg = parse(raw)
    expected = body if body.endswith("\n") or not body else body + "\n"
    assert text(msg) == (expected or "\n")
    assert " ".join(str(msg["Subject"]).split()) == " ".join(subject.split())


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_round_trip(data: bytes) -> None:
    raw = MIME().add_attachment(data, "blob.bin").to_bytes()
    lines_ok(raw)
    (part,) = parse(raw).iter_parts()
    assert part.get_content() == data
