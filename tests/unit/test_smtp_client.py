"""The client's pure parts: pipelined reply matching, deciding replies, MAIL parameters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferrymail.delivery import DeliveryError, ProxyRoute, Source
from ferrymail.delivery.connect import describe_path, proxy_header
from ferrymail.delivery.errors import SMTPReplyError
from ferrymail.smtp.client import (
    TLSMode,
    TransactionResult,
    decide,
    match_pipelined,
    transaction_parameters,
)
from ferrymail.smtp.protocol import Reply, ReplyParser, SMTPProtocolError

OK = Reply(250, ("ok",), (2, 0, 0))
GO = Reply(354, ("go ahead",))
NO_USER = Reply(550, ("no such user",), (5, 1, 1))
LATER = Reply(451, ("later",), (4, 3, 0))
CLOSING = Reply(421, ("closing",), (4, 3, 2))
NEED_MAIL = Reply(503, ("need MAIL",), (5, 5, 1))
QUEUED = Reply(250, ("queued as 1",), (2, 0, 0))
RCPTS = ("a@x.example", "b@x.example", "c@x.example")


def test_match_pipelined_in_order():
    mail, rcpts, data = match_pipelined([OK, OK, NO_USER, OK, GO], 3)
    assert mail is OK and rcpts == (OK, NO_USER, OK) and data is GO


def test_match_pipelined_421_stands_for_the_rest():
    mail, rcpts, data = match_pipelined([OK, OK, CLOSING], 3)
    assert mail is OK and rcpts == (OK, CLOSING, CLOSING) and data is CLOSING
    mail, rcpts, data = match_pipelined([CLOSING], 1)
    assert mail is CLOSING and rcpts == (CLOSING,) and data is CLOSING


def test_match_pipelined_too_few_replies():
    with pytest.raises(ValueError):
        match_pipelined([OK, OK], 1)


def test_decide_states_and_reply_for():
    r = decide(RCPTS, OK, [OK, NO_USER, OK], GO, QUEUED)
    assert r.state == "EOD" and r.reply is QUEUED and r.data is QUEUED
    assert r.reply_for("a@x.example") is QUEUED and r.reply_for("b@x.example") is NO_USER
    assert r.accepted == ("a@x.example", "c@x.example")

    r = decide(RCPTS, OK, [OK, NO_USER, OK], GO, NO_USER)
    assert r.state == "EOD" and r.accepted == () and r.reply_for("a@x.example") is NO_USER

    r = decide(RCPTS, OK, [NO_USER, LATER, NO_USER], NEED_MAIL)
    assert r.state == "RCPT" and r.data is None and r.reply is NO_USER
    assert r.reply_for("b@x.example") is LATER

    r = decide(RCPTS, OK, [OK, OK, OK], LATER)
    assert r.state == "DATA" and r.reply is LATER and r.reply_for("c@x.example") is LATER

    r = decide(RCPTS, LATER, [NEED_MAIL] * 3, NEED_MAIL)
    assert r.state == "MAIL" and r.reply is LATER
    assert all(r.reply_for(a) is LATER for a in RCPTS)

    r = decide(RCPTS, NO_USER)  # lock-step: nothing after MAIL
    assert r.state == "MAIL" and r.recipients == () and r.reply_for("a@x.example") is NO_USER
    with pytest.raises(KeyError):
        decide(RCPTS, OK, [OK] * 3, GO, QUEUED).reply_for("z@x.example")


def test_replies_no_command_may_get_are_protocol_errors():
    with pytest.raises(SMTPProtocolError, match="unexpected reply to DATA"):
        decide(RCPTS, OK, [OK] * 3, OK)  # 250 to DATA: the message was never sent
    with pytest.raises(SMTPProtocolError, match="unexpected reply to RCPT"):
        decide(RCPTS, OK, [OK, GO, OK], GO, QUEUED)
    with pytest.raises(SMTPProtocolError, match="unexpected reply to EOD"):
        decide(RCPTS, OK, [OK] * 3, GO, GO)


def test_result_for_an_unfinished_recipient_list_is_rcpt():
    r = decide(RCPTS, OK, [OK])  # lock-step stopped early (421 filled in by the caller)
    assert r.state == "RCPT"


_CODES = st.sampled_from([250, 251, 354, 421, 450, 451, 452, 503, 550, 552, 554])


@given(mail=_CODES, rcpts=st.lists(_CODES, min_size=1, max_size=6), data=_CODES, eod=_CODES)
def test_pipelined_outcomes_property(mail, rcpts, data, eod):
    replies = [Reply(c) for c in (mail, *rcpts, data)]
    names = [f"r{i}@x.example" for i in range(len(rcpts))]
    m, rs, d = match_pipelined(replies, len(rcpts))
    codes = [m.code, *(x.code for x in rs), d.code]
    if 421 in codes:
        first = codes.index(421)
        assert all(c == 421 for c in codes[first:])
    if any(c // 100 == 3 for c in codes[:-1]) or d.code // 100 == 2 or eod == 354:
        # replies no command may get are protocol errors, never results
        with pytest.raises(SMTPProtocolError):
            decide(names, m, rs, d, Reply(eod))
        return
    result = decide(names, m, rs, d, Reply(eod))
    for name, rr in zip(names, rs, strict=True):
        eff = result.reply_for(name).code
        if not 200 <= m.code < 300:
            assert eff == m.code and result.state == "MAIL"
        elif not 200 <= rr.code < 300:
            assert eff == rr.code
        elif d.code != 354:
            assert eff == d.code and result.state == "DATA"
        else:
            assert eff == eod and result.state == "EOD"
    assert bool(result.accepted) == (result.state == "EOD" and 200 <= eod < 300)


# --------------------------------------------------------------------------- MAIL parameters


def test_transaction_parameters():
    assert transaction_parameters({}, "a@x", ["b@x"], b"hi\r\n") == {}
    ext = {"SIZE": "1000", "8BITMIME": "", "SMTPUTF8": ""}
    assert transaction_parameters(ext, "a@x", ["b@x"], b"hi\r\n") == {"SIZE": "4"}
    assert transaction_parameters({"SIZE": ""}, "a@x", ["b@x"], b"hi\r\n") == {"SIZE": "4"}
    assert transaction_parameters(ext, "\u00e4@x", ["b@x"], b"h\xc3\xa4\r\n",
                                  {"RET": "HDRS"}) == {"SIZE": "5", "BODY": "8BITMIME",
                                                       "SMTPUTF8": "", "RET": "HDRS"}
    assert transaction_parameters({"SIZE": "0"}, "a@x", ["b@x"], b"x" * 5000) == {"SIZE": "5000"}


@pytest.mark.parametrize(("ext", "sender", "rcpts", "data", "words"), [
    ({"SIZE": "10"}, "a@x", ["b@x"], b"x" * 11, "exceeds the 10-byte size limit"),
    ({}, "a@x", ["b@x"], b"\xff\r\n", "8BITMIME"),
    ({"8BITMIME": ""}, "a@x", ["\u00fc@x"], b"hi\r\n", "SMTPUTF8"),
])
def test_transaction_parameters_refusals(ext, sender, rcpts, data, words):
    with pytest.raises(DeliveryError) as ei:
        transaction_parameters(ext, sender, rcpts, data, peer="mx.example [192.0.2.1]:25")
    e = ei.value
    assert e.kind == "protocol" and not e.temporary
    assert words in e.message and "mx.example [192.0.2.1]:25" in e.message


# --------------------------------------------------------------------------- small pieces


def test_tls_modes():
    assert TLSMode("optional_verify") is TLSMode.OPTIONAL_VERIFY
    assert [m.required for m in TLSMode] == [False, False, False, True, True]
    assert [m.verify for m in TLSMode] == [False, False, True, False, True]
    with pytest.raises(ValueError):
        TLSMode("dane")


def test_errors_carry_kind_and_refuse_unknown_kinds():
    e = DeliveryError("proxy", "EOF before banner via proxy 127.0.0.1:2525")
    assert e.temporary and str(e) == e.message and e.dns is None
    assert e.as_dict() == {"temporary": True, "message": e.message, "type": "proxy"}
    d = DeliveryError("dns", "gone", temporary=False, dns="nxdomain")
    assert d.as_dict()["dns"] == "nxdomain" and "nxdomain" in repr(d)
    with pytest.raises(ValueError):
        DeliveryError("weird", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DeliveryError("dns", "x", dns="odd")  # type: ignore[arg-type]
    s = SMTPReplyError(Reply(554, ("no",)), "CONNECT")
    assert s.kind == "smtp" and not s.temporary and s.state == "CONNECT"
    assert SMTPReplyError(Reply(421), "EHLO").temporary


def test_proxy_header_and_path_description():
    src = Source("127.0.0.5", "h", proxy=ProxyRoute("127.0.0.1", 2525, 1))
    assert proxy_header(src, "127.0.0.3", 25) == b"PROXY TCP4 127.0.0.5 127.0.0.3 0 25\r\n"
    v2 = Source("2001:db8::5", "h", proxy=ProxyRoute("::1", 2525, 2))
    header = proxy_header(v2, "2001:db8::25", 25)
    assert header[12:14] == b"\x21\x21" and len(header) == 52
    assert describe_path(src, "127.0.0.3", 25, "mx.example") == (
        "from source 127.0.0.5 to mx.example [127.0.0.3]:25 via proxy 127.0.0.1:2525")
    assert describe_path(Source(None, "h"), "::1", 25) == "from source (any) to [::1]:25"


def test_reply_parser_pending():
    p = ReplyParser()
    assert not p.pending
    p.feed(b"250-a\r\n")
    assert p.pending
    p.feed(b"250 b\r\n25")
    assert p.pending
    p.feed(b"0 c\r\n")
    assert not p.pending


def test_transaction_result_is_frozen():
    r = TransactionResult(OK, (), None, "MAIL")
    with pytest.raises(AttributeError):
        r.state = "EOD"  # type: ignore[misc]
