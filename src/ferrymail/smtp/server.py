"""The inbound SMTP server: asyncio listeners driving the sans-IO ``ServerSession``.

One ``SMTPServer`` per startup ``servers[]`` entry; each of its listeners is a plain or a
PROXY-protocol socket. A connection on a proxied listener is checked against the server's
``trusted_proxies`` (on the real TCP peer) before a byte is read, then the PROXY header is
decoded before the banner; from then on the address the header names is *the* client:
in logs, in the Received: header, in relay decisions and in the envelope.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import itertools
import os
import re
import resource
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from ferrymail import auth as authlib
from ferrymail.config import RunningConfig, StartupServer
from ferrymail.config.auth import ServerAuth
from ferrymail.observe.log import (
    enabled,
    flush_before_reply,
    lines_pending,
    log_event,
    log_formatted,
    quote,
)
from ferrymail.observe.metrics import PROXY_HEADER_ERRORS
from ferrymail.proxy import ProxyDecoder, ProxyError, ProxyHeader
from ferrymail.smtp import auth as smtp_auth
from ferrymail.smtp.connlimit import ConnectionLimiter, LimitLog
from ferrymail.smtp.protocol import valid_helo
from ferrymail.smtp.session import (
    R_SPOOL_FAIL,
    R_SPOOL_FULL,
    Authenticate,
    Close,
    Deliver,
    ServerSession,
    SessionLimits,
    SessionPolicy,
    SessionSettings,
    StartTLS,
    Transaction,
)
from ferrymail.spool import BodyWriter, Envelope, ProxyInfo, Spool, SpoolError, SpoolFull
from ferrymail.spool.body import SPILL_AT

# Pause reading from a client once this much unprocessed input waits (e.g. while storing).
MAX_BUFFERED = 256 * 1024
R_TOO_MANY_CONNECTIONS = b"421 4.7.0 too many connections, try again later\r\n"
R_TOO_MANY_FROM_CLIENT = b"421 4.7.0 too many connections from your address, try again later\r\n"
FD_RESERVE = 64  # descriptors kept for the spool, DNS, outbound and the listeners
_DECISIONS_MAX = 4096  # RCPT policy answers kept per server (see SMTPServer.may_accept)

_conn_ids = itertools.count(1)
_ID_PREFIX = f"{os.getpid() & 0xFFFF:04x}{int(time.time()) & 0xFFFFFF:06x}"


@dataclass(frozen=True, slots=True)
class ListenerInfo:
    """One bound listener, as named in logs: ``127.0.0.1:25`` or ``*:25``."""

    name: str
    proxyprotocol: bool
    implicit_tls: bool = False  # RFC 8314: the handshake comes first, the banner after it


def normalise_ip(ip: str) -> str:
    """``::ffff:1.2.3.4`` -> ``1.2.3.4``; IPv6 scope ids dropped; everything else unchanged."""
    if ":" not in ip:
        return ip
    ip = ip.partition("%")[0]
    with contextlib.suppress(ValueError):
        mapped = ipaddress.IPv6Address(ip).ipv4_mapped
        if mapped is not None:
            return str(mapped)
    return ip


def format_addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


_date_cache: list[Any] = [-1, ""]


def _rfc5322_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, localtime=False).replace("-0000", "+0000")
    return _date_cache[1]


_UNSAFE_IN_HEADER = re.compile(r"[()\\;<>]")


def _clean(text: str, limit: int = 200) -> str:
    """A client-supplied word made safe for a header comment/clause."""
    text = text[:limit]
    if not text.isprintable() or _UNSAFE_IN_HEADER.search(text):
        text = "".join(c if c.isprintable() and c not in "()\\;<>" else "?" for c in text)
    return text or "unknown"


_HELO_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_:[]")


def quote_helo(helo: str, limit: int = 200) -> str:
    """A HELO argument that is no domain, percent-encoded (UTF-8) to one token with no
    space, parenthesis, ``;`` or quote: it can never close a comment or start a clause."""
    return "".join(c if c in _HELO_SAFE else "".join(f"%{b:02X}" for b in c.encode())
                   for c in helo[:limit]) or "unknown"


# a dot-atom local part (atext, RFC 5322 §3.2.3, plus UTF-8) up to the last "@"
_DOT_ATOM_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\x80-\U0010ffff-]+@[^@]*\Z")

def received_header(*, helo: str, client_ip: str, client_port: int, hostname: str,
                    protocol: str, ident: str, recipients: list[str], tls: str | None,
                    proxy_ip: str | None, proxy_version: int | None) -> bytes:
    """The Received: trace header (RFC 5321 §4.4) we prepend, CRLF-terminated.

    No client text can add a clause: a HELO that is not a domain or address literal (kept
    under ``policy.helo: accept``) goes into the comment percent-encoded, and the ``for``
    clause names the recipient only when its local part is a dot-atom.
    """
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    if valid_helo(helo):
        lines = [f"Received: from {_clean(helo)} ([{ip}] port {client_port})"]
    else:
        lines = [f"Received: from [{ip}] (port {client_port} helo={quote_helo(helo)})"]
    if proxy_ip is not None:
        lines.append(f"\t(via PROXY v{proxy_version} from {proxy_ip})")
    if tls:
        lines.append(f"\t(using {_clean(tls)})")
    by = f"\tby {hostname} (ferrymail) with {protocol} id {ident}"
    rcpt = recipients[0] if len(recipients) == 1 else ""
    # never list several (that would disclose Bcc recipients), nor a quoted local part
    if rcpt and _DOT_ATOM_LOCAL.match(rcpt) and rcpt.isprintable():
        lines.append(by)
        lines.append(f"\tfor <{_clean(rcpt, 320)}>; {_rfc5322_date()}")
    else:
        lines.append(f"{by}; {_rfc5322_date()}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def transaction_log_head(server_id: str, conn: str, client: str, proxy: str | None,
                         proxy_version: int | None) -> tuple[str, str]:
    """The fields of a connection's ``smtp.transaction`` lines that are the same every
    time, formatted once: those before the optional ``id`` and those after it."""
    after = f"client={quote(client)}"
    if proxy is not None:
        after += f" proxy={quote(proxy)}"
    if proxy_version is not None:
        after += f" proxy_version={proxy_version}"
    return f"server={quote(server_id)} conn={quote(conn)}", after


def transaction_log_fields(head: tuple[str, str], failed_id: str | None, helo: str,
                           tls: str | None, sender: str, recipients: list[str], size: int,
                           qid: str | None, reply: str, error: str | None,
                           duration_ms: int, auth: str | None = None) -> str:
    """The ``smtp.transaction`` fields, as ``log_event`` would format them (for
    ``log_formatted``): ``id`` only for a failed store, ``None`` values left out."""
    rcpts = (f"<{recipients[0]}>" if len(recipients) == 1
             else ",".join([f"<{r}>" for r in recipients]))
    text = (f"{head[0]} id={quote(failed_id)} {head[1]} helo={quote(helo)}"
            if failed_id is not None else f"{head[0]} {head[1]} helo={quote(helo)}")
    if tls is not None:
        text += f" tls={quote(tls)}"
    if auth is not None:
        text += f" auth={quote(auth)}"
    text += f" from={quote(f'<{sender}>')} rcpts={quote(rcpts)} size={quote(size)}"
    if qid is not None:
        text += f" qid={quote(qid)}"
    text += f" reply={quote(reply)}"
    if error is not None:
        text += f" error={quote(error)}"
    return f"{text} duration_ms={quote(duration_ms)}"


class SMTPServer:
    """One startup ``servers[]`` entry: its listeners and its live connections."""

    def __init__(self, config: StartupServer, *, hostname: str, spool: Spool,
                 running: Callable[[], RunningConfig],
                 sockets: Sequence[socket.socket] | None = None) -> None:
        self.config = config
        # a worker's listening sockets, one per listener, opened by the supervisor
        # (supervisor.py); None: open our own
        self._sockets = sockets
        self.id = config.id
        self.hostname = hostname
        self.spool = spool
        self._running = running
        limits = config.limits
        policy = config.policy
        self.settings = SessionSettings(
            hostname=hostname,
            limits=SessionLimits(
                line_length=limits.line_length,
                message_size=limits.message_size,
                recipients=limits.recipients,
                errors=limits.errors,
                # 0 in the config means "no limit"
                messages=limits.messages or (1 << 62),
                junk_commands=limits.junk_commands or (1 << 62),
            ),
            starttls=config.tls.enabled,
            policy=SessionPolicy(
                bare_newline_reject=policy.bare_newline == "reject",
                helo_reject=policy.helo == "reject",
                routed_reject=policy.routed_addresses == "reject",
            ),
        )
        self.limiter = ConnectionLimiter(limits.connections, limits.connections_per_client)
        self.counters = self.limiter.counters  # read by logs and metrics
        self._limit_logs = {"server": LimitLog(), "client": LimitLog()}
        self.ssl_context: ssl.SSLContext | None = None
        if config.tls.enabled:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(config.tls.cert, config.tls.key)  # type: ignore[arg-type]
            self.ssl_context = ctx
        self.timeouts = config.timeouts
        self.connections: set[InboundConnection] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._policy_cache: tuple[RunningConfig | None, Any] = (None, None)
        # may_accept's answers under _policy_cache's configuration: the same few
        # (domain, client) pairs come again and again
        self._decisions: dict[tuple[str, str], bool] = {}
        self.listeners: list[tuple[str, int]] = []
        self.auth_failures = authlib.FailureLimiter()
        # AUTH results since start by result (ok, failed, limited, disabled): for metrics
        self.auth_counts: collections.Counter[str] = collections.Counter()

    # -- lifecycle

    async def start(self) -> None:
        """Bind (unless `bind()` did) and start accepting connections."""
        if not self._servers:
            await self.bind()
        for srv in self._servers:
            await srv.start_serving()

    async def bind(self) -> None:
        """Bind and listen on every listener without accepting yet (e.g. as root, before
        privileges are dropped); OSError naming the listener if one cannot be bound."""
        loop = asyncio.get_running_loop()
        for i, lst in enumerate(self.config.listeners):
            host = None if lst.address is None else str(lst.address)
            name = format_addr(host or "*", lst.port)
            info = ListenerInfo(name, lst.proxyprotocol, lst.tls == "implicit")
            try:
                if self._sockets is not None:
                    srv = await loop.create_server(
                        lambda info=info: InboundConnection(self, info),
                        sock=self._sockets[i], backlog=lst.backlog, start_serving=False)
                else:
                    srv = await loop.create_server(
                        lambda info=info: InboundConnection(self, info),
                        host=host, port=lst.port, backlog=lst.backlog, reuse_address=True,
                        start_serving=False,
                    )
            except OSError as exc:
                await self.stop(0)
                raise OSError(exc.errno, f"server {self.id}: cannot listen on {name}: "
                              f"{exc.strerror}") from exc
            self._servers.append(srv)
            for sock in srv.sockets:
                addr = sock.getsockname()
                self.listeners.append((addr[0], addr[1]))
            # STARTTLS is offered only with a certificate: without one, say so
            log_event("smtp.listening", server=self.id, listener=name,
                      proxyprotocol=lst.proxyprotocol,
                      tls=lst.tls if self.ssl_context is not None else "off")
        self._check_descriptors()

    def _check_descriptors(self) -> None:
        """Warn when the connection limit cannot be reached before descriptors run out:
        then new clients would get a bare EOF, with nothing logged or counted."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return
        limit = self.config.limits.connections
        need = limit + FD_RESERVE
        if limit and soft < need and (hard == resource.RLIM_INFINITY or hard >= need):
            # the soft limit may be raised up to the hard one without privileges
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
                log_event("smtp.limits.descriptors", server=self.id, nofile=need,
                          was=soft, reason="room for limits.connections")
                return
        if limit == 0 or need > soft:
            log_event("smtp.limits.descriptors", "warning", server=self.id,
                      connections=limit or "unlimited", nofile=soft,
                      error=f"limits.connections plus {FD_RESERVE} descriptors for the spool, "
                            "DNS and delivery exceed `ulimit -n`: clients past it would get a "
                            "bare EOF; raise the limit or lower limits.connections")

    def refused(self, which: str, conn: InboundConnection) -> None:
        """A connection limit was hit: one rate-limited log line (counters are exact)."""
        n = self._limit_logs[which].hit(time.monotonic())
        if n:
            limits = self.config.limits
            log_event("smtp.limits.connections", "warning", server=self.id,
                      listener=conn.listener.name, client=conn._client_text(),
                      limit="connections" if which == "server" else "connections_per_client",
                      max=limits.connections if which == "server"
                      else limits.connections_per_client,
                      refused=n, open=self.limiter.total,
                      refused_total=self.counters.refused_server
                      if which == "server" else self.counters.refused_client)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening; idle sessions get a 421 now, busy ones get ``grace`` seconds."""
        for srv in self._servers:
            srv.close()
        self._servers.clear()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections and grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for conn in list(self.connections):
            conn.abort("shutdown")
        if self.connections:
            await asyncio.sleep(0)

    def _added(self, conn: InboundConnection) -> None:
        self.connections.add(conn)
        self._idle.clear()

    def _removed(self, conn: InboundConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()

    # -- policy

    def may_accept(self, domain: str, client_ip: str) -> bool:
        """RCPT policy: our domains from anyone, anything from relay networks; else no."""
        running = self._running()
        cached_for, srv = self._policy_cache
        if cached_for is not running:
            try:
                srv = running.server(self.id)
            except KeyError:
                srv = None
            self._policy_cache = (running, srv)
            self._decisions.clear()  # judged under the previous configuration
        if srv is None:
            return False  # no running settings for this server: accept nothing
        key = (domain, client_ip)
        ok = self._decisions.get(key)
        if ok is None:
            ok = srv.accepts_domain(domain) or srv.may_relay(client_ip)
            if len(self._decisions) >= _DECISIONS_MAX:
                self._decisions.clear()
            self._decisions[key] = ok
        return ok

    def auth_config(self) -> ServerAuth | None:
        """The running ``servers[].auth`` of this server (None: AUTH is not offered)."""
        try:
            return self._running().server(self.id).auth
        except KeyError:
            return None

    def may_relay(self, client_ip: str) -> bool:
        """Whether the client is in the running ``relay_networks`` (trusted to relay)."""
        try:
            return self._running().server(self.id).may_relay(client_ip)
        except (KeyError, ValueError):
            return False

    def trusts(self, ip: str) -> bool:
        try:
            return self.config.trusts_proxy(ip)
        except ValueError:
            return False


_PROXY, _SMTP, _TLS_PENDING, _CLOSED = 0, 1, 2, 3


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Deliver ``data`` to ``protocol`` as if it had been read from the socket."""
    if isinstance(protocol, asyncio.BufferedProtocol) or hasattr(protocol, "get_buffer"):
        view = memoryview(data)
        while view:
            buf = memoryview(protocol.get_buffer(len(view)))  # type: ignore[attr-defined]
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            protocol.buffer_updated(n)  # type: ignore[attr-defined]
            view = view[n:]
    else:
        protocol.data_received(data)  # type: ignore[attr-defined]


