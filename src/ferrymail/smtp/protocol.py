"""Sans-IO SMTP pieces shared by the server and the client: replies, commands, paths, DATA.

Nothing here touches a socket. Parsers work on whole buffers (``bytes.find``/``replace``/
``count``), not one await per line.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from ferrymail.abnf import decimal

CRLF = b"\r\n"
DATA_END = b"\r\n.\r\n"
MAX_REPLY_LINE = 2048  # RFC 5321 says 512; real servers send longer, so be lenient but bounded
MAX_REPLY_LINES = 100

_ENHANCED = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")  # ASCII DIGIT only


class SMTPProtocolError(ValueError):
    """The peer broke the protocol (malformed reply, overlong line, bad path…)."""


class LineTooLong(SMTPProtocolError):
    """A command or reply line exceeded the configured limit."""


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...] = ("",)
    enhanced: tuple[int, int, int] | None = None
    # Codes of the earlier lines of a multi-line reply that disagreed with the last line's
    # (which is the one taken; see ReplyParser). Empty for a well-formed reply.
    mixed_codes: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        enh = ".".join(map(str, self.enhanced)) + " " if self.enhanced else ""
        return f"{self.code} {enh}{' / '.join(self.lines)}".rstrip()

    def to_bytes(self) -> bytes:
        enh = ".".join(map(str, self.enhanced)) + " " if self.enhanced else ""
        return format_reply(self.code, [enh + line for line in self.lines])


def format_reply(code: int, lines: str | list[str]) -> bytes:
    """``250-first\\r\\n250 last\\r\\n``; ``lines`` may be one string."""
    if isinstance(lines, str):
        lines = lines.split("\n")
    if not lines:
        lines = [""]
    out = [f"{code}-{line}\r\n" for line in lines[:-1]]
    out.append(f"{code} {lines[-1]}\r\n")
    return "".join(out).encode("utf-8", "replace")


def split_enhanced(text: str) -> tuple[tuple[int, int, int] | None, str]:
    """Split an RFC 3463 enhanced status code off the front of a reply line."""
    m = _ENHANCED.match(text)
    if not m:
        return None, text
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))), text[m.end():]


class ReplyParser:
    """Incremental reply parser for the client side: ``feed(bytes) -> [Reply, ...]``.

    A multi-line reply whose lines disagree on the code (``250-…`` then ``550 5.1.1 …``)
    takes the last line's code, as tolerant clients do (RFC 5321 §4.2.1 requires the same
    code on every line but gives no rule for a peer that breaks it); the other codes are kept
    in ``Reply.mixed_codes`` for the caller to log. Reading it as a protocol error would turn
    a permanent refusal into days of retries.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._codes: list[int] = []
        self._lines: list[str] = []

    @property
    def pending(self) -> bool:
        """True while part of a reply (a partial line or unfinished multi-line) is buffered."""
        return bool(self._buf or self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        replies: list[Reply] = []
        start = 0
        buf = self._buf
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            raw = bytes(buf[start:end]).rstrip(b"\r")
            start = end + 1
            reply = self._line(raw)
            if reply is not None:
                replies.append(reply)
        del buf[:start]
        if len(buf) > MAX_REPLY_LINE:
            raise LineTooLong(f"reply line longer than {MAX_REPLY_LINE} octets")
        return replies

    def _line(self, raw: bytes) -> Reply | None:
        if len(raw) > MAX_REPLY_LINE:
            raise LineTooLong(f"reply line longer than {MAX_REPLY_LINE} octets")
        code = decimal(raw[:3], max_digits=3)
        if len(raw) < 3 or code is None or (len(raw) > 3 and raw[3:4] not in b" -"):
            raise SMTPProtocolError(f"malformed reply line {raw[:80]!r}")
        if not 200 <= code <= 599:
            raise SMTPProtocolError(f"reply code {code} out of range")
        self._codes.append(code)
        self._lines.append(raw[4:].decode("utf-8", "replace"))
        if len(self._lines) > MAX_REPLY_LINES:
            raise SMTPProtocolError(f"reply longer than {MAX_REPLY_LINES} lines")
        if raw[3:4] == b"-":
            return None
        lines, codes, self._codes, self._lines = self._lines, self._codes, [], []
        mixed = tuple(dict.fromkeys(c for c in codes if c != code))
        # The enhanced code comes from the first line that agrees with the reply code: with
        # mixed codes the earlier lines belong to a reply the peer did not finish.
        first = next(i for i, c in enumerate(codes) if c == code)
        enhanced, _ = split_enhanced(lines[first])
        if enhanced is not None and enhanced[0] == code // 100:
            lines = [split_enhanced(line)[1] if c == code else line
                     for line, c in zip(lines, codes, strict=True)]
        else:
            enhanced = None
        return Reply(code, tuple(lines), enhanced, mixed)


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) to their parameters; the greeting line is skipped."""
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        word, _, params = line.strip().partition(" ")
        if word:
            ext[word.upper()] = params.strip()
    return ext


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Command:
    verb: str
    arg: str


def take_line(buf: bytearray, start: int, limit: int) -> tuple[bytes | None, int]:
    """The next CRLF-terminated line in ``buf`` from ``start`` (without CRLF) and the new start.

    Returns ``(None, start)`` when no complete line is there yet; raises ``LineTooLong`` when
    ``limit`` octets (CRLF included) pass without a line end.
    """
    end = buf.find(b"\n", start)
    if end < 0:
        if len(buf) - start > limit:
            raise LineTooLong(f"line longer than {limit} octets")
        return None, start
    if end + 1 - start > limit:
        raise LineTooLong(f"line longer than {limit} octets")
    line = bytes(buf[start:end])
    if line.endswith(b"\r"):
        line = line[:-1]
    return line, end + 1


def parse_command(line: bytes) -> Command:
    """``b"MAIL FROM:<a@b>"`` -> ``Command("MAIL", "FROM:<a@b>")``."""
    return Command(*split_command(line))


def split_command(line: bytes | bytearray) -> tuple[str, str]:
    """``parse_command`` as a plain ``(verb, arg)`` tuple (the server's hot path)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SMTPProtocolError("command is not valid UTF-8") from exc
    # UTF-8 encodes CR, LF and NUL only as themselves: checking the octets is enough.
    if b"\r" in line or b"\n" in line or b"\0" in line:
        raise SMTPProtocolError("control character in command")
    verb, _, arg = text.partition(" ")
    # Only SP/HTAB are trimmed: str.strip() would also drop Unicode spaces (U+00A0, U+3000)
    # that then survive elsewhere; what is judged must be exactly what is kept.
    return verb.upper(), arg.strip(" \t")


_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
                       r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+)*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"$')
