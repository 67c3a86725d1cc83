"""Pure helpers of the inbound side: logfmt lines, the Received: header, address forms."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferrymail.observe import log
from ferrymail.smtp.server import (
    format_addr,
    normalise_ip,
    received_header,
    transaction_log_fields,
    transaction_log_head,
)

_PAIR = re.compile(r'(\w[\w.]*)=("(?:[^"\\]|\\.)*"|\S*)')
_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict reader for what log.quote writes (the test's oracle)."""
    out = {}
    pos = 0
    while pos < len(line):
        m = _PAIR.match(line, pos)
        assert m, f"not logfmt at {pos}: {line[pos:]!r}"
        key, raw = m.group(1), m.group(2)
        if raw.startswith('"'):
            body = raw[1:-1]
            value = re.sub(r"\\x([0-9a-f]{2})|\\u([0-9a-f]{4})|\\U([0-9a-f]{8})|\\(.)",
                           lambda g: _UNESCAPE[g.group(4)] if g.group(4)
                           else chr(int(g.group(1) or g.group(2) or g.group(3), 16)), body)
        else:
            value = raw
        out[key] = value
        pos = m.end()
        if pos < len(line):
            assert line[pos] == " "
            pos += 1
    return out


def test_log_line_shape_and_level_filter():
    buf = io.StringIO()
    log.configure("info", buf)
    try:
        log.log_event("smtp.transaction", client="45.33.68.55:54321", rcpts="<a>,<b>",
                      reply="250 2.0.0 OK queued as 1", qid=None, tls=False, size=2048)
        log.log_event("smtp.disconnect", "debug", client="x")
        log.log_event("smtp.proxy.error", "warning", error='bad "header"\r\n')
    finally:
        log.configure("info", None)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert re.match(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=info "
                    r"event=smtp\.transaction client=45\.33\.68\.55:54321 rcpts=<a>,<b> "
                    r'reply="250 2\.0\.0 OK queued as 1" tls=false size=2048$', lines[0])
    assert parse_logfmt(lines[1])["error"] == 'bad "header"\r\n'


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="unknown log level"):
        log.configure("loud")


@given(st.text(max_size=60))
def test_quote_round_trips(value):
    line = log.format_event("e", k=value)
    assert "\n" not in line
    assert parse_logfmt(line)["k"] == value


def test_normalise_ip_and_format_addr():
    assert normalise_ip("::ffff:45.33.68.55") == "45.33.68.55"
    assert normalise_ip("fe80::1%eth0") == "fe80::1"
    assert normalise_ip("2001:db8::5") == "2001:db8::5"
    assert normalise_ip("127.0.0.1") == "127.0.0.1"
    assert format_addr("2001:db8::5", 25) == "[2001:db8::5]:25"
    assert format_addr("1.2.3.4", 25) == "1.2.3.4:25"


def test_received_header_single_recipient_via_proxy():
    h = received_header(helo="client.test", client_ip="45.33.68.55", client_port=54321,
                        hostname="mx.test", protocol="ESMTPS", ident="abc.1",
                        recipients=["u@example.com"], tls="TLSv1.3 TLS_AES_128_GCM_SHA256",
                        proxy_ip="127.0.0.1", proxy_version=2).decode()
    lines = h.split("\r\n")
    assert lines[0] == "Received: from client.test ([45.33.68.55] port 54321)"
    assert lines[1] == "\t(via PROXY v2 from 127.0.0.1)"
    assert lines[2] == "\t(using TLSv1.3 TLS_AES_128_GCM_SHA256)"
    assert lines[3] == "\tby mx.test (ferrymail) with ESMTPS id abc.1"
    assert re.match(r"\tfor <u@example\.com>; \w{3}, \d{1,2} \w{3} \d{4} [\d:]{8} \+0000$",
                    lines[4])
    assert h.endswith("\r\n") and lines[5] == ""


def test_received_header_hides_several_recipients_and_cleans_helo():
    h = received_header(helo="evil)(\\\x01", client_ip="2001:db8::5", client_port=1,
                        hostname="mx.test", protocol="SMTP", ident="i",
                        recipients=["a@example.com", "b@example.com"], tls=None,
                        proxy_ip=None, proxy_version=None).decode()
    assert "example.com" not in h and "for <" not in h
    assert h.startswith("Received: from [IPv6:2001:db8::5] (port 1 helo=evil%29%28%5C%01)\r\n")
    assert "with SMTP id i; " in h


_TEXT = st.text(max_size=12) | st.sampled_from(["mx.example", "a b", 'q"x', "t\\", ""])


@given(server=st.sampled_from(["bench", "in 1"]), proxy=st.sampled_from([None, "10.0.0.1:443"]),
       proxy_version=st.sampled_from([None, 1, 2]), helo=_TEXT,
       tls=st.none() | st.sampled_from(["TLSv1.3 TLS_AES_256_GCM_SHA384", "TLS"]),
       sender=_TEXT, recipients=st.lists(_TEXT, min_size=1, max_size=3),
       size=st.integers(min_value=0, max_value=10**9),
       qid=st.none() | st.sampled_from(["0123456789abcdef"]), reply=_TEXT,
       error=st.none() | _TEXT, duration=st.integers(min_value=0, max_value=10**6))
def test_transaction_line_is_what_log_event_writes(server, proxy, proxy_version, helo, tls,
                                                    sender, recipients, size, qid, reply,
                                                    error, duration):
    # The server formats its per-transaction line itself (log_formatted); the line must be
    # exactly the one log_event would write for the same fields.
    failed_id = "fedcba9876543210" if qid is None else None
    expected = log.format_event(
        "smtp.transaction", "info", server=server, conn="3f2a0001", id=failed_id,
        client="192.0.2.1:25", proxy=proxy, proxy_version=proxy_version, helo=helo, tls=tls,
        **{"from": f"<{sender}>"},
        rcpts=f"<{recipients[0]}>" if len(recipients) == 1
        else ",".join(f"<{r}>" for r in recipients),
        size=size, qid=qid, reply=reply, error=error, duration_ms=duration)
    head = transaction_log_head(server, "3f2a0001", "192.0.2.1:25", proxy, proxy_version)
    fields = transaction_log_fields(head, failed_id, helo, tls, sender, recipients, size, qid,
                                    reply, error, duration)
    buf = io.StringIO()
    log.configure("info", buf)
    try:
        log.log_formatted("smtp.transaction", "info", fields)
        log.log_formatted("smtp.transaction", "debug", fields)  # below the threshold
    finally:
        log.configure("info", None)
    line = buf.getvalue()
    assert line.count("\n") == 1 and line.endswith("\n")
    assert line.split(" ", 1)[1] == expected.split(" ", 1)[1] + "\n"  # all but ts=
    assert parse_logfmt(line.rstrip("\n"))["helo"] == helo
