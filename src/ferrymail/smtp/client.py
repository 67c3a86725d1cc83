"""Outbound SMTP session over asyncio: PIPELINING, STARTTLS, per-recipient results.

Built on the sans-IO core in `ferrymail.smtp.protocol`. The connection is an `asyncio.Protocol`
that feeds every chunk straight into a `ReplyParser`; a pipelined transaction is one write
(MAIL, every RCPT and DATA) followed by reading the replies in order (RFC 2920).

Outcomes come in two shapes. A reply that decides a transaction is a result
(`TransactionResult`, read per recipient with `reply_for`); a session refused at the banner or
EHLO raises `SMTPReplyError` carrying the reply. Everything else that goes wrong (DNS aside)
raises `DeliveryError` with a kind: network, proxy, tls, protocol, config.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

from ferrymail.abnf import decimal
from ferrymail.delivery.connect import Source, Timeouts, describe_path, hostport, open_socket
from ferrymail.delivery.errors import DeliveryError, SMTPReplyError
from ferrymail.mime import DowngradeError, to_7bit
from ferrymail.observe.log import log_event
from ferrymail.smtp.protocol import (
    Reply,
    ReplyParser,
    SMTPProtocolError,
    dot_stuff,
    mail_command,
    parse_ehlo,
    rcpt_command,
    to_crlf,
)
from ferrymail.spool.body import SpooledBody

QUIT_TIMEOUT = 5.0
DEFAULT_TIMEOUTS = Timeouts()
_EOF_VIA_PROXY = "the proxy could not bind the source IP or reach the MX"

TLSContextFactory = Callable[[bool], ssl.SSLContext]


# Every client made, held weakly: the metrics' open-connections gauge counts the open ones.
LIVE_CLIENTS: weakref.WeakSet[SMTPClient] = weakref.WeakSet()

class TLSMode(StrEnum):
    """STARTTLS policy (Halon's ``session.tls.mode`` values)."""

    DISABLED = "disabled"
    OPTIONAL = "optional"  # STARTTLS when offered, certificate not checked
    OPTIONAL_VERIFY = "optional_verify"  # STARTTLS when offered, certificate must verify
    REQUIRE = "require"  # STARTTLS must be offered and succeed, certificate not checked
    REQUIRE_VERIFY = "require_verify"  # STARTTLS must succeed with a verified certificate

    @property
    def required(self) -> bool:
        return self in (TLSMode.REQUIRE, TLSMode.REQUIRE_VERIFY)

    @property
    def verify(self) -> bool:
        return self in (TLSMode.OPTIONAL_VERIFY, TLSMode.REQUIRE_VERIFY)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RecipientResult:
    address: str
    reply: Reply


@dataclass(frozen=True)
class TransactionResult:
    """What the peer said to one transaction.

    ``state`` is the phase of the deciding reply: ``MAIL`` (sender refused), ``RCPT`` (every
    recipient refused), ``DATA`` (DATA command refused) or ``EOD`` (the end-of-data reply,
    which decides for every accepted recipient). ``data`` is the DATA command's reply when it
    was refused, else the end-of-data reply (None when DATA was never reached).
    """

    mail: Reply | None
    recipients: tuple[RecipientResult, ...]
    data: Reply | None
    state: str

    @property
    def reply(self) -> Reply:
        """The deciding reply (for RCPT: the first recipient's)."""
        if self.state == "MAIL" or not self.recipients:
            assert self.mail is not None
            return self.mail
        if self.state == "RCPT" or self.data is None:
            return self.recipients[0].reply
        return self.data

    def reply_for(self, address: str) -> Reply:
        """The effective outcome for one recipient.

        MAIL's reply if MAIL was refused, else the RCPT reply if that was not 2xx, else the
        DATA/end-of-data reply.
        """
        if self.mail is not None and not _ok(self.mail):
            return self.mail
        for r in self.recipients:
            if r.address == address:
                if not _ok(r.reply) or self.data is None:
                    return r.reply
                return self.data
        raise KeyError(f"{address!r} was not a recipient of this transaction")

    @property
    def accepted(self) -> tuple[str, ...]:
        """Recipients whose effective outcome is 2xx (delivered)."""
        return tuple(r.address for r in self.recipients if _ok(self.reply_for(r.address)))


def _ok(reply: Reply) -> bool:
    return 200 <= reply.code < 300


def match_pipelined(replies: Sequence[Reply], n_rcpt: int
                    ) -> tuple[Reply, tuple[Reply, ...], Reply]:
    """Assign the replies of a pipelined ``MAIL, RCPT x n_rcpt, DATA`` group, in order.

    A 421 means the server is closing: it stands for itself and every reply not received.
    Raises ValueError when there are too few replies and no 421.
    """
    need = n_rcpt + 2
    got = list(replies[:need])
    closing = next((r for r in got if r.code == 421), None)
    if closing is not None:
        got = got[: got.index(closing) + 1]
        got += [closing] * (need - len(got))
    if len(got) < need:
        raise ValueError(f"{len(got)} replies for a pipelined group of {need} commands")
    return got[0], tuple(got[1:-1]), got[-1]


def decide(recipients: Sequence[str], mail: Reply, rcpts: Sequence[Reply] = (),
           data_cmd: Reply | None = None, eod: Reply | None = None) -> TransactionResult:
    """Build the result of a transaction from the replies received so far.

    Raises SMTPProtocolError for a reply no command may get (e.g. 250 to DATA, 354 to RCPT):
    reading it as a result could count an unsent message as delivered.
    """
    _expect("MAIL", mail, _FINAL)
    for r in rcpts:
        _expect("RCPT", r, _FINAL)
    if data_cmd is not None:
        _expect("DATA", data_cmd, _DATA)
    if eod is not None:
        _expect("EOD", eod, _FINAL)
    results = tuple(RecipientResult(a, r) for a, r in zip(recipients, rcpts, strict=False))
    if not _ok(mail):
        return TransactionResult(mail, results, None, "MAIL")
    if len(results) < len(recipients) or not any(_ok(r.reply) for r in results):
        return TransactionResult(mail, results, None, "RCPT")
    if data_cmd is None or data_cmd.code != 354:
        return TransactionResult(mail, results, data_cmd, "DATA")
    return TransactionResult(mail, results, eod, "EOD")


_FINAL = (2, 4, 5)
_DATA = (3, 4, 5)


def _expect(state: str, reply: Reply, classes: tuple[int, ...]) -> None:
    if reply.code // 100 not in classes or (state == "DATA" and reply.code // 100 == 3
                                             and reply.code != 354):
        raise SMTPProtocolError(f"unexpected reply to {state}: {reply}")


