"""Issue 7, inbound items 1-7: every input of the issue as a regression test, and a property
test over the whole sans-IO session (arbitrary bytes in arbitrary splits)."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st

from ferrymail.abnf import decimal, is_digits
from ferrymail.proxy import ProxyError, parse
from ferrymail.smtp.client import transaction_parameters
from ferrymail.smtp.protocol import (
    ReplyParser,
    SMTPProtocolError,
    parse_path,
    split_enhanced,
    valid_helo,
    valid_mailbox,
)
from ferrymail.smtp.server import received_header
from ferrymail.smtp.session import (
    Close,
    Deliver,
    ServerSession,
    SessionLimits,
    SessionPolicy,
    SessionSettings,
    StartTLS,
)

OUR = "example.com"
NON_ASCII_DIGITS = ["\u00b2", "\u0665", "\u0661\u0662", "\uff15", "\u09ea", "\u00b9\u00b2"]
UNICODE_SPACES = ["\u00a0", "\u3000", "\u2028", "\u2029", "\u200b", "\u202f", "\ufeff",
                  "\u0085", "\u1680"]


def make(client_ip: str = "192.0.2.7", relay: bool = False, policy: SessionPolicy | None = None,
         **limits: int) -> ServerSession:
    settings_ = SessionSettings("mx.test", SessionLimits(**limits),
                                policy=policy or SessionPolicy())
    return ServerSession(settings_, lambda d, ip: d == OUR or relay, client_ip,
                         may_relay=lambda ip: relay)


def codes(s: ServerSession) -> list[int]:
    return [r.code for r in ReplyParser().feed(s.take_output())]


def texts(s: ServerSession) -> list[str]:
    return [str(r) for r in ReplyParser().feed(s.take_output())]


# ------------------------------------------------------------------ 1. ASCII digits only


@given(st.text(max_size=25))
def test_decimal_accepts_exactly_ascii_digits(text):
    want = int(text) if re.fullmatch(r"[0-9]{1,20}", text, re.ASCII) else None
    assert decimal(text) == want
    assert decimal(text.encode("utf-8")) == want
    assert is_digits(text) == bool(re.fullmatch(r"[0-9]+", text, re.ASCII))


def test_decimal_bounds_and_leading_zeros():
    assert decimal("0", leading_zero=False) == 0
    assert decimal("05", leading_zero=False) is None and decimal("05") == 5
    assert decimal("1" * 21) is None and decimal("1" * 21, max_digits=21) == int("1" * 21)
    assert decimal("") is None and decimal(b"") is None and decimal("+5") is None


@pytest.mark.parametrize("digit", NON_ASCII_DIGITS)
def test_mail_size_with_non_ascii_digits_is_501_not_an_exception(digit):
    s = make()
    s.receive(f"EHLO c\r\nMAIL FROM:<a@b.example> SIZE={digit}\r\n".encode())
    assert codes(s) == [250, 501]
    assert s.internal_error is None and not s.closed and s.txn is None


@pytest.mark.parametrize("digit", NON_ASCII_DIGITS)
def test_bdat_with_non_ascii_digits_is_501_and_never_a_size(digit):
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<r@example.com>\r\n")
    assert codes(s) == [250, 250, 250]
    # "BDAT \u0665 LAST" was taken as BDAT 5: the next five octets would have been content
    event = s.receive(f"BDAT {digit} LAST\r\nNOOP\r\n".encode())
    assert event is None and codes(s) == [501, 250]
    assert s.internal_error is None and not s.in_data


def test_pipelined_bad_size_after_end_of_data_still_sends_the_250():
    # The message was stored but its "250" never sent: the client retried, delivered twice.
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<r@example.com>\r\nDATA\r\n")
    assert codes(s) == [250, 250, 250, 354]
    event = s.receive("hi\r\n.\r\nMAIL FROM:<a@b.example> SIZE=\u00b2\r\n".encode())
    assert isinstance(event, Deliver)
    s.finish_delivery(b"250 2.0.0 OK queued as Q1\r\n", queued=True)
    assert s.step() is None
    assert texts(s) == ["250 2.0.0 OK queued as Q1", "501 5.5.4 SIZE needs a number"]


def test_a_bug_in_a_handler_still_flushes_earlier_replies_and_closes(monkeypatch):
    # The safety net: an exception from a command handler never escapes the session.
    import ferrymail.smtp.session as session_mod

    def boom(self, arg):
        raise RuntimeError("bug")

    monkeypatch.setitem(session_mod._HANDLERS, "NOOP", boom)
    s = make()
    event = s.receive(b"EHLO c\r\nNOOP\r\nQUIT\r\n")
    assert codes(s) == [250, 421]
    assert isinstance(event, Close) and event.reason == "internal error"
    assert s.internal_error == "NOOP: RuntimeError: bug"


@pytest.mark.parametrize("digit", NON_ASCII_DIGITS)
def test_reply_codes_and_enhanced_codes_are_ascii_only(digit):
    assert split_enhanced(f"5.{digit}.1 no")[0] is None
    with pytest.raises(SMTPProtocolError):
        ReplyParser().feed(f"2{digit}0 ok\r\n".encode()[:3] + b" ok\r\n")


@pytest.mark.parametrize("digit", NON_ASCII_DIGITS)
def test_ehlo_advertised_size_with_non_ascii_digits_is_no_limit_not_a_crash(digit):
    params = transaction_parameters({"SIZE": digit}, "a@b.example", ["c@d.example"], b"x\r\n")
    assert params["SIZE"] == "3"


@pytest.mark.parametrize("line", [
    "PROXY TCP4 192.0.2.1 198.51.100.2 \u00b25 25\r\n",
    "PROXY TCP4 192.0.2.1 198.51.100.2 25 \u0665\r\n",
    "PROXY TCP4 192.0.2.\u0661 198.51.100.2 25 25\r\n",
])
def test_proxy_v1_numbers_are_ascii_only(line):
    with pytest.raises(ProxyError):
        parse(line.encode())


# ------------------------------------------------------------------ 2. case-insensitive tags


def test_ipv6_address_literal_tag_is_case_insensitive():
    s = make(client_ip="127.0.0.1", relay=True)
    s.receive(b"EHLO c\r\nMAIL FROM:<x@[ipv6:2001:db8::9]>\r\n"
              b"RCPT TO:<postmaster@[IPV6:::1]>\r\nRCPT TO:<p@[iPv6:::1]>\r\n")
    assert codes(s) == [250, 250, 250, 250]
    assert s.txn is not None and s.txn.sender == "x@[ipv6:2001:db8::9]"


@pytest.mark.parametrize("literal", ["[IPv6:::1%eth0]", "[IPv6:1.2.3.4]", "[IPv6:12345::]",
                                     "[1.2.3.256]", "[01.2.3.4]", "[1.2.3]",
                                     "[\u0661.2.3.4]", "[tag:x]", "[]"])
def test_bad_address_literals_are_refused(literal):
    assert not valid_mailbox(f"u@{literal}")


# ------------------------------------------------------------------ 3. parsed once, strictly


@pytest.mark.parametrize("space", UNICODE_SPACES)
def test_unicode_whitespace_in_a_recipient_is_a_syntax_error(space):
    s = make()
    s.receive(f"EHLO c\r\nMAIL FROM:<a@b.example> SMTPUTF8\r\n"
              f"RCPT TO:<user@example.com{space}>\r\nRCPT TO:<us{space}er@example.com>\r\n"
              f"RCPT TO:<user@exa{space}mple.com>\r\n".encode())
    assert codes(s) == [250, 250, 501, 501, 501]
    assert s.txn is not None and s.txn.recipients == []


def test_unicode_whitespace_around_a_path_is_not_trimmed_away():
    s = make()
    s.receive("EHLO c\r\nMAIL FROM:<a@b.example> SMTPUTF8\u3000\r\n".encode())
    assert codes(s) == [250, 501]


def test_utf8_addresses_still_work():
    s = make()
    s.receive("EHLO c\r\nMAIL FROM:<j\u00f6rg@b\u00fccher.example> SMTPUTF8\r\n"
              "RCPT TO:<\u00e9l\u00e8ve@example.com>\r\n".encode())
    assert codes(s) == [250, 250, 250]


# ------------------------------------------------------------------ 4. routed addresses

ROUTED = ["user%other.net@example.com", "other.net!user@example.com",
          '"user@other.net"@example.com', '"us\\er@other.net"@example.com']


@pytest.mark.parametrize("rcpt", ROUTED)
def test_routed_recipient_from_an_outside_client_is_550_5_7_1(rcpt):
    s = make()
    s.receive(f"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<{rcpt}>\r\n".encode())
    got = ReplyParser().feed(s.take_output())
    assert [r.code for r in got] == [250, 250, 550]
    assert got[2].enhanced == (5, 7, 1)


@pytest.mark.parametrize("rcpt", ROUTED)
def test_routed_recipient_from_relay_networks_or_when_allowed_is_accepted(rcpt):
    for s in (make(client_ip="10.0.0.5", relay=True),
              make(policy=SessionPolicy(routed_reject=False))):
        s.receive(f"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<{rcpt}>\r\n".encode())
        assert codes(s) == [250, 250, 250]
        assert s.txn is not None and s.txn.recipients == [rcpt]


# ------------------------------------------------------------------ 5. HELO and Received:

FORGED_HELO = ("a.example (b.example [192.0.2.7]) by trusted.example; "
               "Mon, 1 Jan 2024 00:00:00 +0000")


@pytest.mark.parametrize("verb", ["HELO", "EHLO"])
@pytest.mark.parametrize("arg", [FORGED_HELO, "a b", "x;y", "(x)", "a..b", "-a.example",
                                 "x\u00a0", "[1.2.3.4", "[IPv6:zz]"])
def test_helo_must_be_a_domain_or_address_literal(verb, arg):
    s = make()
    s.receive(f"{verb} {arg}\r\nMAIL FROM:<a@b.example>\r\n".encode())
    got = ReplyParser().feed(s.take_output())
    assert [r.code for r in got] == [501, 503]
    assert s.helo is None


@pytest.mark.parametrize("arg", ["client.example", "localhost", "[192.0.2.7]",
                                 "[IPv6:2001:db8::1]", "[ipv6:::1]", "DESKTOP_12AB",
                                 "mx.example.", "b\u00fccher.example"])
def test_usual_helo_arguments_are_accepted(arg):
    assert valid_helo(arg)
    s = make()
    s.receive(f"EHLO {arg}\r\n".encode())
    assert codes(s) == [250]


def _received(helo: str, rcpt: str = "u@example.com") -> str:
    return received_header(helo=helo, client_ip="192.0.2.7", client_port=4000,
                           hostname="mx.test", protocol="ESMTP", ident="q1",
                           recipients=[rcpt], tls=None, proxy_ip=None,
                           proxy_version=None).decode()


def test_forged_helo_accepted_by_policy_cannot_add_a_received_clause():
    s = make(policy=SessionPolicy(helo_reject=False))
    s.receive(f"HELO {FORGED_HELO}\r\n".encode())
    assert codes(s) == [250] and s.helo == FORGED_HELO
    h = _received(FORGED_HELO)
    assert h.count(";") == 1 and h.count("(") == h.count(")") == 2  # ours: (port…), (ferrymail)
    assert " by trusted.example" not in h and "by mx.test (ferrymail)" in h
    assert h.startswith("Received: from [192.0.2.7] (port 4000 helo=a.example%20%28b.example")


@given(st.text(max_size=80))
def test_no_helo_and_no_recipient_can_add_a_received_clause(text):
    h = _received(text, rcpt=f'"{text}"@example.com' if text else "u@example.com")
    assert h.count(";") == 1 and h.count("(") == h.count(")")
    assert h.count("by ") == 1 and h.count("\r\n") == h.count("\r\n\t") + 1
    assert all(c.isprintable() or c in "\t\r\n" for c in h)


# ------------------------------------------------------------------ 6. bare LF


@pytest.mark.parametrize("split", [False, True])
def test_bare_lf_ends_no_command(split):
    s = make()
    data = b"EHLO x\nMAIL FROM:<a@b.example>\nRCPT TO:<r@example.com>\n"
    event = None
    for chunk in ([data[:7], data[7:]] if split else [data]):
        event = s.receive(chunk) or event
    got = ReplyParser().feed(s.take_output())
    assert [r.code for r in got] == [521]
    assert "bare LF" in got[0].text and isinstance(event, Close) and s.closed
    assert s.helo is None and s.txn is None


def test_bare_lf_after_good_commands_keeps_their_replies():
    s = make()
    event = s.receive(b"EHLO x\r\nNOOP\nRSET\r\n")
    assert codes(s) == [250, 521] and isinstance(event, Close)


def test_bare_lf_policy_accept_takes_lf_as_line_end():
    s = make(policy=SessionPolicy(bare_newline_reject=False))
    s.receive(b"EHLO x\nMAIL FROM:<a@b.example>\n")
    assert codes(s) == [250, 250]


# ------------------------------------------------------------------ property: whole session

_FRAGMENTS = [
    b"EHLO c\r\n", b"HELO c.example\r\n", b"MAIL FROM:<a@b.example>\r\n",
    b"MAIL FROM:<> SMTPUTF8\r\n", b"RCPT TO:<r@example.com>\r\n",
    b"RCPT TO:<r@other.example>\r\n", b"RCPT TO:<u%h@example.com>\r\n",
    b"DATA\r\n", b"hello\r\n", b".\r\n", b"\r\n.\r\n", b"BDAT 3\r\n", b"BDAT 0 LAST\r\n",
    b"BDAT 5 LAST\r\nabcde", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"STARTTLS\r\n",
    b"\r", b"\n", b"\x00", b"\xff", b"SIZE=", b" ", b"<", b">", b"@", b"[IPv6:::1]",
    b"..", b".", b"\"", b"\\",
]
_UNICODE = NON_ASCII_DIGITS + UNICODE_SPACES + ["\u00e9", "\ud7ff", "\U0001f600"]


def _fragment() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(_FRAGMENTS),
        st.sampled_from(_UNICODE).map(lambda c: c.encode("utf-8")),
        st.sampled_from(["MAIL FROM:<a@b.example> SIZE={}\r\n", "BDAT {} LAST\r\n",
                         "RCPT TO:<u@example.com{}>\r\n", "EHLO {}\r\n",
                         "MAIL FROM:<x@[IPv6:{}]>\r\n"]).flatmap(
            lambda t: st.sampled_from([*_UNICODE, "12", "0", "::1"]).map(
                lambda c: t.format(c).encode("utf-8"))),
        st.binary(max_size=12),
    )


@st.composite
def _transaction(draw) -> bytes:
    """A whole transaction (DATA or BDAT) with arbitrary fragments woven in."""
    parts = [draw(st.sampled_from([b"EHLO c\r\n", b"HELO c.example\r\n", b""])),
             draw(st.sampled_from([b"MAIL FROM:<a@b.example>\r\n",
                                   "MAIL FROM:<j\u00f6@b.example> SMTPUTF8\r\n".encode()]))]
    parts += draw(st.lists(st.sampled_from(
        [b"RCPT TO:<r@example.com>\r\n", b"RCPT TO:<s@EXAMPLE.com>\r\n",
         b"RCPT TO:<t@relay.example>\r\n", b"RCPT TO:<postmaster@[IPv6:::1]>\r\n",
         b'RCPT TO:<"q@x"@example.com>\r\n',
         "RCPT TO:<r@example.com\u00a0>\r\n".encode()]), min_size=1, max_size=4))
    body = b"".join(draw(st.lists(_fragment(), max_size=4)))
    if draw(st.booleans()):
        parts += [b"DATA\r\n", body, b"\r\n.\r\n"]
    else:
        parts += [f"BDAT {len(body)} LAST\r\n".encode(), body]
    for _ in range(draw(st.integers(0, 2))):
        parts.insert(draw(st.integers(0, len(parts))), draw(_fragment()))
    return b"".join(parts)


@st.composite
def _stream(draw) -> list[bytes]:
    data = b"".join(draw(st.lists(st.one_of(_fragment(), _transaction()), max_size=30)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks, last = [], 0
    for c in [*cuts, len(data)]:
        chunks.append(data[last:c])
        last = c
    return [c for c in chunks if c]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=_stream(), relay=st.booleans(), bare_lf_reject=st.booleans(),
       helo_reject=st.booleans())
def test_no_client_bytes_raise_lose_a_250_or_store_an_unjudged_address(
        chunks, relay, bare_lf_reject, helo_reject):
    judged: list[str] = []

    def policy(domain: str, ip: str) -> bool:
        judged.append(domain)
        return domain == OUR or relay

    settings_ = SessionSettings(
        "mx.test", SessionLimits(line_length=512, message_size=200, recipients=3, errors=50),
        starttls=True, policy=SessionPolicy(bare_newline_reject=bare_lf_reject,
                                            helo_reject=helo_reject))
    s = ServerSession(settings_, policy, "192.0.2.7", may_relay=lambda ip: relay)
    out = bytearray()
    stored: list[str] = []
    for chunk in chunks:
        event = s.receive(chunk)
        while True:
            out += s.take_output()
            if isinstance(event, Deliver):
                txn = event.transaction
                for rcpt in txn.recipients:
                    domain = rcpt.rpartition("@")[2].lower()
                    assert domain in judged, (rcpt, judged)
                    assert valid_mailbox(rcpt) and parse_path(f"TO:<{rcpt}>", "TO",
                                                              allow_null=False)[0] == rcpt
                    assert not any(unicodedata.category(c)[0] in "ZC" for c in rcpt
                                   if not c.isascii())
                    assert "\r" not in rcpt and "\n" not in rcpt and "\0" not in rcpt
                qid = f"Q{len(stored)}"
                stored.append(qid)
                s.finish_delivery(f"250 2.0.0 OK queued as {qid}\r\n".encode(), queued=True)
                event = s.step()
                continue
            if isinstance(event, StartTLS):
                s.tls_started()
                event = s.step()
                continue
            break
        if s.closed:
            break
    out += s.take_output()
    note_event(f"stored {min(len(stored), 2)}+")
    assert s.internal_error is None
    replies = ReplyParser().feed(bytes(out))  # every reply is well-formed
    sent = [r.text for r in replies if r.code == 250 and "queued as" in r.text]
    assert [t.split()[-1] for t in sent] == stored  # each stored message's 250, in order
