"""The sans-IO inbound session: sequencing, pipelining, limits, DATA/BDAT, STARTTLS, smuggling."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.smtp.protocol import Reply, ReplyParser, dot_stuff
from ferrymail.smtp.session import (
    Close,
    Deliver,
    ServerSession,
    SessionLimits,
    SessionSettings,
    StartTLS,
)

OUR_DOMAIN = "example.com"


def policy(domain: str, client_ip: str) -> bool:
    return domain == OUR_DOMAIN or client_ip == "127.0.0.1"


def make(*, tls: bool = False, client_ip: str = "192.0.2.7", **limits: int) -> ServerSession:
    settings_ = SessionSettings("mx.test", SessionLimits(**limits), starttls=tls)
    return ServerSession(settings_, policy, client_ip)


def replies(session: ServerSession) -> list[Reply]:
    return ReplyParser().feed(session.take_output())


def codes(session: ServerSession) -> list[int]:
    return [r.code for r in replies(session)]


def test_banner_and_ehlo_extensions():
    s = make(tls=True)
    assert s.banner() == b"220 mx.test ESMTP ferrymail\r\n"
    assert s.receive(b"EHLO client.test\r\n") is None
    (r,) = replies(s)
    assert r.code == 250 and r.lines[0] == "mx.test"
    assert set(r.lines[1:]) == {"PIPELINING", "SIZE 26214400", "8BITMIME", "SMTPUTF8",
                                "ENHANCEDSTATUSCODES", "CHUNKING", "STARTTLS"}
    assert make().receive(b"EHLO x\r\n") is None


def test_full_transaction_with_dot_unstuffing():
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test> BODY=8BITMIME\r\nRCPT TO:<b@example.com>\r\n")
    assert codes(s) == [250, 250, 250]
    assert s.receive(b"DATA\r\n") is None
    assert replies(s)[0].code == 354 and s.in_data
    event = s.receive(b"Subject: hi\r\n\r\n..leading dot\r\n.\r\n")
    assert isinstance(event, Deliver) and s.busy
    txn = event.transaction
    assert txn.sender == "a@x.test" and txn.recipients == ["b@example.com"]
    assert txn.body == b"Subject: hi\r\n\r\n.leading dot\r\n"
    assert txn.mail_params == {"BODY": "8BITMIME"} and txn.protocol == "ESMTP"
    assert txn.helo == "c"
    s.finish_delivery(b"250 2.0.0 OK queued as q1\r\n", queued=True)
    assert s.step() is None
    assert codes(s) == [250]
    assert s.messages == 1 and s.txn is None and not s.busy


def test_pipelined_batch_is_answered_in_one_output_in_order():
    s = make()
    batch = (b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@example.com>\r\nRCPT TO:<y@foreign.test>\r\n"
             b"RCPT TO:<z@example.com>\r\nDATA\r\n")
    assert s.receive(batch) is None
    assert codes(s) == [250, 250, 250, 554, 250, 354]
    assert s.txn is not None and s.txn.recipients == ["x@example.com", "z@example.com"]


def test_commands_pipelined_after_end_of_data_wait_for_the_store():
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    s.take_output()
    event = s.receive(b"body\r\n.\r\nMAIL FROM:<c@x.test>\r\nRCPT TO:<d@example.com>\r\nQUIT\r\n")
    assert isinstance(event, Deliver)
    assert s.take_output() == b""  # nothing answered before the message is stored
    assert s.receive(b"NOOP\r\n") is None  # still buffered while busy
    s.finish_delivery(b"250 2.0.0 OK queued as q1\r\n", queued=True)
    event = s.step()
    assert isinstance(event, Close) and event.reason == "quit"
    assert codes(s) == [250, 250, 250, 221]  # the NOOP came after QUIT


@pytest.mark.parametrize(
    "commands, expected",
    [
        (b"MAIL FROM:<a@x.test>\r\n", 503),
        (b"RCPT TO:<a@example.com>\r\n", 503),
        (b"DATA\r\n", 503),
        (b"EHLO c\r\nRCPT TO:<a@example.com>\r\n", 503),
        (b"EHLO c\r\nDATA\r\n", 503),
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nDATA\r\n", 503),
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nMAIL FROM:<b@x.test>\r\n", 503),
        (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRSET\r\nRCPT TO:<a@example.com>\r\n", 503),
    ],
)
def test_bad_sequence_is_503(commands, expected):
    s = make()
    s.receive(commands)
    got = replies(s)
    assert got[-1].code == expected and got[-1].enhanced == (5, 5, 1)


def test_helo_then_no_esmtp_parameters():
    s = make()
    s.receive(b"HELO c\r\nMAIL FROM:<a@x.test> SIZE=10\r\nMAIL FROM:<a@x.test>\r\n")
    assert codes(s) == [250, 555, 250]
    assert s.txn is not None and s.txn.protocol == "SMTP"


@pytest.mark.parametrize(
    "line, code",
    [
        (b"EHLO\r\n", 501),
        (b"FOO bar\r\n", 500),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 500),
        (b"\xff\xfe\r\n", 500),
        (b"VRFY someone\r\n", 252),
        (b"EXPN list\r\n", 502),
        (b"HELP\r\n", 214),
        (b"NOOP\r\n", 250),
        (b"RSET\r\n", 250),
        (b"STARTTLS\r\n", 502),  # no certificate configured
        (b"MAIL FROM:a@x.test\r\n", 503),  # no EHLO yet
    ],
)
def test_single_commands(line, code):
    s = make()
    s.receive(line)
    assert codes(s) == [code]
    assert not s.closed


def test_proxy_line_on_direct_session_changes_nothing():
    s = make(client_ip="192.0.2.7")
    s.receive(b"PROXY TCP4 127.0.0.1 127.0.0.1 1000 25\r\nEHLO c\r\nMAIL FROM:<a@x.test>\r\n"
              b"RCPT TO:<b@foreign.test>\r\n")
    assert codes(s) == [500, 250, 250, 554]
    assert s.client_ip == "192.0.2.7"


@pytest.mark.parametrize(
    "param, code",
    [
        ("SIZE=1000", 250),
        ("SIZE=1001", 552),
        ("SIZE=abc", 501),
        ("BODY=7BIT", 250),
        ("BODY=BINARYMIME", 555),
        ("SMTPUTF8", 250),
        ("RET=HDRS ENVID=abc123", 250),
        ("RET=ALL", 501),
        ("FOO=bar", 555),
    ],
)
def test_mail_parameters(param, code):
    s = make(message_size=1000)
    s.receive(f"EHLO c\r\nMAIL FROM:<a@x.test> {param}\r\n".encode())
    got = replies(s)[-1]
    assert got.code == code
    if code == 552:
        assert got.enhanced == (5, 3, 4)


def test_mail_params_are_kept_for_the_envelope():
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test> SMTPUTF8 RET=HDRS ENVID=xyz\r\n")
    assert s.txn is not None
    assert s.txn.mail_params == {"SMTPUTF8": "", "RET": "HDRS", "ENVID": "xyz"}
    assert s.txn.protocol == "UTF8SMTP"


def test_non_ascii_address_needs_smtputf8():
    s = make()
    s.receive("EHLO c\r\nMAIL FROM:<jörg@x.test>\r\nMAIL FROM:<jörg@x.test> SMTPUTF8\r\n"
              "RCPT TO:<bø@example.com>\r\n".encode())
    assert codes(s) == [250, 553, 250, 250]


def test_bad_addresses_are_501():
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<not an address>\r\nMAIL FROM:<a@x.test>\r\n"
              b"RCPT TO:<>\r\nRCPT TO:<@>\r\n")
    assert codes(s) == [250, 501, 250, 501, 501]


def test_relay_policy_uses_the_session_client_ip():
    s = make(client_ip="127.0.0.1")
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@foreign.test>\r\n")
    assert codes(s) == [250, 250, 250]
    s = make(client_ip="45.33.68.55")
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@foreign.test>\r\n"
              b"RCPT TO:<b@EXAMPLE.com>\r\n")
    got = replies(s)
    assert [r.code for r in got] == [250, 250, 554, 250]
    assert got[2].enhanced == (5, 7, 1) and "relay access denied" in got[2].text


def test_too_many_recipients_is_452_and_counts_as_an_error():
    # Issue 7 item 7: RCPT number 1001..10000 got 452 for ever; now each one is an error.
    s = make(recipients=2, errors=3)
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n" + b"".join(
        f"RCPT TO:<r{i}@example.com>\r\n".encode() for i in range(4)))
    got = replies(s)
    assert [r.code for r in got] == [250, 250, 250, 250, 452, 452]
    assert got[-1].enhanced == (4, 5, 3)
    assert not s.closed and s.txn is not None and len(s.txn.recipients) == 2
    event = s.receive(b"RCPT TO:<r9@example.com>\r\nRCPT TO:<r10@example.com>\r\n")
    assert [r.code for r in replies(s)] == [452, 421]
    assert isinstance(event, Close) and s.closed


def test_duplicate_recipient_is_kept_once():
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n"
              b"RCPT TO:<b@example.com>\r\n")
    assert codes(s) == [250, 250, 250, 250]
    assert s.txn is not None and s.txn.recipients == ["b@example.com"]


def test_error_limit_closes_with_421():
    s = make(errors=3)
    event = s.receive(b"BAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\n")
    assert isinstance(event, Close) and event.reason == "too many errors"
    got = replies(s)
    assert [r.code for r in got] == [500, 500, 500, 421]
    assert got[-1].enhanced == (4, 7, 0)
    assert s.closed and s.receive(b"NOOP\r\n") is None and s.take_output() == b""


def test_messages_per_session_limit():
    s = make(messages=1)
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    assert isinstance(s.receive(b"x\r\n.\r\n"), Deliver)
    s.finish_delivery(b"250 2.0.0 OK\r\n", queued=True)
    s.take_output()
    event = s.receive(b"MAIL FROM:<a@x.test>\r\n")
    assert isinstance(event, Close)
    assert replies(s)[0].code == 421


def test_overlong_line_is_refused_and_its_rest_discarded():
    s = make(line_length=512)
    s.receive(b"EHLO c\r\n" + b"NOOP " + b"x" * 600)  # no line end yet
    got = replies(s)
    assert [r.code for r in got] == [250, 500] and got[1].enhanced == (5, 5, 2)
    assert s.buffered == 0  # the excess is not kept
    s.receive(b"y" * 5000)
    s.receive(b"zzz\r\nNOOP\r\n")  # the end of the long line, then a real command
    assert codes(s) == [250]


def test_overlong_line_arriving_whole_is_refused():
    s = make(line_length=512)
    s.receive(b"NOOP " + b"x" * 510 + b"\r\nNOOP\r\n")
    assert codes(s) == [500, 250]
    s.receive(b"NOOP " + b"x" * 505 + b"\r\n")  # exactly 512 with CRLF: allowed
    assert codes(s) == [250]


def test_lines_split_across_feeds():
    s = make()
    for piece in (b"EH", b"LO c\r", b"\nMAIL FROM:<a@x", b".test>\r\n"):
        s.receive(piece)
    assert codes(s) == [250, 250]


def test_body_too_big_is_552_at_end_of_data_and_session_continues():
    s = make(message_size=100)
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    s.take_output()
    for _ in range(10):
        assert s.receive(b"x" * 50 + b"\r\n") is None
    assert s.receive(b".\r\nNOOP\r\n") is None
    got = replies(s)
    assert [r.code for r in got] == [552, 250] and got[0].enhanced == (5, 3, 4)
    assert s.txn is None and not s.in_data


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"],
)
def test_smuggling_variants_are_not_end_of_data_and_refuse_the_message(smuggle):
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    s.take_output()
    payload = (b"Subject: one\r\n\r\nfirst" + smuggle + b"MAIL FROM:<evil@x.test>\r\n"
               b"RCPT TO:<victim@example.com>\r\nDATA\r\nSubject: two\r\n\r\nsecond\r\n")
    assert s.receive(payload) is None  # none of it was taken as end of data or commands
    assert s.take_output() == b"" and s.in_data
    assert s.receive(b".\r\n") is None
    got = replies(s)
    assert [r.code for r in got] == [550]
    assert got[0].enhanced == (5, 6, 11) and "bare CR or LF" in got[0].text
    assert s.txn is None and not s.in_data


def test_bdat_chunks_and_last():
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n")
    s.take_output()
    assert s.receive(b"BDAT 12\r\nSubject: x\r\n") is None
    got = replies(s)
    assert got[0].code == 250 and "12 octets" in got[0].text
    assert s.receive(b"BDAT 8 LAST\r\n\r\nbo") is None and s.in_data
    event = s.receive(b"dy\r\n")
    assert isinstance(event, Deliver)
    assert event.transaction.body == b"Subject: x\r\n\r\nbody\r\n"  # no unstuffing in BDAT
    assert event.transaction.bdat


def test_bdat_pipelined_in_one_feed_with_dots_kept():
    s = make()
    event = s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n"
                      b"BDAT 8\r\n.\r\nabc\r\nBDAT 0 LAST\r\nQUIT\r\n")
    assert isinstance(event, Deliver)
    assert event.transaction.body == b".\r\nabc\r\n"
    assert codes(s) == [250, 250, 250, 250]
    s.finish_delivery(b"250 2.0.0 OK\r\n", queued=True)
    assert isinstance(s.step(), Close)
    assert codes(s) == [250, 221]


def test_bdat_without_transaction_consumes_the_chunk():
    s = make()
    s.receive(b"EHLO c\r\nBDAT 10\r\nMAIL FROM:NOOP\r\n")
    # "MAIL FROM:" was the chunk (discarded), "NOOP" the next command
    assert codes(s) == [250, 503, 250]


def test_bdat_too_big_fails_every_chunk_until_last():
    s = make(message_size=10)
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n")
    s.take_output()
    assert s.receive(b"BDAT 8\r\n12345678BDAT 8\r\n12345678BDAT 2 LAST\r\nab") is None
    assert codes(s) == [250, 552, 552]
    assert s.txn is None
    s.receive(b"MAIL FROM:<a@x.test>\r\n")
    assert codes(s) == [250]


def test_bdat_and_data_cannot_mix():
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nBDAT 3\r\nabc"
              b"DATA\r\n")
    assert codes(s)[-1] == 503


def test_bdat_bare_lf_refused():
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n")
    s.take_output()
    assert s.receive(b"BDAT 6 LAST\r\na\nb\r\n\r") is None
    assert codes(s) == [550]


@pytest.mark.parametrize("arg", [b"", b"x", b"10 MORE", b"-1", b"1 2 3"])
def test_bdat_syntax(arg):
    s = make()
    s.receive(b"EHLO c\r\nBDAT " + arg + b"\r\n")
    assert codes(s)[-1] == 501


def test_starttls_discards_pipelined_plaintext_and_resets():
    s = make(tls=True)
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n")
    s.take_output()
    event = s.receive(b"STARTTLS\r\nRCPT TO:<injected@example.com>\r\n")
    assert isinstance(event, StartTLS)
    assert codes(s) == [220]
    s.receive(b"MORE\r\n")  # buffered while the handshake is pending…
    s.tls_started()  # …and dropped with everything before TLS
    assert s.tls and s.helo is None and s.txn is None and s.buffered == 0
    s.receive(b"MAIL FROM:<a@x.test>\r\nEHLO c\r\nSTARTTLS\r\nMAIL FROM:<a@x.test>\r\n")
    got = replies(s)
    assert [r.code for r in got] == [503, 250, 503, 250]
    assert "STARTTLS" not in got[1].lines
    assert s.txn is not None and s.txn.protocol == "ESMTPS"


def test_quit_closes_and_ignores_the_rest():
    s = make()
    event = s.receive(b"QUIT\r\nNOOP\r\n")
    assert isinstance(event, Close) and event.reason == "quit"
    assert codes(s) == [221]


def test_timeout_and_shutdown_replies():
    s = make()
    assert s.timeout().startswith(b"421 4.4.2")
    assert s.closed
    assert make().shutdown().startswith(b"421 4.3.2")


def test_spool_failure_reply_is_not_counted_as_a_message():
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    s.take_output()
    assert isinstance(s.receive(b"x\r\n.\r\n"), Deliver)
    s.finish_delivery(b"451 4.3.0 temporary spool failure, try again later\r\n", queued=False)
    assert codes(s) == [451] and s.messages == 0 and s.txn is None


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=400).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n")),
       cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8))
def test_data_survives_any_split(body, cuts):
    s = make()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    wire = dot_stuff(body) + b"NOOP\r\n"
    points = sorted({c for c in cuts if c < len(wire)} | {0, len(wire)})
    events = [s.receive(wire[a:b]) for a, b in itertools.pairwise(points)]
    delivered = [e for e in events if e is not None]
    assert len(delivered) == 1 and isinstance(delivered[0], Deliver)
    expected = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
    assert delivered[0].transaction.body == expected
    s.finish_delivery(b"250 2.0.0 OK\r\n", queued=True)
    s.step()
    assert [r.code for r in replies(s)][-2:] == [250, 250]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=6))
def test_arbitrary_input_never_raises(data, cuts):
    s = make(line_length=512, errors=1000)
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        event = s.receive(data[a:b])
        if isinstance(event, Deliver):
            s.finish_delivery(b"250 ok\r\n", queued=True)
            s.step()
        elif isinstance(event, StartTLS):
            s.tls_started()
    s.take_output()


_LINES = [
    b"EHLO c\r\n", b"HELO c\r\n", b"helo\r\n", b"MAIL FROM:<a@x.test>\r\n",
    b"mail from:<a@x.test> SIZE=10\r\n", b"MAIL FROM:<a@x.test> BODY=BAD\r\n",
    b"RCPT TO:<b@example.com>\r\n", b"RCPT TO:<c@elsewhere.test>\r\n", b"RCPT TO:<>\r\n",
    b"DATA\r\n", b"DATA x\r\n", b"hello\r\n.\r\n", b"..dot\r\nx\r\n.\r\n", b"bare\nlf\r\n.\r\n",
    b"BDAT 3\r\nabc", b"BDAT 0 LAST\r\n", b"BDAT 2 LAST\r\nyz", b"BDAT x\r\n", b"RSET\r\n",
    b"NOOP\r\n", b"NOOP\n", b"\r\n", b"\n", b"VRFY\r\n", b"HELP\r\n", b"STARTTLS\r\n",
    b"XYZZY\r\n", b"\xff\xfe\r\n", b"NOOP \x00\r\n", b"NOOP a\rb\r\n", b"X" * 30 + b"\r\n",
    b"NOOP " + b"x" * 40 + b"\r\n", b"QUIT\r\n",
]


def _drive(reads: list[bytes]) -> tuple[bytes, list[object]]:
    """Everything the session answers and does for these reads (stores all succeed)."""
    s = make(line_length=40, errors=50, recipients=2)
    out = []
    seen: list[object] = []
    for data in reads:
        event = s.receive(data)
        while isinstance(event, Deliver):
            seen.append(event.transaction.body)
            s.finish_delivery(b"250 2.0.0 OK queued\r\n", queued=True)
            event = s.step()
        if event is not None:
            seen.append(event)
        out.append(s.take_output())
    seen += [s.commands, s.errors, s.messages, s.closed]
    return b"".join(out), seen


@settings(max_examples=300, deadline=None)
@given(script=st.lists(st.sampled_from(_LINES), max_size=25),
       cuts=st.lists(st.integers(min_value=0, max_value=800), max_size=10))
def test_one_line_per_read_is_the_same_as_any_split(script, cuts):
    # A read holding exactly one command line takes a shortcut past the input buffer; it
    # must answer exactly as the general path does for the same bytes cut anywhere.
    wire = b"".join(script)
    points = sorted({c for c in cuts if c < len(wire)} | {0, len(wire)})
    split = [wire[a:b] for a, b in itertools.pairwise(points)]
    per_line = _drive(script)
    assert per_line == _drive(split)
    assert per_line == _drive([wire[i:i + 1] for i in range(len(wire))])


def test_line_at_the_length_limit_in_one_read():
    s = make(line_length=20)
    s.receive(b"NOOP " + b"x" * 13 + b"\r\n")  # 20 octets with CRLF: allowed
    s.receive(b"NOOP " + b"x" * 14 + b"\r\n")  # 21: refused
    s.receive(b"NOOP\r\nNOOP\r\n")  # two lines in one read
    assert codes(s) == [250, 500, 250, 250]
    assert s.commands == 3


def test_junk_commands_past_the_limit_count_as_errors_and_close():
    """NOOP/RSET/VRFY/HELP cost nothing: past limits.junk_commands each is still answered but
    counts toward limits.errors (Postfix smtpd_junk_command_limit), so a client cannot hold
    its slot forever with them."""
    s = make(junk_commands=3, errors=2)
    event = s.receive(b"EHLO c\r\nNOOP\r\nRSET\r\nVRFY x\r\nHELP\r\n")
    assert codes(s) == [250, 250, 250, 252, 214]
    assert s.errors == 1 and not isinstance(event, Close)
    event = s.receive(b"NOOP\r\nNOOP\r\n")
    assert isinstance(event, Close) and event.reason == "too many errors"
    assert codes(s) == [250, 421]


@pytest.mark.parametrize("queued", [True, False])
def test_junk_count_restarts_after_each_message_sent(queued):
    """A client whose every message is refused at its end (452: spool full) and who sends
    RSET after each, as smtplib does, is working, not idling."""
    s = make(junk_commands=2, errors=1)
    reply = b"250 2.0.0 OK\r\n" if queued else b"452 4.3.1 insufficient system storage\r\n"
    for _ in range(3):  # one RSET per message, 3 in all: past the limit without the restart
        s.receive(b"EHLO c\r\nRSET\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n"
                  b"DATA\r\n")
        event = s.receive(b"Subject: t\r\n\r\nhi\r\n.\r\n")
        assert isinstance(event, Deliver)
        s.finish_delivery(reply, queued=queued)
        assert codes(s)[-1] == int(reply[:3])
    assert s.errors == 0


@pytest.mark.parametrize(("starttls", "tls", "listed"),
                         [(True, False, True), (False, False, False), (True, True, False)])
def test_help_lists_starttls_only_where_ehlo_offers_it(starttls, tls, listed):
    settings_ = SessionSettings("mx.test", SessionLimits(), starttls=starttls)
    s = ServerSession(settings_, policy, "192.0.2.7", tls=tls)
    s.take_output()  # banner
    s.receive(b"EHLO c\r\nHELP\r\n")
    ehlo, help_ = replies(s)
    assert ("STARTTLS" in ehlo.lines) == listed
    assert help_.code == 214 and ("STARTTLS" in help_.lines[0].split()) == listed