# Turns the content into what is sent, after any 7-bit conversion (DKIM signing).
Prepare = Callable[[bytes | SpooledBody], Awaitable[bytes | SpooledBody]]


def stuffed_chunks(body: SpooledBody) -> Iterator[bytes]:
    """`dot_stuff` for a body read in chunks: line endings normalised to CRLF (`to_crlf`),
    leading dots doubled, CRLF at the end, then ``.CRLF``; the same bytes `dot_stuff` gives
    for the whole body. A CR ending a chunk waits for the next one (CRLF or a bare CR), and
    a dot opens a line after a CRLF split between two chunks."""
    last = b"\r\n"  # the start of the message is the start of a line
    carry = b""
    sent = 0
    for chunk in body.chunks():
        data = carry + chunk if carry else chunk
        carry = b""
        if data.endswith(b"\r"):
            data, carry = data[:-1], b"\r"
        if b"\r" in data or b"\n" in data:
            cr = data.count(b"\r")
            if cr != data.count(b"\n") or cr != data.count(b"\r\n"):
                data = to_crlf(data)
        if not data:
            continue
        joined = last + data
        yield joined.replace(b"\r\n.", b"\r\n..")[len(last):]
        last = joined[-2:]
        sent += len(data)
    if carry:  # a bare CR at the very end
        yield b"\r\n"
        last = b"\r\n"
        sent += 2
    yield b".\r\n" if sent == 0 or last == b"\r\n" else b"\r\n.\r\n"


