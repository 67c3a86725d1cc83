"""Outbound sans-IO hardening: multi-line replies with mixed codes (issue 7 item 20) and line
endings on the wire (item 22): nothing the client writes has a bare CR or LF."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferrymail.smtp.protocol import DataDecoder, ReplyParser, dot_stuff, to_crlf

# ---------------------------------------------------------------------------- item 20


@pytest.mark.parametrize("wire, code, enhanced, mixed", [
    (b"220-mx.example ESMTP\r\n521 5.7.1 go away\r\n", 521, (5, 7, 1), (220,)),
    (b"250-2.1.5 fine\r\n550 5.1.1 no such user\r\n", 550, (5, 1, 1), (250,)),
    (b"250-a\r\n251 b\r\n", 251, None, (250,)),
    (b"451-4.3.0 a\r\n250-b\r\n550 c\r\n", 550, None, (451, 250)),
])
def test_mixed_codes_take_the_last_line(wire, code, enhanced, mixed):
    (r,) = ReplyParser().feed(wire)
    assert r.code == code and r.enhanced == enhanced and r.mixed_codes == mixed
    assert len(r.lines) == wire.count(b"\n")


@given(st.lists(st.tuples(st.integers(200, 599),
                          st.text(alphabet="abc 4.5", max_size=12)), min_size=1, max_size=6),
       st.integers(min_value=1, max_value=7))
def test_any_multiline_reply_takes_its_last_code(lines, cut):
    wire = b"".join(f"{c}{'-' if i < len(lines) - 1 else ' '}{t}\r\n".encode()
                    for i, (c, t) in enumerate(lines))
    p = ReplyParser()
    out = []
    for i in range(0, len(wire), cut):
        out += p.feed(wire[i:i + cut])
    (r,) = out
    last = lines[-1][0]
    assert r.code == last and len(r.lines) == len(lines)
    assert set(r.mixed_codes) == {c for c, _ in lines if c != last}


def test_consistent_reply_has_no_mixed_codes():
    (r,) = ReplyParser().feed(b"250-2.0.0 a\r\n250 2.0.0 b\r\n")
    assert r.mixed_codes == () and r.enhanced == (2, 0, 0) and r.lines == ("a", "b")


# ---------------------------------------------------------------------------- item 22

# Every end-of-data look-alike from the SMTP smuggling reports, and the bare endings alone.
SMUGGLING = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r",
             b"\r.\n", b"\r\n.\r\r\n", b"\r\r\n.\r\r\n", b"\n\r.\n\r", b"\r", b"\n", b"\r\r",
             b"\n\n", b"\n\r"]
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def _wire_ok(wire: bytes) -> None:
    assert not BARE.search(wire), wire
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    # The only end of data is the real one: what a strict server would read.
    decoder = DataDecoder(10_000_000)
    body, leftover = decoder.feed(wire + b"QUIT\r\n")
    assert leftover == b"QUIT\r\n" and not decoder.bare


@pytest.mark.parametrize("seq", SMUGGLING)
def test_writer_normalises_every_smuggling_sequence(seq):
    msg = b"Subject: t\r\n\r\nhello" + seq + b"MAIL FROM:<x@example.com>\r\n"
    wire = dot_stuff(msg)
    _wire_ok(wire)
    assert b"\r\nMAIL FROM:<x@example.com>\r\n" in wire


def test_issue_inputs():
    wire = dot_stuff(b"hello\r.\rMAIL FROM:<x@example.com>\r\n.\r\n")
    assert wire == b"hello\r\n..\r\nMAIL FROM:<x@example.com>\r\n..\r\n.\r\n"
    assert dot_stuff(b"Subject: t\rBcc: x@example.com") == (
        b"Subject: t\r\nBcc: x@example.com\r\n.\r\n")


def test_to_crlf():
    assert to_crlf(b"a\rb\nc\r\nd\r\r\ne") == b"a\r\nb\r\nc\r\nd\r\n\r\ne"
    assert to_crlf(b"plain") == b"plain"


@given(st.binary(max_size=400) | st.lists(st.sampled_from(
    [b"\r", b"\n", b".", b"\r\n", b"a", b"\x00", b"\xff"]), max_size=60).map(b"".join))
def test_stuffed_output_never_has_a_bare_line_ending(data):
    wire = dot_stuff(data)
    _wire_ok(wire)
    decoder = DataDecoder(10_000_000)
    body, _ = decoder.feed(wire)
    # The content comes back with normalised line endings, nothing else changed.
    expected = to_crlf(data)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert body == expected


def _dot_stuff_reference(data: bytes) -> bytes:
    """dot_stuff as first written (three counts and a plain search): the fast one must agree."""
    cr = data.count(b"\r")
    if cr != data.count(b"\n") or cr != data.count(b"\r\n"):
        data = to_crlf(data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    return data + b".\r\n"


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\r\n.", b"\n.", b"\r."]),
                max_size=40).map(b"".join))
def test_dot_stuff_agrees_with_the_plain_reference(data: bytes) -> None:
    assert dot_stuff(data) == _dot_stuff_reference(data)