class InboundConnection(asyncio.Protocol):
    """One client connection: PROXY header (if the listener wants one), then SMTP."""

    def __init__(self, server: SMTPServer, listener: ListenerInfo) -> None:
        self.server = server
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.state = _PROXY
        self.conn_id = f"{_ID_PREFIX}{next(_conn_ids):x}"
        self.peer_ip = ""
        self.peer_port = 0
        self.client_ip = ""
        self.client_port = 0
        self.proxy: ProxyHeader | None = None
        self.decoder: ProxyDecoder | None = None
        self.session: ServerSession | None = None
        self.tls: str | None = None
        self.started = 0.0
        self.last_activity = 0.0
        # when the current request (command line, or DATA/BDAT content) must be complete
        self.deadline = 0.0
        self.data_phase = False
        self.opened = False  # counted by the server's ConnectionLimiter
        self.claimed: str | None = None  # the client address counted per client
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.task: asyncio.Task[None] | None = None
        self.draining = False
        self.paused = False
        self.received_bytes = 0
        self.tls_early = bytearray()
        self.tls_raw = bytearray()
        self.tls_switched = False
        self.txn_count = 0
        self.close_reason: str | None = None
        self._proxy_cache: tuple[ProxyInfo | None, str | None] | None = None
        self._log_head: tuple[str, str] | None = None  # see transaction_log_head

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's is no subclass)
        self.server._added(self)
        self.started = self.last_activity = self.loop.time()
        peer = transport.get_extra_info("peername")
        if not peer or not peer[0]:
            # Already reset by the peer (a proxy's connect-only health check does that).
            self.close_reason = "reset before accepted"
            self.state = _CLOSED
            transport.abort()
            return
        self.peer_ip, self.peer_port = normalise_ip(str(peer[0])), int(peer[1])
        if not self.server.limiter.open():
            # On a proxied listener nothing may be said before the PROXY header (and reading
            # it would hold the slot we lack): close silently. Otherwise 421 as the greeting
            # (RFC 5321 §3.1).
            self.close_reason = "connection limit"
            self.state = _CLOSED
            if not self.listener.proxyprotocol:
                transport.write(R_TOO_MANY_CONNECTIONS)  # type: ignore[attr-defined]
            self.server.refused("server", self)
            self._close()
            return
        self.opened = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.listener.proxyprotocol:
            self._begin(self.peer_ip, self.peer_port)
            return
        if not self.server.trusts(self.peer_ip):
            PROXY_HEADER_ERRORS.labels(self.server.id, "untrusted").inc()
            log_event("smtp.proxy.untrusted", "warning", server=self.server.id,
                      listener=self.listener.name, peer=format_addr(self.peer_ip, self.peer_port),
                      error="peer is not in trusted_proxies; closed before banner")
            self.close_reason = "untrusted proxy"
            self._close()
            return
        self.decoder = ProxyDecoder()
        self.timer = self.loop.call_later(self.server.timeouts.proxy, self._proxy_timeout)

    def data_received(self, data: bytes) -> None:
        state = self.state
        self.received_bytes += len(data)
        if state == _SMTP:
            now = self.last_activity = self.loop.time()
            session = self.session
            assert session is not None
            event = session.receive(data)
            self._track(now, len(data))
            if event is not None:
                self._after(event)
                return
            # _after for the usual case, inlined: the replies (one write), nothing to do
            out = session.take_output()
            if out:
                self._write(out)
            if session.buffered > MAX_BUFFERED and not self.paused:
                self.paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]
        elif state == _PROXY:
            self._proxy_data(data)
        elif state == _TLS_PENDING:
            if self.tls_switched:
                # Decrypted data can arrive with the client's last handshake flight, before
                # _starttls resumes: it is the first TLS-protected input, keep it.
                self.tls_early += data
            else:
                # Read before start_tls put its TLS protocol on the transport (the client's
                # first handshake bytes): _starttls hands them over.
                self.tls_raw += data
        # _CLOSED: ignore

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = _CLOSED
        if self.session is not None:
            self.session.connection_lost()  # a body file still arriving goes
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server._removed(self)
        if self.opened:
            self.opened = False
            self.server.limiter.release(self.claimed)
            self.claimed = None
        if was == _PROXY and self.close_reason is None:
            if self.decoder is not None and self.decoder.buffered:
                PROXY_HEADER_ERRORS.labels(self.server.id, "truncated").inc()
                log_event("smtp.proxy.error", "warning", server=self.server.id,
                          listener=self.listener.name,
                          peer=format_addr(self.peer_ip, self.peer_port),
                          error=f"connection closed within the PROXY header "
                                f"({len(self.decoder.buffered)} bytes received)")
            else:
                log_event("smtp.proxy.eof", "info", server=self.server.id,
                          listener=self.listener.name,
                          peer=format_addr(self.peer_ip, self.peer_port),
                          error="closed before sending a PROXY header")
            return
        if enabled("debug"):
            session = self.session
            log_event("smtp.disconnect", "debug", server=self.server.id, conn=self.conn_id,
                      listener=self.listener.name, client=self._client_text(),
                      proxy=self._proxy_text(), commands=session.commands if session else 0,
                      messages=self.txn_count, reason=self.close_reason or
                      (f"{type(exc).__name__}: {exc}" if exc else "client closed"),
                      duration_ms=int((self.loop.time() - self.started) * 1000))

    def pause_writing(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused and self.state == _SMTP:
            self.paused = False
            self.transport.resume_reading()

    # -- PROXY

    def _proxy_data(self, data: bytes) -> None:
        assert self.decoder is not None
        try:
            header = self.decoder.feed(data)
        except ProxyError as exc:
            PROXY_HEADER_ERRORS.labels(self.server.id, "malformed").inc()
            log_event("smtp.proxy.error", "warning", server=self.server.id,
                      listener=self.listener.name, peer=format_addr(self.peer_ip, self.peer_port),
                      error=str(exc))
            self.close_reason = "proxy error"
            self._close()
            return
        if header is None:
            return
        rest = self.decoder.rest
        self.decoder = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.proxy = header
        src = header.stream_source
        if src is None:
            # Health checks (v2 LOCAL, v1 UNKNOWN) and what a TCP listener cannot carry
            # (UNSPEC, UNIX, DGRAM): the spec's UNSPEC fallback, the peer is the client.
            if enabled("debug"):
                log_event("smtp.proxy.local", "debug", server=self.server.id,
                          listener=self.listener.name,
                          peer=format_addr(self.peer_ip, self.peer_port),
                          version=header.version, command=header.command, family=header.family,
                          protocol=header.protocol)
            self._begin(self.peer_ip, self.peer_port, rest)
        else:
            self._begin(normalise_ip(src[0]), src[1], rest)
        if rest and self.state == _SMTP:
            self.data_received(rest)

    def _proxy_timeout(self) -> None:
        self.timer = None
        if self.state != _PROXY:
            return
        got = len(self.decoder.buffered) if self.decoder else 0
        PROXY_HEADER_ERRORS.labels(self.server.id, "timeout").inc()
        log_event("smtp.proxy.timeout", "warning", server=self.server.id,
                  listener=self.listener.name, peer=format_addr(self.peer_ip, self.peer_port),
                  error=f"no complete PROXY header within {self.server.timeouts.proxy:g}s "
                        f"({got} bytes received)")
        self.close_reason = "proxy timeout"
        self._close()

    # -- SMTP

    def _begin(self, client_ip: str, client_port: int, early: bytes = b"") -> None:
        """The client is known: greet it, or on an implicit-TLS listener shake hands first
        (``early``: TLS bytes that came with the PROXY header)."""
        self.client_ip, self.client_port = client_ip, client_port
        if not self.server.limiter.claim(client_ip):
            self.close_reason = "connection limit per client"
            self.state = _CLOSED
            self._write(R_TOO_MANY_FROM_CLIENT)
            self.server.refused("client", self)
            self._close()
            return
        self.claimed = client_ip
        auth = self.server.auth_config()
        self.session = ServerSession(self.server.settings, self.server.may_accept, client_ip,
                                     may_relay=self.server.may_relay,
                                     spill=self._open_body, spill_at=SPILL_AT,
                                     auth=auth is not None and self.server.ssl_context is not None,
                                     auth_required=auth is not None and auth.required)
        self.last_activity = self.loop.time()
        self.deadline = self.last_activity + self.server.timeouts.command
        if self.listener.implicit_tls:
            self.state = _TLS_PENDING  # no timer: the handshake has its own timeout
            self.transport.pause_reading()  # type: ignore[union-attr]
            self.task = self.loop.create_task(self._starttls(early, implicit=True))
            return
        self.state = _SMTP
        flush_before_reply()
        self.transport.write(self.session.banner())  # type: ignore[union-attr]
        self._arm_timer()

    # Timeouts. Without `timeouts.deadline` each read restarts the clock (an idle timer).
    # With it (Postfix smtpd_per_request_deadline) a command line must be complete within
    # `command` of its first byte, and DATA/BDAT content within `data` of its start plus
    # 1 s per `min_data_rate` bytes received, never more than `data` past the last read
    # (smtpd_min_data_rate): one byte every 1.5 s no longer keeps a session alive for ever.

    def _track(self, now: float, n: int) -> None:
        """Move the deadline after a read of ``n`` bytes that the session has processed."""
        t = self.server.timeouts
        session = self.session
        assert session is not None
        if session.in_data:
            if not self.data_phase:
                self.data_phase = True
                self._set_deadline(now + t.data)
            elif t.deadline:
                self.deadline = min(self.deadline + n / t.min_data_rate, now + t.data)
            else:
                self.deadline = now + t.data
        elif self.data_phase or not t.deadline or not session.buffered or session.busy:
            self.data_phase = False
            when = self.deadline = now + t.command  # a new request starts
            if when < self.timer_at and self.timer is not None:
                self.timer.cancel()
                self._arm_timer()

    def _set_deadline(self, when: float) -> None:
        self.deadline = when
        if self.timer is not None and when < self.timer_at:
            self.timer.cancel()
            self._arm_timer()

    def _restart_deadline(self) -> None:
        """Our own work (a store, a TLS handshake) ended: the client's clock starts anew."""
        session = self.session
        t = self.server.timeouts
        self.data_phase = session is not None and session.in_data
        self._set_deadline(self.loop.time() + (t.data if self.data_phase else t.command))

    def _arm_timer(self) -> None:
        self.timer_at = self.deadline
        self.timer = self.loop.call_at(self.deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        session = self.session
        if self.state == _CLOSED or session is None:
            return
        if self.state == _SMTP and not session.busy:
            now = self.loop.time()
            if now >= self.deadline:
                timeouts = self.server.timeouts
                limit = timeouts.data if session.in_data else timeouts.command
                idle = now - self.last_activity >= limit
                counters = self.server.counters
                if idle:
                    counters.timeouts_idle += 1
                else:
                    counters.timeouts_deadline += 1
                log_event("smtp.timeout", "info", server=self.server.id, conn=self.conn_id,
                          client=self._client_text(), proxy=self._proxy_text(),
                          phase="data" if session.in_data else "command",
                          kind="idle" if idle else "deadline", timeout=f"{limit:g}s",
                          received=self.received_bytes)
                self.close_reason = "timeout" if idle else "deadline"
                self._write(session.timeout())
                self._close()
                return
        else:
            t = self.server.timeouts  # our own work (store, TLS) does not count
            self.deadline = self.loop.time() + (t.data if session.in_data else t.command)
        self._arm_timer()

    def _after(self, event: Any) -> None:
        """Flush the session's replies (one write) and act on its event."""
        session = self.session
        assert session is not None
        out = session.take_output()
        if out:
            self._write(out)
        if event is None:
            if session.buffered > MAX_BUFFERED and not self.paused:
                self.paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        if isinstance(event, Deliver):
            self.task = self.loop.create_task(self._deliver(event.transaction))
        elif isinstance(event, Authenticate):
            self.task = self.loop.create_task(self._authenticate(event.credentials))
        elif isinstance(event, StartTLS):
            self.state = _TLS_PENDING
            self.transport.pause_reading()  # type: ignore[union-attr]
            self.task = self.loop.create_task(self._starttls())
        elif isinstance(event, Close):
            if event.reason == "internal error":
                log_event("smtp.internal_error", "error", server=self.server.id,
                          conn=self.conn_id, client=self._client_text(),
                          proxy=self._proxy_text(), error=session.internal_error)
            elif event.reason == "too many errors":
                log_event("smtp.errors", "info", server=self.server.id, conn=self.conn_id,
                          client=self._client_text(), proxy=self._proxy_text(),
                          errors=session.errors)
            self.close_reason = self.close_reason or event.reason
            self._close()

    def _resume(self) -> None:
        """Continue with input that arrived while an event was outstanding."""
        if self.state != _SMTP or self.session is None:
            return
        if self.draining and not self.session.in_data:
            self.close_reason = "shutdown"
            self._write(self.session.take_output() + self.session.shutdown())
            self._close()
            return
        self._restart_deadline()
        self._after(self.session.step())
        if not self.session.busy and self.session.in_data != self.data_phase:
            self._restart_deadline()
        if self.paused and not self.session.busy and self.session.buffered <= MAX_BUFFERED:
            self.paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _proxy_info(self) -> tuple[ProxyInfo | None, str | None]:
        """What the PROXY header said, for envelopes, and the proxy's address for logs;
        the same for every transaction of the connection, so built once."""
        cached = self._proxy_cache
        if cached is None:
            proxy = self.proxy
            info = None
            text = None
            if proxy is not None and proxy.stream_source is not None:
                dst = proxy.destination if isinstance(proxy.destination, tuple) else (None, None)
                info = ProxyInfo(
                    version=proxy.version, proxy_ip=self.peer_ip, proxy_port=self.peer_port,
                    source_ip=self.client_ip, source_port=self.client_port,
                    dest_ip=dst[0], dest_port=dst[1], tlv_hex=proxy.tlv_hex(),
                )
                text = format_addr(self.peer_ip, self.peer_port)
            cached = self._proxy_cache = (info, text)
        return cached

    def _received(self, txn: Transaction, ident: str) -> bytes:
        proxy_info = self._proxy_info()[0]
        return received_header(
            helo=txn.helo, client_ip=self.client_ip, client_port=self.client_port,
            hostname=self.server.hostname, protocol=txn.protocol, ident=ident,
            recipients=txn.recipients, tls=self.tls,
            proxy_ip=proxy_info and proxy_info.proxy_ip,
            proxy_version=proxy_info and proxy_info.version,
        )

    def _open_body(self, txn: Transaction) -> BodyWriter:
        """The session's body outgrew memory: a spool file for it, Received: first (its
        queue id is reserved now; the recipients are final once data has begun)."""
        body = self.server.spool.open_body()
        body.write(self._received(txn, body.queue_id))
        return body

    async def _deliver(self, txn: Transaction) -> None:
        server = self.server
        received_at = time.time()
        proxy_info, proxy_text = self._proxy_info()
        self.txn_count += 1
        recipients = txn.recipients
        data: bytes | BodyWriter
        if txn.body_sink is not None:
            # a large body, already in a spool file (Received: included)
            data = txn.body_sink
            txn.body_sink = None  # store() owns it now: commits or removes it
            ident = data.queue_id
            size = data.size
        else:
            ident = server.spool.new_queue_id()
            data = self._received(txn, ident) + txn.body
            size = len(data)
        envelope = Envelope(
            sender=txn.sender,
            recipients=tuple(recipients),
            client_ip=self.client_ip,
            client_port=self.client_port,
            helo=txn.helo,
            server_id=server.id,
            transport=None,  # routed per recipient domain at delivery, with the config then
            proxy=proxy_info,
            tls=self.tls,
            mail_params=tuple(txn.mail_params.items()),
            size=size,
            received_at=received_at,
            auth=txn.auth,
        )
        qid = None
        level = "info"
        error = None
        reply = R_SPOOL_FAIL
        try:
            qid = await server.spool.store(envelope, data, ident)
        except asyncio.CancelledError:
            raise
        except SpoolFull as exc:
            level, error, reply = "warning", str(exc), R_SPOOL_FULL
        except SpoolError as exc:
            level, error = "warning", str(exc)
        except Exception as exc:  # a bug must not acknowledge mail nor kill the server
            level, error = "error", f"{type(exc).__name__}: {exc}"
        if qid is not None:
            reply_text = f"250 2.0.0 OK queued as {qid}"
            reply = f"{reply_text}\r\n".encode()
        else:
            reply_text = reply.decode().rstrip()
        head = self._log_head
        if head is None:
            head = self._log_head = transaction_log_head(
                server.id, self.conn_id, format_addr(self.client_ip, self.client_port),
                proxy_text, proxy_info and proxy_info.version)
        log_formatted("smtp.transaction", level, transaction_log_fields(
            head,
            ident if qid is None else None,  # the id it would have had (named in Received:)
            txn.helo, self.tls, txn.sender, recipients, size, qid, reply_text, error,
            int((time.monotonic() - txn.started) * 1000), txn.auth))
        if lines_pending():
            # The stores of one group commit end together, each task logging a line and
            # then replying, and a reply first writes the lines logged so far: one write per
            # message. Yielding once lets the loop's batched flush write every task's line
            # in one go before the replies (still each after its line and its fsync).
            await asyncio.sleep(0)
        session = self.session
        if session is None:
            return
        session.finish_delivery(reply, queued=qid is not None)
        self.task = None
        if self.state == _CLOSED:
            return
        self._resume()

    async def _authenticate(self, cred: smtp_auth.Credentials) -> None:
        """Check AUTH credentials (rate-limited per client address); one log line each."""
        server = self.server
        cfg = server.auth_config()
        user: str | None = None
        failures: int | None = None
        if cfg is None:  # switched off by a reload during the exchange
            result, reply = "disabled", smtp_auth.R_AUTH_TEMP
        elif server.auth_failures.limited(self.client_ip, cfg.failures, cfg.window):
            result, reply = "limited", smtp_auth.R_AUTH_LIMITED
        elif await authlib.verify(cfg.users, cred.user, cred.password):
            result, reply, user = "ok", smtp_auth.R_AUTH_OK, cred.user
        else:
            result, reply = "failed", smtp_auth.R_AUTH_FAILED
            failures = server.auth_failures.failed(self.client_ip, cfg.window)
        server.auth_counts[result] += 1
        log_event("smtp.auth", "info" if user else "warning", server=server.id,
                  conn=self.conn_id, client=self._client_text(), proxy=self._proxy_text(),
                  mechanism=cred.mechanism, user=cred.user, result=result,
                  failures=failures,
                  limited_total=server.auth_counts["limited"] if result == "limited" else None)
        session = self.session
        self.task = None
        if session is None or self.state == _CLOSED:
            return
        session.finish_auth(user, reply)
        self._resume()

    async def _starttls(self, early: bytes = b"", *, implicit: bool = False) -> None:
        """The TLS handshake, after STARTTLS or at once on an implicit-TLS listener."""
        ctx = self.server.ssl_context
        assert ctx is not None and self.transport is not None
        self.tls_raw += early
        self.tls_switched = False
        try:
            handshake = self.loop.create_task(self.loop.start_tls(
                self.transport, self, ctx, server_side=True,
                ssl_handshake_timeout=self.server.timeouts.command,
            ))
            # One turn of the loop: start_tls's first step puts its TLS protocol on the
            # transport and queues that protocol's connection_made; bytes read before that
            # (kept in tls_raw) are fed to it right after, in order.
            await asyncio.sleep(0)
            self.tls_switched = True
            if self.tls_raw:
                raw, self.tls_raw = bytes(self.tls_raw), bytearray()
                self.loop.call_soon(_feed, self.transport.get_protocol(), raw)
            transport = await handshake
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError, RuntimeError) as exc:
            log_event("smtp.tls.failed", "info", server=self.server.id, conn=self.conn_id,
                      client=self._client_text(), proxy=self._proxy_text(),
                      error=f"{type(exc).__name__}: {exc}")
            self.close_reason = "TLS handshake failed"
            self.task = None
            if self.state != _CLOSED:
                self.transport.abort()
            return
        self.task = None
        if transport is None or self.state == _CLOSED:
            return
        self.transport = transport  # type: ignore[assignment]
        obj = transport.get_extra_info("ssl_object")
        if obj is not None:
            cipher = obj.cipher()
            self.tls = f"{obj.version()} {cipher[0] if cipher else ''}".strip()
        else:
            self.tls = "TLS"
        self.state = _SMTP
        self.last_activity = self.loop.time()
        assert self.session is not None
        if implicit:
            self.session.tls = True
            flush_before_reply()
            transport.write(self.session.banner())
            self.data_phase = False
            self.deadline = self.last_activity + self.server.timeouts.command
            self._arm_timer()
        else:
            self.session.tls_started()
            self._restart_deadline()
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if self.tls_early:
            early, self.tls_early = bytes(self.tls_early), bytearray()
            self.data_received(early)

    # -- helpers

    def _client_text(self) -> str:
        if not self.client_ip:
            return format_addr(self.peer_ip, self.peer_port)
        return format_addr(self.client_ip, self.client_port)

    def _proxy_text(self) -> str | None:
        if self.proxy is None or self.proxy.stream_source is None:
            return None
        return format_addr(self.peer_ip, self.peer_port)

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            flush_before_reply()  # e.g. the smtp.transaction line before its 250
            t.write(data)

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        """The server is stopping: close now if idle, else after the current transaction."""
        self.draining = True
        session = self.session
        if self.state == _PROXY:
            self.close_reason = "shutdown"
            self._close()
        elif self.state == _SMTP and session is not None and not session.busy \
                and not session.in_data:
            self.close_reason = "shutdown"
            self._write(session.shutdown())
            self._close()

    def abort(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()