def transaction_parameters(extensions: dict[str, str], sender: str, recipients: Sequence[str],
                           data: bytes | SpooledBody, extra: dict[str, str] | None = None,
                           peer: str = "the MX") -> dict[str, str]:
    """MAIL FROM parameters for this message and this peer (SIZE, BODY, SMTPUTF8).

    Refuses (DeliveryError kind protocol, permanent) a message the peer cannot take: larger
    than its SIZE, 8-bit without 8BITMIME (`SMTPClient.send` converts such a message to
    7-bit first where it can), non-ASCII addresses without SMTPUTF8.
    """
    params: dict[str, str] = {}
    size = len(data)
    if "SIZE" in extensions:
        limit_text = extensions["SIZE"].split(" ", 1)[0]
        limit = decimal(limit_text, max_digits=20) or 0  # ASCII digits only (RFC 1870)
        if limit and size > limit:
            raise DeliveryError("protocol", f"message of {size} bytes exceeds the {limit}-byte "
                                f"size limit of {peer}", temporary=False)
        params["SIZE"] = str(size)
    if not data.isascii():
        if "8BITMIME" not in extensions:
            raise DeliveryError("protocol", f"message has 8-bit content but {peer} does not "
                                "offer 8BITMIME", temporary=False)
        params["BODY"] = "8BITMIME"
    if not (sender.isascii() and all(r.isascii() for r in recipients)):
        if "SMTPUTF8" not in extensions:
            raise DeliveryError("protocol", f"non-ASCII address but {peer} does not offer "
                                "SMTPUTF8", temporary=False)
        params["SMTPUTF8"] = ""
    if extra:
        params.update(extra)
    return params


# --------------------------------------------------------------------------- TLS


_DEFAULT_CONTEXTS: dict[bool, ssl.SSLContext] = {}


def default_tls_context(verify: bool) -> ssl.SSLContext:
    """Shared client contexts: system CAs + hostname check, or no check at all. TLS ≥ 1.2."""
    ctx = _DEFAULT_CONTEXTS.get(verify)
    if ctx is None:
        if verify:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _DEFAULT_CONTEXTS[verify] = ctx
    return ctx


# --------------------------------------------------------------------------- connection


class _ReadFailure(Exception):
    def __init__(self, why: str, detail: str = "") -> None:
        super().__init__(why)
        self.why = why  # "timeout" | "eof" | "protocol" | "slow" (below min_rate)
        self.detail = detail


class _HandshakeFailed(Exception):
    """The TLS handshake after a 220 to STARTTLS failed; ``error`` is what to report."""

    def __init__(self, peer: str, error: DeliveryError) -> None:
        super().__init__(error.message)
        self.peer = peer
        self.error = error


