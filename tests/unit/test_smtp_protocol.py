"""The sans-IO SMTP core: replies, commands, paths, DATA (un)stuffing and smuggling refusal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferrymail.smtp.protocol import (
    DataDecoder,
    LineTooLong,
    Reply,
    ReplyParser,
    SMTPProtocolError,
    dot_stuff,
    format_reply,
    mail_command,
    parse_command,
    parse_ehlo,
    parse_path,
    rcpt_command,
    split_command,
    take_line,
    valid_mailbox,
)
from ferrymail.smtp.protocol import _valid_mailbox as uncached_valid_mailbox


def test_format_reply_multiline():
    assert format_reply(250, ["a", "b", "c"]) == b"250-a\r\n250-b\r\n250 c\r\n"
    assert format_reply(221, "bye") == b"221 bye\r\n"


def test_reply_parser_multiline_and_enhanced():
    p = ReplyParser()
    assert p.feed(b"250-mx.example ESMTP\r\n250-PIPELINING\r\n250 SIZE 100") == []
    (r,) = p.feed(b"\r\n")
    assert r.code == 250 and r.lines == ("mx.example ESMTP", "PIPELINING", "SIZE 100")
    assert parse_ehlo(r) == {"PIPELINING": "", "SIZE": "100"}
    (r,) = p.feed(b"550-5.7.1 first\r\n550 5.7.1 second\r\n")
    assert r.enhanced == (5, 7, 1) and r.lines == ("first", "second") and r.permanent


def test_reply_parser_byte_at_a_time():
    data = b"220 hi\r\n250-2.1.0 a\r\n250 2.1.0 ok\r\n"
    p = ReplyParser()
    out = []
    for i in range(len(data)):
        out += p.feed(data[i : i + 1])
    assert [r.code for r in out] == [220, 250]
    assert out[1].enhanced == (2, 1, 0)


def test_enhanced_class_must_match_code():
    (r,) = ReplyParser().feed(b"250 5.0.0 odd\r\n")
    assert r.enhanced is None and r.lines == ("5.0.0 odd",)


@pytest.mark.parametrize("bad", [b"abc\r\n", b"25\r\n", b"250x\r\n", b"999 x\r\n"])
def test_reply_parser_rejects_malformed(bad):
    with pytest.raises(SMTPProtocolError):
        ReplyParser().feed(bad)


def test_reply_parser_bounds_line():
    with pytest.raises(LineTooLong):
        ReplyParser().feed(b"250 " + b"x" * 5000)


def test_reply_roundtrip():
    r = Reply(451, ("try", "later"), (4, 3, 0))
    (back,) = ReplyParser().feed(r.to_bytes())
    assert back == r


def test_take_line_and_limits():
    buf = bytearray(b"EHLO a\r\nMAIL FROM:<>\r\npartial")
    line, pos = take_line(buf, 0, 512)
    assert line == b"EHLO a"
    line, pos = take_line(buf, pos, 512)
    assert line == b"MAIL FROM:<>"
    assert take_line(buf, pos, 512) == (None, pos)
    with pytest.raises(LineTooLong):
        take_line(bytearray(b"x" * 600), 0, 512)
    with pytest.raises(LineTooLong):
        take_line(bytearray(b"x" * 600 + b"\r\n"), 0, 512)


def test_parse_command():
    assert parse_command(b"mail FROM:<a@b.c> SIZE=10").verb == "MAIL"
    assert parse_command(b"QUIT").arg == ""
    with pytest.raises(SMTPProtocolError):
        parse_command(b"\xff\xfe")
    with pytest.raises(SMTPProtocolError):
        parse_command(b"NOOP \x00")


def test_parse_path_variants():
    assert parse_path("FROM:<>", "FROM", allow_null=True) == ("", {})
    assert parse_path("from: <a@b.example> SIZE=12 BODY=8BITMIME SMTPUTF8", "FROM",
                      allow_null=True) == ("a@b.example", {"SIZE": "12", "BODY": "8BITMIME",
                                                           "SMTPUTF8": ""})
    assert parse_path("TO:<@relay.example:u@d.example>", "TO", allow_null=False)[0] == "u@d.example"
    assert parse_path('TO:<"odd >name"@d.example>', "TO", allow_null=False)[0] == \
        '"odd >name"@d.example'
    assert parse_path("TO:<user@[192.0.2.1]>", "TO", allow_null=False)[0] == "user@[192.0.2.1]"
    assert parse_path("TO:<jösé@exämple.de>", "TO", allow_null=False)[0] == "jösé@exämple.de"


@pytest.mark.parametrize("arg", ["FROM:a@b", "FROM:<a@b", "TO:<>", "FROM:<a b@c>",
                                 "FROM:<@x>", "FROM:<a@b>junk", "FROM:<a@b> =x", "FROM:<a@>",
                                 "FROM:<a..b@c>"])
def test_parse_path_rejects(arg):
    kw = arg.split(":")[0]
    with pytest.raises(SMTPProtocolError):
        parse_path(arg, kw, allow_null=kw == "FROM")


def test_valid_mailbox():
    assert valid_mailbox("a.b+c@example.com")
    assert not valid_mailbox("no-at-sign")
    assert not valid_mailbox("a@-bad-.com")


@given(st.text(max_size=40)
       | st.from_regex(r"[a-z.\"]{1,8}@[a-z-]{1,8}\.[a-z]{2,3}", fullmatch=True))
def test_valid_mailbox_answers_the_same_when_asked_again(address):
    # valid_mailbox remembers its answers: the second (cached) one must equal the first.
    first = valid_mailbox(address)
    assert first == uncached_valid_mailbox(address)
    assert valid_mailbox(address) == first


def test_valid_mailbox_memory_is_bounded():
    from ferrymail.smtp import protocol

    for i in range(protocol._MAILBOX_CACHE_MAX + 10):
        assert valid_mailbox(f"u{i}@example.com")
    assert len(protocol._MAILBOX_CACHE) <= protocol._MAILBOX_CACHE_MAX
    assert not valid_mailbox("x" * 400 + "@example.com")
    assert "x" * 400 + "@example.com" not in protocol._MAILBOX_CACHE


@given(st.binary(max_size=40))
def test_split_command_agrees_with_parse_command(line):
    try:
        cmd = parse_command(line)
    except SMTPProtocolError:
        with pytest.raises(SMTPProtocolError):
            split_command(line)
        return
    assert split_command(line) == (cmd.verb, cmd.arg)
    assert split_command(bytearray(line)) == (cmd.verb, cmd.arg)


@given(st.text(alphabet='ab@.<>" \\', max_size=20))
def test_path_with_and_without_quotes_finds_the_same_bracket(middle):
    # Without a double quote the closing ">" is found by str.find; with one, by the scanner.
    arg = f"TO:<{middle}>"
    try:
        got = parse_path(arg, "TO", allow_null=False)
    except SMTPProtocolError:
        got = None
    if '"' not in middle and ">" in middle:
        assert got is None or got[0] == middle[:middle.index(">")]


def test_commands_refuse_injection():
    assert mail_command("a@b", {"SIZE": "5"}) == b"MAIL FROM:<a@b> SIZE=5\r\n"
    assert rcpt_command("x@y") == b"RCPT TO:<x@y>\r\n"
    with pytest.raises(SMTPProtocolError):
        rcpt_command("x@y>\r\nRSET")


def decode_all(chunks, max_size=10_000_000):
    d = DataDecoder(max_size)
    for c in chunks:
        res = d.feed(c)
        if res is not None:
            return d, res
    return d, None


def test_data_simple_and_leftover():
    d, res = decode_all([b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n"])
    assert res == (b"Subject: x\r\n\r\n.dot\r\n", b"QUIT\r\n")
    assert not DataDecoder.bare_line_ending(res[0])


def test_data_empty_body():
    _, res = decode_all([b".\r\n"])
    assert res == (b"", b"")


def test_data_leading_dot_first_line():
    _, res = decode_all([b"..x\r\n.\r\n"])
    assert res[0] == b".x\r\n"


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"])
def test_smuggling_variants_are_not_end_of_data(smuggle):
    payload = b"Subject: a\r\n\r\nhi" + smuggle + b"MAIL FROM:<evil@x>\r\n"
    d, res = decode_all([payload])
    assert res is None  # not taken as the end
    d2, res = decode_all([payload + b"\r\n.\r\n"])
    assert res is not None and DataDecoder.bare_line_ending(res[0])


def test_data_oversize_consumed_but_dropped():
    d = DataDecoder(100)
    for _ in range(50):
        assert d.feed(b"x" * 50 + b"\r\n") is None
    body, rest = d.feed(b".\r\nNOOP\r\n")
    assert d.oversize and body == b"" and rest == b"NOOP\r\n"


def test_data_oversize_terminator_split_across_chunks():
    d = DataDecoder(10)
    assert d.feed(b"y" * 100 + b"\r\n.") is None
    assert d.feed(b"\r") is None
    assert d.feed(b"\nRSET\r\n") == (b"", b"RSET\r\n")


def test_dot_stuff():
    assert dot_stuff(b".a\r\nb\r\n.\r\n") == b"..a\r\nb\r\n..\r\n.\r\n"
    assert dot_stuff(b"no newline") == b"no newline\r\n.\r\n"


lines = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                 max_size=20)


@given(lines, st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=50))
def test_stuff_then_decode_roundtrip_any_chunking(body_lines, cuts):
    body = b"".join(line + b"\r\n" for line in body_lines)
    wire = dot_stuff(body) + b"NEXT"
    chunks, pos, i = [], 0, 0
    while pos < len(wire):
        n = cuts[i % len(cuts)]
        chunks.append(wire[pos : pos + n])
        pos += n
        i += 1
    d = DataDecoder(10_000_000)
    result = None
    for c in chunks:
        if result is None:
            result = d.feed(c)
        else:
            result = (result[0], result[1] + c)
    assert result == (body, b"NEXT")


@given(st.binary(max_size=300))
def test_decoder_never_raises(data):
    d = DataDecoder(100)
    res = d.feed(data)
    if res is not None:
        assert len(res[1]) <= len(data)


def _bare_reference(body: bytes) -> bool:
    crlf = body.count(b"\r\n")
    return body.count(b"\n") != crlf or body.count(b"\r") != crlf


_wire_bytes = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\r\n.", b".."]),
                       max_size=40).map(b"".join)


@given(_wire_bytes, st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20))
def test_decoder_matches_reference_any_chunking(content, cuts):
    """Terminator, unstuffing and the bare CR/LF verdict do not depend on how data arrives."""
    wire = content + b"\r\n.\r\nREST"
    end = (b"\r\n" + wire).find(b"\r\n.\r\n")  # the first real terminator, virtual CRLF first
    stuffed = (b"\r\n" + wire)[2:end + 2]
    expected = (b"\r\n" + stuffed).replace(b"\r\n.", b"\r\n")[2:]
    d = DataDecoder(10_000_000)
    result, pos, i = None, 0, 0
    while result is None and pos < len(wire):
        n = cuts[i % len(cuts)]
        result = d.feed(wire[pos:pos + n])
        pos, i = pos + n, i + 1
    assert result is not None
    body, rest = result
    assert body == expected
    assert rest + wire[pos:] == wire[end + 3:]
    assert d.size == len(stuffed)
    assert d.bare == _bare_reference(stuffed) == _bare_reference(body)


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"x", b"\n\r"]), max_size=30)
       .map(b"".join))
def test_bare_line_ending_matches_counting(body):
    assert DataDecoder.bare_line_ending(body) == _bare_reference(body)


def test_bare_line_ending_examples():
    assert not DataDecoder.bare_line_ending(b"")
    assert not DataDecoder.bare_line_ending(b"a\r\nb\r\n")
    assert not DataDecoder.bare_line_ending(b"no line end at all")
    for bad in (b"a\rb\r\n", b"a\nb\r\n", b"\n", b"\r", b"a\n\r", b"x\r\n\r"):
        assert DataDecoder.bare_line_ending(bad), bad


def test_data_dot_line_split_across_chunks_is_unstuffed():
    d = DataDecoder(1000)
    assert d.feed(b"a\r") is None
    assert d.feed(b"\n") is None
    assert d.feed(b".") is None
    assert d.feed(b".b\r\n.") is None
    assert d.feed(b"\r\n") == (b"a\r\n.b\r\n", b"")
    assert not d.bare