_DOMAIN = re.compile(r"^(?:[A-Za-z0-9\x80-\U0010ffff](?:[A-Za-z0-9\x80-\U0010ffff-]{0,61}"
                     r"[A-Za-z0-9\x80-\U0010ffff])?\.)*[A-Za-z0-9\x80-\U0010ffff]"
                     r"(?:[A-Za-z0-9\x80-\U0010ffff-]{0,61}[A-Za-z0-9\x80-\U0010ffff])?\.?$")


def address_literal(text: str) -> bool:
    """``[1.2.3.4]`` or ``[IPv6:…]`` (RFC 5321 §4.1.3; the tag is case-insensitive, as every
    ABNF literal string is, RFC 5234 §2.3), with a real IPv4/IPv6 address inside."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]" or not text.isascii():
        return False
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(inner[5:])  # ASCII hex digits only, no scope id allowed
        except ValueError:
            return False
        return "%" not in inner
    try:
        ipaddress.IPv4Address(inner)  # ASCII digits only, no leading zeros
    except ValueError:
        return False
    return True


def _unsafe_char(text: str) -> bool:
    """Whether a non-ASCII ``text`` holds a separator or other/control character.

    RFC 6531 admits UTF-8 in addresses, never Unicode spaces (U+00A0, U+3000), line and
    paragraph separators (U+2028/9), format characters or unassigned code points: an
    address holding one would be judged on one spelling and used (DNS, logs) with another.
    """
    return any(not c.isascii() and unicodedata.category(c)[0] in "ZC" for c in text)


def valid_domain(text: str) -> bool:
    """A domain name (RFC 5321 ``Domain``, U-labels allowed per RFC 6531)."""
    if len(text) > 255 or not _DOMAIN.match(text):
        return False
    return text.isascii() or not _unsafe_char(text)


_HELO_DOMAIN = re.compile(r"^[A-Za-z0-9_\x80-\U0010ffff](?:[A-Za-z0-9_\x80-\U0010ffff-]{0,62})"
                          r"(?:\.[A-Za-z0-9_\x80-\U0010ffff](?:[A-Za-z0-9_\x80-\U0010ffff-]{0,62}))*"
                          r"\.?$")


@functools.lru_cache(maxsize=1024)  # a connection's HELO is judged again for each Received:
def valid_helo(text: str) -> bool:
    """A HELO/EHLO argument: a domain or an address literal (RFC 5321 §4.1.1.1).

    Underscores are tolerated in labels (Windows host names use them; Postfix accepts
    them too); spaces, parentheses, ``;`` and anything else that could add a clause to a
    ``Received:`` field are not.
    """
    if len(text) > 255:
        return False
    if address_literal(text):
        return True
    if not _HELO_DOMAIN.match(text):
        return False
    return text.isascii() or not _unsafe_char(text)


def routed_local_part(address: str) -> bool:
    """Whether ``address`` carries sender-specified routing in its local part
    (``user%other@…``, ``other!user@…``, ``"user@other"@…``), as Postfix's
    ``allow_untrusted_routing`` judges it: on the unquoted local part."""
    local = address.rpartition("@")[0]
    if local.startswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return "%" in local or "!" in local or "@" in local


# Addresses already judged by valid_mailbox: clients send the same few over and over.
_MAILBOX_CACHE: dict[str, bool] = {}
_MAILBOX_CACHE_MAX = 2048


def valid_mailbox(address: str) -> bool:
    """``local@domain`` per RFC 5321/6531 (dot-atom or quoted local part, domain or literal)."""
    known = _MAILBOX_CACHE.get(address)
    if known is not None:
        return known
    ok = _valid_mailbox(address)
    if len(address) <= 320:  # never keep what cannot be valid anyway (bounded memory)
        if len(_MAILBOX_CACHE) >= _MAILBOX_CACHE_MAX:
            _MAILBOX_CACHE.clear()
        _MAILBOX_CACHE[address] = ok
    return ok


def _valid_mailbox(address: str) -> bool:
    if len(address) > 320:
        return False
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(local) > 64 * 4:
        return False
    if not (_DOT_ATOM.match(local) or _QUOTED.match(local)):
        return False
    if not local.isascii() and _unsafe_char(local):
        return False
    return valid_domain(domain) or address_literal(domain)


def parse_path(arg: str, keyword: str, *, allow_null: bool) -> tuple[str, dict[str, str]]:
    """Parse ``FROM:<addr> PARAM=value…`` (keyword ``FROM``) or ``TO:<addr> …``.

    Returns the address (``""`` for the null path) and upper-cased ESMTP parameters.
    Source routes (``<@a,@b:user@c>``) are accepted and dropped, as RFC 5321 asks.
    """
    head = keyword + ":"
    if arg[: len(head)].upper() != head:
        raise SMTPProtocolError(f"expected {head}<address>")
    rest = arg[len(head):].lstrip()
    if not rest.startswith("<"):
        raise SMTPProtocolError("address must be enclosed in <>")
    close = _closing_bracket(rest)
    if close < 0:
        raise SMTPProtocolError("unterminated <address>")
    address = rest[1:close]
    params_text = rest[close + 1:]
    if params_text and not params_text.startswith(" "):
        raise SMTPProtocolError("junk after <address>")
    if address.startswith("@"):
        _, colon, address = address.partition(":")
        if not colon:
            raise SMTPProtocolError("malformed source route")
    if address == "":
        if not allow_null:
            raise SMTPProtocolError("null address not allowed here")
    elif not valid_mailbox(address):
        raise SMTPProtocolError(f"syntax error in address <{address}>")
    params: dict[str, str] = {}
    for token in params_text.split(" "):
        if not token:
            continue  # SP only separates (str.split() would also eat Unicode spaces)
        key, eq, value = token.partition("=")
        if (not _ESMTP_KEYWORD.match(key) or (eq and not value)
                or (value and (not value.isprintable() or _unsafe_char(value)))):
            raise SMTPProtocolError(f"malformed parameter {token!r}")
        params[key.upper()] = value if eq else ""
    return address, params


_ESMTP_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")  # RFC 5321 esmtp-keyword


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` closing the path, skipping quoted local parts."""
    if '"' not in text:
        return text.find(">", 1)
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
        i += 1
    return -1


