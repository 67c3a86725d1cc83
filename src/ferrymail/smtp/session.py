"""The inbound SMTP session as a sans-IO state machine.

``ServerSession.receive(bytes)`` consumes whatever arrived, appends the replies to an output
buffer (``take_output()``), and returns an event when the I/O layer has to act:

* ``Deliver`` — a message is complete; store it, then call ``finish_delivery(reply)``;
* ``StartTLS`` — the 220 is in the output; upgrade the transport, then ``tls_started()``;
* ``Authenticate`` — AUTH credentials (``smtp/auth.py``); check them, then ``finish_auth()``;
* ``Close`` — write the output, then close.

While a ``Deliver`` or ``StartTLS`` is outstanding, input is only buffered (pipelined commands
after end-of-data wait for the store); ``step()`` resumes processing. Every complete command in
the buffer is handled in one call, so a pipelined batch produces one write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ferrymail.abnf import decimal
from ferrymail.smtp import auth as smtp_auth
from ferrymail.smtp.protocol import (
    DataDecoder,
    SMTPProtocolError,
    parse_path,
    routed_local_part,
    split_command,
    valid_helo,
)

# The policy hook: (recipient domain, client ip) -> may this recipient be accepted?
RcptPolicy = Callable[[str, str], bool]
# Whether a client ip is trusted to relay (relay_networks): routed addresses are allowed then.
RelayCheck = Callable[[str], bool]

SPILL_AT = 256 * 1024  # body octets held in memory before they go to the body sink


class BodySink(Protocol):
    """Where a large body goes while it arrives (the spool's ``BodyWriter``): ``write``
    never raises (a failure is reported when the message is stored), ``abort`` drops it."""

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


# (transaction) -> a sink for its body: called once per transaction, when the body first
# grows past the session's spill_at
SpillFactory = Callable[["Transaction"], BodySink]

_CMD, _DATA, _BDAT = 0, 1, 2


def _r(text: str) -> bytes:
    return text.encode() + b"\r\n"


OK = _r("250 2.0.0 OK")
R_SENDER_OK = _r("250 2.1.0 sender OK")
R_RCPT_OK = _r("250 2.1.5 recipient OK")
R_DATA = _r("354 end data with <CR><LF>.<CR><LF>")
R_BYE = _r("221 2.0.0 bye")
R_VRFY = _r("252 2.5.0 cannot VRFY user, but will accept message and attempt delivery")
R_HELP = _r("214 2.0.0 commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP")
R_HELP_STARTTLS = _r(
    "214 2.0.0 commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS")
R_TLS_GO = _r("220 2.0.0 ready to start TLS")
R_UNKNOWN = _r("500 5.5.2 command not recognized")
R_LINE_TOO_LONG = _r("500 5.5.2 line too long")
R_NOT_IMPL = _r("502 5.5.1 command not implemented")
R_NEED_HELO = _r("503 5.5.1 send HELO/EHLO first")
R_NESTED_MAIL = _r("503 5.5.1 sender already specified")
R_NEED_MAIL = _r("503 5.5.1 need MAIL command")
R_NEED_RCPT = _r("503 5.5.1 need RCPT command")
R_MIXED = _r("503 5.5.1 DATA and BDAT cannot be mixed in one transaction")
R_TLS_ACTIVE = _r("503 5.5.1 TLS already active")
R_NO_ARGS = _r("501 5.5.4 no arguments allowed")
R_HELO_ARG = _r("501 5.5.4 domain name required")
R_BDAT_ARG = _r("501 5.5.4 syntax: BDAT <size> [LAST]")
R_TOO_MANY_RCPTS = _r("452 4.5.3 too many recipients")
R_RELAY_DENIED = _r("554 5.7.1 relay access denied")
R_TOO_BIG = _r("552 5.3.4 message size exceeds fixed maximum message size")
R_BARE_LF = _r("550 5.6.11 bare CR or LF not allowed")
R_BARE_LF_COMMAND = _r("521 5.5.2 bare LF received: command lines end with CRLF "
                       "(RFC 5321 2.3.8), closing connection")
R_HELO_SYNTAX = _r("501 5.5.2 HELO/EHLO needs a domain name or an address literal")
R_ROUTED = _r("550 5.7.1 sender-specified routing (%, ! or @ in the local part) not allowed")
R_INTERNAL = _r("421 4.3.0 internal error, closing connection")
R_NEED_UTF8 = _r("553 5.6.7 non-ASCII address requires SMTPUTF8")
R_TOO_MANY_ERRORS = _r("421 4.7.0 too many errors, closing connection")
R_TOO_MANY_MESSAGES = _r("421 4.7.0 too many messages in this session, closing connection")
R_TIMEOUT = _r("421 4.4.2 timeout exceeded, closing connection")
R_SHUTDOWN = _r("421 4.3.2 service shutting down, closing connection")
R_SPOOL_FAIL = _r("451 4.3.0 temporary spool failure, try again later")
R_SPOOL_FULL = _r("452 4.3.1 insufficient system storage, try again later")

_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "ENVID", "RET", "AUTH"})
_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


@dataclass(frozen=True, slots=True)
class SessionLimits:
    line_length: int = 1000  # octets, CRLF included
    message_size: int = 25 * 1024 * 1024
    recipients: int = 100
    errors: int = 10
    messages: int = 100
    # NOOP, RSET, VRFY and HELP past this many (since the last message sent) each count
    # as an error (Postfix smtpd_junk_command_limit): they cost nothing, so without it a
    # client could hold its connection slot forever
    junk_commands: int = 100


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How strictly a session judges what the grammar leaves to policy.

    ``bare_newline_reject``: a command line ending in a bare LF gets 521 and the connection
    closes (Postfix ``smtpd_forbid_bare_newline``); False takes LF as a line end. DATA
    content with a bare CR or LF is refused either way.
    ``helo_reject``: a HELO/EHLO argument that is neither a domain nor an address literal
    gets 501; False accepts it (the ``Received:`` field then records it quoted).
    ``routed_reject``: ``user%host@…``, ``host!user@…`` and ``"user@host"@…`` recipients
    from clients outside relay_networks get 550 5.7.1 (Postfix
    ``allow_untrusted_routing = no``); False accepts them.
    """

    bare_newline_reject: bool = True
    helo_reject: bool = True
    routed_reject: bool = True


@dataclass(frozen=True)
class SessionSettings:
    """What a listener's sessions share; the EHLO replies are built once here."""

    hostname: str
    limits: SessionLimits = field(default_factory=SessionLimits)
    starttls: bool = False  # a certificate is configured
    policy: SessionPolicy = field(default_factory=SessionPolicy)

    def __post_init__(self) -> None:
        base = [self.hostname, "PIPELINING", f"SIZE {self.limits.message_size}", "8BITMIME",
                "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING"]
        plain = base + (["STARTTLS"] if self.starttls else [])
        object.__setattr__(self, "ehlo_plain", _multiline(250, plain))
        object.__setattr__(self, "ehlo_tls", _multiline(250, base))
        # AUTH is offered only under TLS (RFC 4954 §4: no plaintext passwords)
        object.__setattr__(self, "ehlo_tls_auth", _multiline(
            250, [*base, "AUTH " + " ".join(smtp_auth.MECHANISMS)]))
        object.__setattr__(self, "banner", _r(f"220 {self.hostname} ESMTP ferrymail"))
        object.__setattr__(self, "helo_reply", _r(f"250 {self.hostname}"))

    ehlo_plain: bytes = field(init=False, repr=False)
    ehlo_tls: bytes = field(init=False, repr=False)
    ehlo_tls_auth: bytes = field(init=False, repr=False)
    banner: bytes = field(init=False, repr=False)
    helo_reply: bytes = field(init=False, repr=False)


def _multiline(code: int, lines: list[str]) -> bytes:
    out = [f"{code}-{line}\r\n" for line in lines[:-1]]
    out.append(f"{code} {lines[-1]}\r\n")
    return "".join(out).encode()


@dataclass(slots=True)
class Transaction:
    """One mail transaction, from MAIL to the end of its data."""

    sender: str
    mail_params: dict[str, str]
    helo: str
    protocol: str
    started: float
    recipients: list[str] = field(default_factory=list)
    auth: str | None = None  # the authenticated user (SMTP AUTH)
    body: bytes = b""  # with body_sink: only what was not written to it (nothing at the end)
    size: int = 0
    bdat: bool = False
    failed: bytes | None = None  # a BDAT chunk failed: every later chunk gets this reply
    body_sink: Any = None  # BodySink holding the body (a large one), else None
    bare: bool = False  # a BDAT chunk already written to the sink had a bare CR or LF

    def drop_body(self) -> None:
        """Give up the body written so far (the transaction ends without a message)."""
        sink, self.body_sink = self.body_sink, None
        if sink is not None:
            sink.abort()


@dataclass(frozen=True, slots=True)
class Deliver:
    transaction: Transaction


@dataclass(frozen=True, slots=True)
class StartTLS:
    pass


@dataclass(frozen=True, slots=True)
class Close:
    reason: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    credentials: smtp_auth.Credentials


Event = Deliver | StartTLS | Close | Authenticate

_START_TLS = StartTLS()


class ServerSession:
    """The server side of one SMTP connection, without I/O."""

    __slots__ = (
        "_auth_exchange",
        "_bdat_chunks", "_bdat_discard", "_bdat_held", "_bdat_last", "_bdat_left", "_buf",
        "_closed", "_decoder", "_mode", "_out", "_pending", "_skipping", "_spill", "_spill_at",
        "auth", "auth_required", "auth_user",
        "client_ip", "commands", "errors", "esmtp", "helo", "internal_error", "junk", "may_relay",
        "messages", "policy", "settings", "tls", "txn",
    )

    def __init__(self, settings: SessionSettings, policy: RcptPolicy, client_ip: str,
                 *, tls: bool = False, may_relay: RelayCheck | None = None,
                 spill: SpillFactory | None = None, spill_at: int = SPILL_AT,
                 auth: bool = False, auth_required: bool = False) -> None:
        """``spill``: where bodies larger than ``spill_at`` octets go while they arrive
        (memory per session then stays O(spill_at)); None keeps every body in memory.
        ``auth``: AUTH is offered (once under TLS); ``auth_required``: no MAIL before it."""
        self.auth = auth
        self.auth_required = auth_required
        self.auth_user: str | None = None
        self._auth_exchange: smtp_auth.AuthExchange | None = None
        self.settings = settings
        self.policy = policy
        self.may_relay = may_relay
        self.internal_error: str | None = None  # a bug hit by client input (see _command)
        self.client_ip = client_ip
        self.tls = tls
        self.helo: str | None = None
        self.esmtp = False
        self.txn: Transaction | None = None
        self.errors = 0
        self.junk = 0
        self.messages = 0
        self.commands = 0
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._mode = _CMD
        self._pending: Event | None = None
        self._closed = False
        self._skipping = False
        self._decoder: DataDecoder | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_discard: bytes | None = None
        self._bdat_chunks: list[bytes] = []
        self._bdat_held = 0  # octets in _bdat_chunks
        self._spill = spill
        self._spill_at = spill_at

    # ------------------------------------------------------------------ I/O-facing API

    def banner(self) -> bytes:
        return self.settings.banner

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        """An event is outstanding; input is only buffered meanwhile."""
        return self._pending is not None

    @property
    def in_data(self) -> bool:
        """Reading message content (DATA or a BDAT chunk): the data timeout applies."""
        return self._mode != _CMD

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_output(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def receive(self, data: bytes) -> Event | None:
        """Feed received bytes; return the event the I/O layer must handle, if any."""
        if self._closed:
            return None
        if self._pending is None and not self._buf:
            mode = self._mode
            if mode == _DATA:
                result = self._decoder.feed(data)  # type: ignore[union-attr]
                if result is None:
                    return None
                event = self._end_data(*result)
                if event is not None or not self._buf:
                    return event
                return self.step()
            if mode == _CMD and not self._skipping and type(data) is bytes:
                # The usual read of a client that waits for each reply: one whole command
                # line. Handled without the buffer; anything else takes the general path.
                n = len(data)
                if 0 < n <= self.settings.limits.line_length and data.find(b"\n") == n - 1:
                    if n > 1 and data[n - 2] == 13:
                        self._command(data[:-2])
                    elif self.settings.policy.bare_newline_reject:
                        self._bare_newline()
                    else:
                        self._command(data[:-1])
                    if self._mode == _BDAT:
                        return self.step()  # BDAT 0 completes without more input
                    return self._pending
        self._buf += data
        if self._pending is not None:
            return None
        return self.step()

    def step(self) -> Event | None:
        """Process buffered input until an event occurs or no complete input is left."""
        buf = self._buf
        pos = 0
        limit = self.settings.limits.line_length
        event: Event | None = None
        try:
            while self._pending is None and not self._closed:
                mode = self._mode
                if mode == _CMD:
                    end = buf.find(b"\n", pos)
                    if end < 0:
                        if len(buf) - pos >= limit and not self._skipping:
                            self._skipping = True
                            self._error(R_LINE_TOO_LONG)
                        if self._skipping:
                            pos = len(buf)
                        break
                    if self._skipping:
                        self._skipping = False
                        pos = end + 1
                        continue
                    if end + 1 - pos > limit:
                        pos = end + 1
                        self._error(R_LINE_TOO_LONG)
                        continue
                    crlf = end > pos and buf[end - 1] == 13
                    line = bytes(buf[pos:end - 1] if crlf else buf[pos:end])
                    pos = end + 1
                    if not crlf and self.settings.policy.bare_newline_reject:
                        self._bare_newline()
                        continue
                    self._command(line)
                    if self._mode == _DATA:
                        # Everything after the DATA line is message content.
                        rest = bytes(buf[pos:])
                        del buf[:]
                        pos = 0
                        if rest:
                            result = self._decoder.feed(rest)  # type: ignore[union-attr]
                            if result is not None:
                                event = self._end_data(*result)
                                if event is not None:
                                    return event
                elif mode == _BDAT:
                    avail = len(buf) - pos
                    if avail == 0 and self._bdat_left:
                        break
                    take = min(avail, self._bdat_left)
                    if take:
                        self._bdat_take(buf, pos, take)
                        pos += take
                        self._bdat_left -= take
                    if self._bdat_left:
                        break
                    self._mode = _CMD
                    event = self._bdat_done()
                    if event is not None:
                        return event
                else:  # _DATA with data left over in buf after a pause
                    if pos == len(buf):
                        break
                    rest = bytes(buf[pos:])
                    del buf[:]
                    pos = 0
                    result = self._decoder.feed(rest)  # type: ignore[union-attr]
                    if result is None:
                        break
                    event = self._end_data(*result)
                    if event is not None:
                        return event
            return self._pending if self._pending is not None else event
        finally:
            if pos:
                del buf[:pos]

    def finish_delivery(self, reply: bytes, *, queued: bool) -> None:
        """The store for the outstanding ``Deliver`` finished; ``reply`` goes to the client."""
        self._out.append(reply)
        self._pending = None
        self.txn = None
        self.junk = 0  # a client that sends messages is not idling, even if they fail
        if queued:
            self.messages += 1

    def finish_auth(self, user: str | None, reply: bytes) -> None:
        """The outstanding ``Authenticate`` was decided: ``user`` if it succeeded."""
        self._out.append(reply)
        self._pending = None
        if user is not None:
            self.auth_user = user
        elif reply.startswith(b"535"):
            self.errors += 1  # a wrong password counts toward limits.errors
            if self.errors >= self.settings.limits.errors:
                self._out.append(R_TOO_MANY_ERRORS)
                self._close("too many errors")

    def connection_lost(self) -> None:
        """The connection is gone: drop a body being received (not one being stored)."""
        txn = self.txn
        if txn is not None and self._pending is None:
            txn.drop_body()

    def _end_txn(self) -> None:
        txn, self.txn = self.txn, None
        if txn is not None:
            txn.drop_body()

    def tls_started(self) -> None:
        """The transport is TLS now: forget everything said before (RFC 3207 §4.2)."""
        self._pending = None
        self.tls = True
        self.auth_user = None
        self._auth_exchange = None
        self.helo = None
        self.esmtp = False
        self._end_txn()
        self._buf.clear()
        self._mode = _CMD
        self._skipping = False

    def timeout(self) -> bytes:
        """The client was idle too long: the 421 to send before closing."""
        self._closed = True
        return R_TIMEOUT

    def shutdown(self) -> bytes:
        self._closed = True
        return R_SHUTDOWN

    # ------------------------------------------------------------------ commands

    def _error(self, reply: bytes) -> None:
        self._out.append(reply)
        self._count_error()

    def _count_error(self) -> None:
        self.errors += 1
        if self.errors >= self.settings.limits.errors:
            self._out.append(R_TOO_MANY_ERRORS)
            self._close("too many errors")

    def _junk(self, reply: bytes) -> None:
        """Answer a command that does nothing (NOOP, RSET, VRFY, HELP); past
        ``limits.junk_commands`` of them, each also counts toward ``limits.errors``."""
        self._out.append(reply)
        self.junk += 1
        if self.junk > self.settings.limits.junk_commands:
            self._count_error()

    def _close(self, reason: str) -> None:
        self._closed = True
        self._pending = Close(reason)

    def _bare_newline(self) -> None:
        """A command line ended in a bare LF: refuse and close (what follows may be a
        smuggled command meant for another reader of the stream)."""
        self._out.append(R_BARE_LF_COMMAND)
        self._buf.clear()
        self._close("bare LF in command")

    def _command(self, line: bytes) -> None:
        self.commands += 1
        if self._auth_exchange is not None:  # a response line of an AUTH exchange
            self._auth_step(*self._auth_exchange.feed(line))
            return
        try:
            verb, arg = split_command(line)
        except SMTPProtocolError:
            self._error(R_UNKNOWN)
            return
        handler = _HANDLERS.get(verb)
        if handler is None:
            self._error(R_UNKNOWN)
            return
        try:
            handler(self, arg)
        except Exception as exc:  # a bug: never let client bytes kill the connection silently
            # Replies already produced (a "250" for a stored message) still go out first.
            self.internal_error = f"{verb}: {type(exc).__name__}: {exc}"
            self._end_txn()
            self._mode = _CMD
            self._out.append(R_INTERNAL)
            self._close("internal error")

    def _helo_refused(self, arg: str) -> bool:
        if not arg:
            self._error(R_HELO_ARG)
            return True
        if self.settings.policy.helo_reject and not valid_helo(arg):
            self._error(R_HELO_SYNTAX)
            return True
        return False

    def _ehlo(self, arg: str) -> None:
        if self._helo_refused(arg):
            return
        self.helo = arg
        self.esmtp = True
        self._end_txn()
        if not self.tls:
            self._out.append(self.settings.ehlo_plain)
        else:
            self._out.append(self.settings.ehlo_tls_auth if self.auth else self.settings.ehlo_tls)

    def _helo(self, arg: str) -> None:
        if self._helo_refused(arg):
            return
        self.helo = arg
        self.esmtp = False
        self._end_txn()
        self._out.append(self.settings.helo_reply)

    def _mail(self, arg: str) -> None:
        if self.helo is None:
            self._error(R_NEED_HELO)
            return
        if self.txn is not None:
            self._error(R_NESTED_MAIL)
            return
        if self.messages >= self.settings.limits.messages:
            self._out.append(R_TOO_MANY_MESSAGES)
            self._close("too many messages")
            return
        if self.auth_required and self.auth_user is None:
            self._error(smtp_auth.R_AUTH_REQUIRED if self.tls else smtp_auth.R_TLS_REQUIRED)
            return
        try:
            sender, params = parse_path(arg, "FROM", allow_null=True)
        except SMTPProtocolError as exc:
            self._error(_r(f"501 5.1.7 {exc}"))
            return
        if params:
            reply = self._check_mail_params(params)
            if reply is not None:
                self._error(reply)
                return
        utf8 = "SMTPUTF8" in params
        if not utf8 and not sender.isascii():
            self._error(R_NEED_UTF8)
            return
        if not self.esmtp:
            proto = "SMTP"
        elif utf8:
            proto = "UTF8SMTPS" if self.tls else "UTF8SMTP"
        else:
            proto = "ESMTPS" if self.tls else "ESMTP"
        if self.auth_user is not None:
            proto += "A"  # ESMTPSA, UTF8SMTPSA (RFC 3848, RFC 6531)
        self.txn = Transaction(sender, params, self.helo, proto, time.monotonic(),
                               auth=self.auth_user)
        self._out.append(R_SENDER_OK)

    def _check_mail_params(self, params: dict[str, str]) -> bytes | None:
        if not self.esmtp:
            return _r("555 5.5.4 MAIL parameters need EHLO")
        for key, value in params.items():
            if key not in _MAIL_PARAMS:
                return _r(f"555 5.5.4 MAIL parameter {key} not recognized")
            if key == "SIZE":
                size = decimal(value, max_digits=20)
                if size is None:
                    return _r("501 5.5.4 SIZE needs a number")
                if size > self.settings.limits.message_size:
                    return R_TOO_BIG
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return _r(f"555 5.5.4 BODY={value} not supported")
            elif key == "SMTPUTF8":
                if value:
                    return _r("501 5.5.4 SMTPUTF8 takes no value")
            elif key == "RET" and value.upper() not in ("FULL", "HDRS"):
                return _r("501 5.5.4 RET must be FULL or HDRS")
        return None

    def _rcpt(self, arg: str) -> None:
        txn = self.txn
        if txn is None:
            self._error(R_NEED_HELO if self.helo is None else R_NEED_MAIL)
            return
        try:
            rcpt, params = parse_path(arg, "TO", allow_null=False)
        except SMTPProtocolError as exc:
            self._error(_r(f"501 5.1.3 {exc}"))
            return
        for key in params:
            if key not in _RCPT_PARAMS or not self.esmtp:
                self._error(_r(f"555 5.5.4 RCPT parameter {key} not recognized"))
                return
        if not rcpt.isascii() and "SMTPUTF8" not in txn.mail_params:
            self._error(R_NEED_UTF8)
            return
        if len(txn.recipients) >= self.settings.limits.recipients:
            self._error(R_TOO_MANY_RCPTS)  # counted: 10,000 RCPTs must not be free
            return
        if (self.settings.policy.routed_reject and routed_local_part(rcpt)
                and txn.auth is None
                and not (self.may_relay is not None and self.may_relay(self.client_ip))):
            self._error(R_ROUTED)
            return
        domain = rcpt.rpartition("@")[2].lower()
        if txn.auth is None and not self.policy(domain, self.client_ip):
            self._error(R_RELAY_DENIED)
            return
        if rcpt not in txn.recipients:
            txn.recipients.append(rcpt)
        self._out.append(R_RCPT_OK)

    def _data(self, arg: str) -> None:
        txn = self._ready_for_data()
        if txn is None:
            return
        if arg:
            self._error(R_NO_ARGS)
            return
        if txn.bdat:
            self._error(R_MIXED)
            return
        self._decoder = DataDecoder(self.settings.limits.message_size,
                                    None if self._spill is None else self._spill_chunk,
                                    self._spill_at)
        self._mode = _DATA
        self._out.append(R_DATA)

    def _ready_for_data(self) -> Transaction | None:
        txn = self.txn
        if txn is None:
            self._error(R_NEED_HELO if self.helo is None else R_NEED_MAIL)
        elif not txn.recipients:
            self._error(R_NEED_RCPT)
            return None
        return txn

    def _spill_chunk(self, chunk: bytes) -> None:
        txn = self.txn
        assert txn is not None and self._spill is not None
        if txn.body_sink is None:
            txn.body_sink = self._spill(txn)
        txn.body_sink.write(chunk)

    def _end_data(self, body: bytes, leftover: bytes) -> Event | None:
        decoder = self._decoder
        self._decoder = None
        self._mode = _CMD
        if leftover:
            self._buf[:0] = leftover
        txn = self.txn
        assert txn is not None and decoder is not None
        txn.size = decoder.size
        if decoder.oversize:
            self._end_txn()
            self._out.append(R_TOO_BIG)
        elif decoder.bare:
            self._end_txn()
            self._out.append(R_BARE_LF)
        else:
            if txn.body_sink is not None:
                txn.body_sink.write(body)
            else:
                txn.body = body
            self._pending = Deliver(txn)
            return self._pending
        return None

    def _bdat(self, arg: str) -> None:
        parts = arg.split(" ")
        size = decimal(parts[0], max_digits=18) if parts else None
        if size is None or len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != "LAST"):
            self._error(R_BDAT_ARG)
            return
        self._bdat_left = size
        self._bdat_last = len(parts) == 2
        self._mode = _BDAT
        self._bdat_discard = None
        txn = self.txn
        if self.helo is None:
            self._bdat_discard = R_NEED_HELO
        elif txn is None:
            self._bdat_discard = R_NEED_MAIL
        elif not txn.recipients:
            self._bdat_discard = R_NEED_RCPT
        elif txn.failed is not None:
            self._bdat_discard = txn.failed
        else:
            if not txn.bdat:
                txn.bdat = True
                self._bdat_chunks = []
                self._bdat_held = 0

    def _bdat_take(self, buf: bytearray, pos: int, take: int) -> None:
        if self._bdat_discard is not None:
            return
        txn = self.txn
        assert txn is not None
        txn.size += take
        if txn.size > self.settings.limits.message_size:
            txn.failed = R_TOO_BIG
            self._bdat_discard = R_TOO_BIG
            self._bdat_chunks = []
            self._bdat_held = 0
            txn.drop_body()
            return
        self._bdat_chunks.append(bytes(buf[pos:pos + take]))
        self._bdat_held += take
        if self._spill is not None and self._bdat_held > self._spill_at:
            self._bdat_flush(final=False)

    def _bdat_flush(self, *, final: bool) -> None:
        """Write the chunks held to the body sink (a trailing CR stays until its LF)."""
        txn = self.txn
        assert txn is not None and self._spill is not None
        data = b"".join(self._bdat_chunks)
        keep = b""
        if not final and data.endswith(b"\r"):
            data, keep = data[:-1], data[-1:]
        if not txn.bare and DataDecoder.bare_line_ending(data):
            txn.bare = True
        if txn.body_sink is None:
            txn.body_sink = self._spill(txn)
        txn.body_sink.write(data)
        self._bdat_chunks = [keep] if keep else []
        self._bdat_held = len(keep)

    def _bdat_done(self) -> Event | None:
        discard = self._bdat_discard
        txn = self.txn
        if discard is not None:
            self._bdat_discard = None
            if discard is R_TOO_BIG:
                self._out.append(discard)
                if self._bdat_last and txn is not None:
                    self._end_txn()
            else:
                self._error(discard)
            return None
        assert txn is not None
        if not self._bdat_last:
            self._out.append(_r(f"250 2.0.0 {txn.size} octets received"))
            return None
        if txn.body_sink is not None:
            self._bdat_flush(final=True)
            body = b""
            bare = txn.bare
        else:
            body = b"".join(self._bdat_chunks)
            bare = DataDecoder.bare_line_ending(body)
        self._bdat_chunks = []
        self._bdat_held = 0
        if bare:
            self._end_txn()
            self._out.append(R_BARE_LF)
            return None
        txn.body = body
        self._pending = Deliver(txn)
        return self._pending

    def _rset(self, arg: str) -> None:
        self._end_txn()
        self._junk(OK)

    def _noop(self, arg: str) -> None:
        self._junk(OK)

    def _quit(self, arg: str) -> None:
        self._out.append(R_BYE)
        self._close("quit")

    def _vrfy(self, arg: str) -> None:
        if not arg:
            self._error(_r("501 5.5.4 VRFY needs an argument"))
            return
        self._junk(R_VRFY)

    def _help(self, arg: str) -> None:
        # STARTTLS only where EHLO offers it (a certificate, not yet under TLS)
        self._junk(R_HELP_STARTTLS if self.settings.starttls and not self.tls else R_HELP)

    def _not_implemented(self, arg: str) -> None:
        self._error(R_NOT_IMPL)

    def _auth(self, arg: str) -> None:
        if not self.auth:
            self._error(R_NOT_IMPL)
        elif not self.tls:
            self._error(smtp_auth.R_ENCRYPTION_REQUIRED)
        elif self.helo is None or not self.esmtp:
            self._error(R_NEED_HELO)
        elif self.auth_user is not None:
            self._error(smtp_auth.R_ALREADY_AUTH)
        elif self.txn is not None:
            self._error(smtp_auth.R_AUTH_IN_TXN)
        else:
            self._auth_step(*smtp_auth.AuthExchange.start(arg))

    def _auth_step(self, exchange: smtp_auth.AuthExchange | None, step: smtp_auth.Step) -> None:
        self._auth_exchange = exchange
        if isinstance(step, smtp_auth.Challenge):
            self._out.append(step.reply)
        elif isinstance(step, smtp_auth.Credentials):
            self._pending = Authenticate(step)
        else:
            self._error(step.reply)

    def _starttls(self, arg: str) -> None:
        if not self.settings.starttls:
            self._error(R_NOT_IMPL)
            return
        if self.tls:
            self._error(R_TLS_ACTIVE)
            return
        if arg:
            self._error(R_NO_ARGS)
            return
        self._out.append(R_TLS_GO)
        # Anything pipelined after STARTTLS was sent in clear: never act on it (CVE-2011-0411).
        self._buf.clear()
        self._pending = _START_TLS


_HANDLERS: dict[str, Callable[[ServerSession, str], None]] = {
    "EHLO": ServerSession._ehlo,
    "HELO": ServerSession._helo,
    "MAIL": ServerSession._mail,
    "RCPT": ServerSession._rcpt,
    "DATA": ServerSession._data,
    "BDAT": ServerSession._bdat,
    "RSET": ServerSession._rset,
    "NOOP": ServerSession._noop,
    "QUIT": ServerSession._quit,
    "VRFY": ServerSession._vrfy,
    "HELP": ServerSession._help,
    "EXPN": ServerSession._not_implemented,
    "AUTH": ServerSession._auth,
    "TURN": ServerSession._not_implemented,
    "ETRN": ServerSession._not_implemented,
    "STARTTLS": ServerSession._starttls,
}