class _Connection(asyncio.Protocol):
    """Feeds received bytes into the reply parser and wakes the reader when enough arrived."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = ReplyParser()
        self.replies: collections.deque[Reply] = collections.deque()
        self.want = 1
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.closing_reply = False  # a 421 arrived
        self.error: SMTPProtocolError | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self.rx_bytes = 0  # bytes received since `mark`
        self.first_rx: float | None = None  # loop time of the first of them

    def mark(self) -> None:
        """Start counting received bytes for the minimum-rate rule (one reply wait)."""
        self.rx_bytes = 0
        self.first_rx = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        if self.first_rx is None:
            self.first_rx = asyncio.get_running_loop().time()
        self.rx_bytes += len(data)
        try:
            new = self.parser.feed(data)
        except SMTPProtocolError as e:
            self.error = e
            self._wake()
            return
        if new:
            self.replies.extend(new)
            if any(r.code == 421 for r in new):
                self.closing_reply = True
            if len(self.replies) >= self.want or self.closing_reply:
                self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self._resume()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._resume()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _resume(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        while self._paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    async def wait_replies(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        while (len(self.replies) < n and not self.closed and self.error is None
               and not self.closing_reply):
            self.want = n
            self.waiter = loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def take(self, n: int) -> list[Reply]:
        """Up to n replies, stopping after a 421."""
        out: list[Reply] = []
        while self.replies and len(out) < n:
            r = self.replies.popleft()
            out.append(r)
            if r.code == 421:
                break
        return out


class SMTPClient:
    """One outbound SMTP connection; `connect` it, `send` one or more transactions, `quit`."""

    def __init__(self, source: Source, dest_ip: str, dest_port: int, mx_host: str,
                 tls: TLSMode, timeouts: Timeouts, local_ip: str,
                 transport: asyncio.Transport, conn: _Connection,
                 tls_context_factory: TLSContextFactory | None) -> None:
        self._source = source
        self._remote_ip = dest_ip
        self._remote_port = dest_port
        self._mx_host = mx_host
        self._tls_mode = tls
        self._timeouts = timeouts
        self._local_ip = local_ip
        self._transport = transport
        self._conn = conn
        LIVE_CLIENTS.add(self)  # for the open-connections gauge (observe/metrics.py)
        self._tls_factory = tls_context_factory or default_tls_context
        self._banner: Reply | None = None
        self._ehlo_reply: Reply | None = None
        self._extensions: dict[str, str] = {}
        self._esmtp = True
        self._tls_started = False
        self._tls_version: str | None = None
        self._tls_cipher: str | None = None
        self._transactions = 0
        self._broken = False
        self._tls_fallback = False
        self._in_sync = True  # False once a reply may be missing (timeout, EOF, bad reply)
        self._peer = (f"{mx_host} [{dest_ip}]:{dest_port}" if mx_host and mx_host != dest_ip
                      else hostport(dest_ip, dest_port))
        self._path = describe_path(source, dest_ip, dest_port, mx_host)
        # time.monotonic() when the TCP connection stood (before banner and EHLO): where a
        # connection interval is measured from (delivery/engine.py)
        self.opened_at = time.monotonic()

    # ----------------------------------------------------------------- properties

    @property
    def source(self) -> Source:
        return self._source

    @property
    def local_ip(self) -> str:
        """The source IP the MX sees (with a proxy: the one named in the PROXY header)."""
        return self._local_ip

    @property
    def remote_ip(self) -> str:
        return self._remote_ip

    @property
    def remote_port(self) -> int:
        return self._remote_port

    @property
    def mx_host(self) -> str:
        return self._mx_host

    @property
    def tls_mode(self) -> TLSMode:
        return self._tls_mode

    @property
    def timeouts(self) -> Timeouts:
        return self._timeouts

    @property
    def banner(self) -> Reply | None:
        return self._banner

    @property
    def ehlo_reply(self) -> Reply | None:
        """The reply to the last EHLO (or HELO, see `esmtp`)."""
        return self._ehlo_reply

    @property
    def extensions(self) -> dict[str, str]:
        """EHLO keywords (upper case) to their parameters; empty after a HELO fallback."""
        return dict(self._extensions)

    @property
    def esmtp(self) -> bool:
        """False when the session fell back to HELO."""
        return self._esmtp

    @property
    def tls_started(self) -> bool:
        return self._tls_started

    @property
    def tls_fallback(self) -> bool:
        """True when the TLS handshake failed and this is the plaintext retry (mode optional)."""
        return self._tls_fallback

    @property
    def tls_version(self) -> str | None:
        return self._tls_version

    @property
    def tls_cipher(self) -> str | None:
        return self._tls_cipher

    @property
    def transactions(self) -> int:
        """Transactions completed on this connection (whatever their outcome)."""
        return self._transactions

    @property
    def helo(self) -> str:
        return self._source.helo

    @property
    def proxied(self) -> bool:
        return self._source.proxy is not None

    @property
    def is_open(self) -> bool:
        """The TCP connection is up (in use, or idle in the pool)."""
        return not (self._conn.closed or self._transport.is_closing())

    @property
    def usable(self) -> bool:
        """True while another transaction can be sent on this connection.

        Unsolicited bytes from the peer between transactions also make it unusable: the
        replies would no longer match the commands.
        """
        conn = self._conn
        return not (self._broken or conn.closed or conn.closing_reply or conn.replies
                    or conn.parser.pending or self._transport.is_closing())

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self._extensions

    def connection_info(self) -> dict[str, object]:
        """``connection{localip, localipid, remoteip, remotemx, helo, transactions, tls{…}}``."""
        tls: dict[str, object] = {"started": self._tls_started}
        if self._tls_started:
            tls.update(protocol=self._tls_version, cipher=self._tls_cipher)
        return {"localip": self._local_ip, "localipid": self._source.address_id,
                "remoteip": self._remote_ip, "remotemx": self._mx_host, "helo": self.helo,
                "transactions": self._transactions, "tls": tls}

    # ----------------------------------------------------------------- setup

    @classmethod
    async def connect(cls, source: Source, dest_ip: str, dest_port: int, *, mx_host: str = "",
                      tls: TLSMode = TLSMode.OPTIONAL, timeouts: Timeouts = DEFAULT_TIMEOUTS,
                      tls_context_factory: TLSContextFactory | None = None) -> SMTPClient:
        """Open the connection (direct or proxied), read the banner, EHLO, STARTTLS per `tls`.

        Raises `SMTPReplyError` for a refusing banner or EHLO, `DeliveryError` otherwise.
        With ``tls`` optional, a failed TLS handshake is retried at once in plaintext on a
        new connection to the same address (logged as ``smtp.tls_fallback``; the client's
        `tls_fallback` is then True). The verify and require modes never fall back.
        """
        tls = TLSMode(tls)
        helo = source.helo
        if not helo or not helo.isprintable() or " " in helo:
            raise DeliveryError("config", f"invalid HELO name {helo!r} for source "
                                f"{source.address or '(any)'}", temporary=False)
        try:
            return await cls._open(source, dest_ip, dest_port, mx_host, tls, timeouts,
                                   tls_context_factory)
        except _HandshakeFailed as e:
            if tls is not TLSMode.OPTIONAL:
                raise e.error from None
            # Opportunistic TLS (Postfix "may"): a failed handshake is no reason to keep the
            # mail back; the same MX once more in plaintext, on a new connection.
            log_event("smtp.tls_fallback", "warning", peer=e.peer, source=source.address,
                      error=e.error.message, then="plaintext on a new connection")
        client = await cls._open(source, dest_ip, dest_port, mx_host, TLSMode.DISABLED,
                                 timeouts, tls_context_factory)
        client._tls_fallback = True
        return client

    @classmethod
    async def _open(cls, source: Source, dest_ip: str, dest_port: int, mx_host: str,
                    tls: TLSMode, timeouts: Timeouts,
                    tls_context_factory: TLSContextFactory | None) -> SMTPClient:
        sock, local_ip = await open_socket(source, dest_ip, dest_port, timeouts, mx_host=mx_host)
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await loop.create_connection(_Connection, sock=sock)
        except OSError as e:
            sock.close()
            raise DeliveryError("network", f"cannot set up the connection "
                                f"{describe_path(source, dest_ip, dest_port, mx_host)}: "
                                f"{e}") from None
        client = cls(source, dest_ip, dest_port, mx_host, tls, timeouts, local_ip,
                     transport, conn, tls_context_factory)
        try:
            await client._setup()
        except BaseException:
            client.close()
            raise
        return client

    async def _setup(self) -> None:
        try:
            (self._banner,) = await self._read(1, self._timeouts.banner)
        except _ReadFailure as f:
            raise self._banner_error(f) from None
        if self._banner.code != 220:
            await self.quit()
            raise SMTPReplyError(self._banner, "CONNECT",
                                 f"{self._peer} refused the session {self._path}: "
                                 f"{self._banner}")
        await self._ehlo()
        if self._tls_mode is not TLSMode.DISABLED:
            await self._starttls()

    def _banner_error(self, f: _ReadFailure) -> DeliveryError:
        t = self._timeouts.banner
        proxy = self._source.proxy
        if proxy is not None and f.why in ("eof", "timeout"):
            what = "EOF before banner" if f.why == "eof" else f"no banner within {t:g}s"
            reason = _EOF_VIA_PROXY if f.why == "eof" else _EOF_VIA_PROXY + ", or the MX is silent"
            return DeliveryError("proxy", f"{what} via proxy {proxy} from source "
                                 f"{self._source.address} to {self._peer}: {reason}")
        if f.why == "eof":
            return DeliveryError("network", f"connection closed by {self._peer} before the "
                                 f"banner ({self._path})")
        if f.why == "slow":
            return DeliveryError("network", f"banner from {self._peer} cut off: {f.detail} "
                                 f"({self._path})")
        if f.why == "timeout":
            return DeliveryError("network", f"no banner from {self._peer} within {t:g}s "
                                 f"({self._path})")
        return DeliveryError("protocol", f"bad banner from {self._peer} ({self._path}): "
                             f"{f.detail}")

    async def _ehlo(self) -> None:
        reply = await self._command(f"EHLO {self.helo}\r\n".encode(), "EHLO")
        if _ok(reply):
            self._ehlo_reply = reply
            self._extensions = parse_ehlo(reply)
            self._esmtp = True
            return
        if reply.code >= 500 and not self._tls_mode.required:
            helo = await self._command(f"HELO {self.helo}\r\n".encode(), "EHLO")
            if _ok(helo):
                self._ehlo_reply = helo
                self._extensions = {}
                self._esmtp = False
                return
            reply = helo
        elif reply.code >= 500 and self._tls_mode.required:
            await self.quit()
            raise DeliveryError("tls", f"TLS is required but {self._peer} refused EHLO "
                                f"({reply}), so STARTTLS is impossible ({self._path})")
        await self.quit()
        raise SMTPReplyError(reply, "EHLO", f"{self._peer} refused EHLO {self.helo} "
                             f"({self._path}): {reply}")

    async def _starttls(self) -> None:
        mode = self._tls_mode
        if "STARTTLS" not in self._extensions:
            if mode.required:
                await self.quit()
                raise DeliveryError("tls", f"TLS is required but {self._peer} does not offer "
                                    f"STARTTLS ({self._path})")
            return
        reply = await self._command(b"STARTTLS\r\n", "STARTTLS")
        if reply.code != 220:
            if reply.code == 421 or mode.required:
                await self.quit()
                raise DeliveryError("tls", f"{self._peer} refused STARTTLS ({reply}) "
                                    f"({self._path})")
            return  # optional: go on in plaintext
        conn = self._conn
        if conn.replies or conn.parser.pending:
            # Bytes after the 220 were sent in plaintext and must not be read as if protected.
            raise DeliveryError("tls", f"{self._peer} sent data after its STARTTLS reply "
                                f"(response injection?) ({self._path})")
        verify = mode.verify
        ctx = self._tls_factory(verify)
        name = self._mx_host or self._remote_ip
        server_hostname = name if (verify or self._mx_host) else None
        loop = asyncio.get_running_loop()
        t = self._timeouts.command
        try:
            async with asyncio.timeout(t):
                new = await loop.start_tls(self._transport, conn, ctx,
                                           server_hostname=server_hostname,
                                           ssl_handshake_timeout=t)
        except ssl.SSLCertVerificationError as e:
            self._broken = True
            raise _HandshakeFailed(self._peer, DeliveryError(
                "tls", f"TLS certificate verification failed for {self._peer} (checked name "
                f"{name}): {e.verify_message} ({self._path})")) from None
        except TimeoutError:
            self._broken = True
            raise _HandshakeFailed(self._peer, DeliveryError(
                "tls", f"TLS handshake with {self._peer} timed out after {t:g}s "
                f"({self._path})")) from None
        except (ssl.SSLError, OSError, EOFError) as e:
            self._broken = True
            detail = getattr(e, "reason", None) or str(e) or type(e).__name__
            raise _HandshakeFailed(self._peer, DeliveryError(
                "tls", f"TLS handshake with {self._peer} failed: {detail} "
                f"({self._path})")) from None
        if new is None:
            self._broken = True
            raise _HandshakeFailed(self._peer, DeliveryError(
                "tls", f"TLS handshake with {self._peer} failed: connection closed "
                f"({self._path})"))
        self._transport = new
        conn.transport = new
        sslobj = new.get_extra_info("ssl_object")
        self._tls_started = True
        if sslobj is not None:
            self._tls_version = sslobj.version()
            cipher = sslobj.cipher()
            self._tls_cipher = cipher[0] if cipher else None
        self._extensions = {}
        reply = await self._command(f"EHLO {self.helo}\r\n".encode(), "EHLO")
        if not _ok(reply):
            await self.quit()
            raise SMTPReplyError(reply, "EHLO", f"{self._peer} refused EHLO after STARTTLS "
                                 f"({self._path}): {reply}")
        self._ehlo_reply = reply
        self._extensions = parse_ehlo(reply)

    # ----------------------------------------------------------------- I/O

    async def _read(self, n: int, timeout: float) -> list[Reply]:
        """n replies (fewer only when a 421 arrived); raises _ReadFailure otherwise."""
        conn = self._conn
        try:
            if self._timeouts.min_rate > 0:
                await self._wait_min_rate(n, timeout)
            else:
                async with asyncio.timeout(timeout):
                    await conn.wait_replies(n)
        except TimeoutError:
            self._broken = True
            self._in_sync = False
            raise _ReadFailure("timeout") from None
        except _ReadFailure:
            self._broken = True
            self._in_sync = False
            raise
        got = conn.take(n)
        for r in got:
            if r.mixed_codes:
                log_event("smtp.reply_inconsistent", "warning", peer=self._peer,
                          code=r.code, other_codes=",".join(map(str, r.mixed_codes)),
                          reply=str(r), effect="the last line's code is taken")
        if len(got) == n or (got and got[-1].code == 421):
            return got
        self._broken = True
        self._in_sync = False
        if conn.error is not None:
            raise _ReadFailure("protocol", str(conn.error))
        raise _ReadFailure("eof")

    async def _wait_min_rate(self, n: int, timeout: float) -> None:
        """`wait_replies` within ``timeout`` s, checking the minimum rate now and then;
        TimeoutError at the deadline, _ReadFailure("slow") for a dripping peer."""
        conn = self._conn
        loop = asyncio.get_running_loop()
        rate, grace = self._timeouts.min_rate, self._timeouts.min_rate_grace
        deadline = loop.time() + timeout
        step = max(grace / 4, 0.05)
        conn.mark()
        while True:
            now = loop.time()
            if now >= deadline:
                raise TimeoutError
            try:
                async with asyncio.timeout(min(step, deadline - now)):
                    await conn.wait_replies(n)
                return
            except TimeoutError:
                pass
            first = conn.first_rx
            if first is None:
                continue
            elapsed = loop.time() - first
            if elapsed >= grace and conn.rx_bytes < rate * elapsed:
                raise _ReadFailure("slow", f"{conn.rx_bytes} bytes in {elapsed:.1f}s, below "
                                   f"the minimum rate of {rate} bytes/s")

    def _read_error(self, f: _ReadFailure, state: str, timeout: float) -> DeliveryError:
        if f.why == "slow":
            return DeliveryError("network", f"reply to {state} from {self._peer} cut off: "
                                 f"{f.detail} ({self._path})")
        if f.why == "timeout":
            msg = (f"timeout after {timeout:g}s waiting for the reply to {state} from "
                   f"{self._peer} ({self._path})")
            return DeliveryError("network", msg)
        if f.why == "eof":
            return DeliveryError("network", f"connection closed by {self._peer} while waiting "
                                 f"for the reply to {state} ({self._path})")
        return DeliveryError("protocol", f"bad reply to {state} from {self._peer} "
                             f"({self._path}): {f.detail}")

    def _write(self, data: bytes) -> None:
        if self._transport.is_closing():
            self._broken = True
            raise DeliveryError("network", f"connection to {self._peer} is closed "
                                f"({self._path})")
        self._transport.write(data)

    async def _command(self, line: bytes, state: str, timeout: float | None = None) -> Reply:
        """Send one command and read its reply."""
        t = self._timeouts.command if timeout is None else timeout
        self._write(line)
        try:
            (reply,) = await self._read(1, t)
        except _ReadFailure as f:
            raise self._read_error(f, state, t) from None
        if reply.code == 421:
            self._broken = True
        return reply

    # ----------------------------------------------------------------- transactions

    async def send(self, sender: str, recipients: Sequence[str], data: bytes | SpooledBody,
                   *, mail_params: dict[str, str] | None = None,
                   prepare: Prepare | None = None) -> TransactionResult:
        """One transaction: MAIL, RCPT for each recipient, DATA with `data` (CRLF lines;
        a `SpooledBody` is read, dot-stuffed and sent in chunks, never whole in memory).

        `prepare` turns the content into what is sent, after any 7-bit conversion (DKIM
        signing: the signature must cover the bytes on the wire).

        Pipelined when the peer offers PIPELINING. A refused message is a result; a failure
        that leaves no reply raises DeliveryError (and the connection is no longer usable,
        except for refusals before anything was sent: size, 8BITMIME, SMTPUTF8, bad address).
        """
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        if not self.usable:
            raise DeliveryError("network", f"connection to {self._peer} is no longer usable "
                                f"({self._path})")
        if not data.isascii() and "8BITMIME" not in self._extensions:
            # (a spooled body is read whole for this rare conversion)
            data = self._downgrade(data.read_all() if isinstance(data, SpooledBody) else data)
        if prepare is not None:
            data = await prepare(data)
        params = transaction_parameters(self._extensions, sender, recipients, data,
                                        mail_params, self._peer)
        try:
            mail = mail_command(sender, params)
            rcpts = [rcpt_command(r) for r in recipients]
        except SMTPProtocolError as e:
            raise DeliveryError("protocol", f"cannot send to {self._peer}: {e}",
                                temporary=False) from None
        body = data if isinstance(data, SpooledBody) else dot_stuff(data)
        try:
            if self.pipelining:
                result = await self._send_pipelined(recipients, mail, rcpts, body)
            else:
                result = await self._send_lockstep(recipients, mail, rcpts, body)
        except SMTPProtocolError as e:
            self.close()
            raise DeliveryError("protocol", f"{self._peer} broke the protocol "
                                f"({self._path}): {e}") from None
        except BaseException:
            self.close()
            raise
        self._transactions += 1
        if result.state != "EOD" and self.usable:
            await self._reset()
        if not self.usable:
            # RFC 5321 §4.1.1.10: end with QUIT, also after a refused RSET, while the
            # replies still match the commands; a session out of step is only closed.
            if self._in_sync and not self._conn.closing_reply:
                await self.quit()
            else:
                self.close()
        return result

    def _downgrade(self, data: bytes) -> bytes:
        """8-bit content for a peer without 8BITMIME, converted to 7-bit (see `to_7bit`);
        DeliveryError (protocol, permanent, 5.6.3) when it cannot be."""
        try:
            converted = to_7bit(data)
        except DowngradeError as e:
            raise DeliveryError("protocol", f"message has 8-bit content but {self._peer} does "
                                f"not offer 8BITMIME, and it cannot be converted: {e}",
                                temporary=False, status="5.6.3") from None
        log_event("smtp.8bit_converted", peer=self._peer, size=len(data),
                  converted_size=len(converted), reason="peer does not offer 8BITMIME")
        return converted

    async def _send_pipelined(self, recipients: Sequence[str], mail: bytes, rcpts: list[bytes],
                              body: bytes | SpooledBody) -> TransactionResult:
        t = self._timeouts.command
        self._write(b"".join((mail, *rcpts, b"DATA\r\n")))
        try:
            replies = await self._read(len(rcpts) + 2, t)
        except _ReadFailure as f:
            raise self._read_error(f, "MAIL/RCPT/DATA", t) from None
        mail_r, rcpt_rs, data_r = match_pipelined(replies, len(rcpts))
        result = decide(recipients, mail_r, rcpt_rs, data_r)
        if data_r.code == 354:
            if result.state == "EOD":
                eod = await self._end_data(body)
                return decide(recipients, mail_r, rcpt_rs, data_r, eod)
            # RFC 2920: DATA was accepted although MAIL or every RCPT failed; end it empty.
            await self._end_data(b".\r\n")
        return result

    async def _send_lockstep(self, recipients: Sequence[str], mail: bytes, rcpts: list[bytes],
                             body: bytes | SpooledBody) -> TransactionResult:
        mail_r = await self._command(mail, "MAIL")
        if not _ok(mail_r):
            return decide(recipients, mail_r)
        rcpt_rs: list[Reply] = []
        for line in rcpts:
            r = await self._command(line, "RCPT")
            rcpt_rs.append(r)
            if r.code == 421:
                rcpt_rs += [r] * (len(rcpts) - len(rcpt_rs))
                return decide(recipients, mail_r, rcpt_rs)
        if not any(_ok(r) for r in rcpt_rs):
            return decide(recipients, mail_r, rcpt_rs)
        data_r = await self._command(b"DATA\r\n", "DATA")
        if data_r.code != 354:
            return decide(recipients, mail_r, rcpt_rs, data_r)
        eod = await self._end_data(body)
        return decide(recipients, mail_r, rcpt_rs, data_r, eod)

    async def _end_data(self, body: bytes | SpooledBody) -> Reply:
        t = self._timeouts.data
        chunks = iter([body] if isinstance(body, bytes) else stuffed_chunks(body))
        while True:
            try:
                chunk = next(chunks, None)
            except OSError as e:  # the spooled body's file
                self._broken = True  # the message is cut short: the connection is unusable
                self._in_sync = False
                raise DeliveryError("config", f"cannot read the message: {e}") from None
            if chunk is None:
                break
            self._write(chunk)
            try:
                async with asyncio.timeout(t):  # per chunk: a large body takes its time
                    await self._conn.drain()
            except TimeoutError:
                self._broken = True
                self._in_sync = False
                raise self._read_error(_ReadFailure("timeout"), "EOD", t) from None
        try:
            (reply,) = await self._read(1, t)
        except _ReadFailure as f:
            raise self._read_error(f, "EOD", t) from None
        if reply.code == 421:
            self._broken = True
        return reply

    async def _reset(self) -> None:
        """RSET after a failed transaction; a connection that cannot reset is not reused
        (the caller then sends QUIT)."""
        try:
            reply = await self._command(b"RSET\r\n", "RSET")
        except DeliveryError:
            self._broken = True
            return
        if not _ok(reply):
            self._broken = True

    # ----------------------------------------------------------------- teardown

    async def quit(self) -> None:
        """QUIT (waiting briefly for the reply) and close; never raises."""
        try:
            if not (self._conn.closed or self._transport.is_closing()):
                self._transport.write(b"QUIT\r\n")
                await self._read(1, min(self._timeouts.command, QUIT_TIMEOUT))
        except Exception:
            pass
        finally:
            self._broken = True
            self._transport.close()

    def close(self) -> None:
        """Close at once (no QUIT)."""
        self._broken = True
        if self._conn.closed:
            self._transport.close()
        else:
            self._transport.abort()

    def __repr__(self) -> str:
        return f"<SMTPClient {self._path} tls={self._tls_started} usable={self.usable}>"