def format_path(address: str) -> str:
    return f"<{address}>"


def mail_command(sender: str, params: dict[str, str] | None = None) -> bytes:
    return _command(f"MAIL FROM:{format_path(sender)}", params)


def rcpt_command(recipient: str, params: dict[str, str] | None = None) -> bytes:
    return _command(f"RCPT TO:{format_path(recipient)}", params)


def _command(text: str, params: dict[str, str] | None) -> bytes:
    if params:
        text += "".join(f" {k}={v}" if v else f" {k}" for k, v in params.items())
    if any(c in text for c in "\r\n\0"):
        raise SMTPProtocolError("control character in command argument")
    return text.encode("utf-8") + CRLF


# --------------------------------------------------------------------------- DATA


_DOT_LINE = b"\r\n."
# bytes.translate tables: CR -> 1 / LF -> 1, every other octet -> 0 (see _bare_line_ending)
_CR_ONLY = bytes(1 if i == 13 else 0 for i in range(256))
_LF_ONLY = bytes(1 if i == 10 else 0 for i in range(256))


def _bare_line_ending(buf: bytes | bytearray, end: int) -> bool:
    """Whether ``buf[:end]``, which must start and end with CRLF, has a bare CR or LF.

    Without one, every CR is followed by an LF and every LF follows a CR: the CR positions
    shifted by one are the LF positions. Two ``translate`` passes (C loops) and a ``memcmp``
    check that, several times faster than counting CRLF, CR and LF separately.
    """
    cr = buf.translate(_CR_ONLY)
    lf = buf.translate(_LF_ONLY)
    with memoryview(cr) as view:
        return not lf.startswith(view[: end - 1], 1)


class DataDecoder:
    """Collects a DATA body from whatever chunks arrive, until ``CRLF.CRLF``.

    Only a real ``<CRLF>.<CRLF>`` ends the body. Bare CR or LF anywhere (which covers every
    SMTP-smuggling end-of-data variant such as ``<LF>.<LF>`` or ``<CR>.<CR>``) is recorded
    (``bare``) and the body is to be refused, never interpreted as an end or as commands.
    Past ``max_size`` the content is dropped (the stream is still consumed to its end).

    Each octet is scanned once for ``CRLF.`` as it arrives (a dot at a line start is either
    stuffing or the end), and the whole body once more for bare line endings at the end.

    With a ``sink``, the body does not pile up: once more than ``spill_at`` octets wait, the
    part known not to hold the end (everything scanned, short of a trailing CR) is unstuffed,
    checked for bare line endings and handed to ``sink(chunk)``; what ``feed`` returns at the
    end is then only the rest. Memory stays O(``spill_at`` + one read), whatever the size.
    """

    __slots__ = ("_buf", "_head", "_scanned", "_stuffed", "bare", "max_size", "oversize",
                 "sink", "size", "spill_at", "spilled")

    def __init__(self, max_size: int, sink: Callable[[bytes], None] | None = None,
                 spill_at: int = 256 * 1024) -> None:
        self.max_size = max_size
        self._buf = bytearray(b"\r\n")  # a virtual CRLF so that an empty body ".\r\n" is found too
        self._head = 2  # octets of that virtual CRLF still in front of _buf
        self._scanned = 0  # where the next "CRLF." may start that has not been looked at
        self._stuffed = False  # a line of the body starts with a dot
        self.size = 0
        self.oversize = False
        self.bare = False  # the finished body has a bare CR or LF
        self.sink = sink
        self.spill_at = spill_at
        self.spilled = 0  # octets handed to the sink (unstuffed)

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[bytes, bytes] | None:
        """Add data; once complete, return ``(body, leftover)``: body unstuffed, CRLF-ended
        (with a sink: the part of it not handed to the sink yet).

        ``body`` is empty when the message was oversize (check ``oversize``).
        """
        buf = self._buf
        buf += data
        n = len(buf)
        pos = self._scanned
        while True:
            idx = buf.find(_DOT_LINE, pos)
            if idx < 0:
                pos = max(pos, n - 2)  # a "CRLF." may still start in the last two octets
                break
            if idx + 5 > n:
                pos = idx  # "CRLF." at the very end: the end of data or stuffing, unknown yet
                break
            if buf[idx + 3] == 13 and buf[idx + 4] == 10:
                return self._finish(idx)
            self._stuffed = True
            pos = idx + 3
        self._scanned = pos
        if self.size + n - self._head > self.max_size:
            # Drop the content but keep the 4-byte tail that may start the terminator.
            self.oversize = True
            self.size += n - 4
            del buf[:-4]
            self._head = 0
            self._scanned = 0
        elif self.sink is not None and n > self.spill_at:
            self._spill(pos)
        return None

    def _spill(self, cut: int) -> None:
        """Hand ``_buf[:cut]`` (scanned: no "CRLF." straddles ``cut``) to the sink."""
        buf = self._buf
        if cut > 0 and buf[cut - 1] == 13:
            cut -= 1  # a CR goes with what follows: its LF decides whether it is bare
        if cut <= self._head:
            return
        with memoryview(buf) as view:
            raw = bytes(view[:cut])
        if not self.bare and self.bare_line_ending(raw[self._head:]):
            self.bare = True
        chunk = raw.replace(_DOT_LINE, CRLF) if self._stuffed else raw
        if self._head:
            chunk = chunk[self._head:]
        self.size += cut - self._head
        self.spilled += len(chunk)
        del buf[:cut]
        self._head = 0
        self._scanned -= cut
        self._stuffed = False
        assert self.sink is not None
        self.sink(chunk)

    def _finish(self, idx: int) -> tuple[bytes, bytes]:
        """``buf[idx:idx + 5]`` is the terminator; ``buf[head:idx + 2]`` the (stuffed) body."""
        buf = self._buf
        head = self._head
        leftover = bytes(buf[idx + 5:])
        self.size += idx + 2 - head
        if self.size > self.max_size:
            self.oversize = True
        if self.oversize:
            return b"", leftover
        end = idx + 2
        if head:
            self.bare = self.bare or _bare_line_ending(buf, end)
        elif not self.bare:
            self.bare = self.bare_line_ending(bytes(buf[:end]))
        with memoryview(buf) as view:
            if self._stuffed:
                # With the virtual CRLF in front, a dot opening the first line goes too.
                body = bytes(view[:end]).replace(_DOT_LINE, CRLF)[head:]
            else:
                body = bytes(view[head:end])
        return body, leftover

    @staticmethod
    def bare_line_ending(body: bytes) -> bool:
        """True if ``body`` has a CR or LF that is not part of a CRLF pair."""
        if not body:
            return False
        framed = b"\r\n" + body + b"\r\n"  # the checker wants CRLF at both ends
        return _bare_line_ending(framed, len(framed))


def dot_stuff(data: bytes) -> bytes:
    """Prepare a message for DATA: line endings normalised to CRLF (`to_crlf`), leading dots
    doubled, ``.CRLF`` appended.

    Every outbound path goes through here, so no bare CR or LF reaches the wire (RFC 5321
    §2.3.8): a ``<LF>.<LF>`` or ``<CR>.<CR>`` in the content becomes a stuffed ``..`` line,
    never an end of data another server could take for one (SMTP smuggling).
    """
    # CRLF only: as many CR as LF, and every CR followed by an LF (then every LF follows a
    # CR). The regular expressions find their literal first octet by a fast scan: about four
    # times quicker on 100 KB than `count(b"\r\n")` and `b"\r\n." in data`.
    if data.count(b"\r") != data.count(b"\n") or _CR_WITHOUT_LF.search(data):
        data = to_crlf(data)
    if data and not data.endswith(CRLF):
        data += CRLF
    if data.startswith(b"."):
        data = b"." + data
    if _CRLF_DOT.search(data):
        data = data.replace(b"\r\n.", b"\r\n..")
    return data + b".\r\n"


_CR_WITHOUT_LF = re.compile(rb"\r(?!\n)")
_CRLF_DOT = re.compile(rb"\r\n\.")


def to_crlf(data: bytes) -> bytes:
    """Normalise every line ending, CRLF, bare LF or bare CR, to CRLF.

    A bare CR ends a line too (``a\\rb`` becomes ``a\\r\\nb``): leaving it would put a bare
    CR on the wire, which RFC 5321 §2.3.8 forbids and some servers read as a line end.
    """
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data.replace(b"\n", b"\r\n")
