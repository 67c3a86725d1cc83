"""The host limiter service: one `LocalLimiter` for every worker of one ``ferrymail run``.

The supervisor runs it as a child process of its own (`ferrymail.supervisor`) and restarts
it like a worker when it dies. It listens on a Unix stream socket (mode 0600, ``SOCKET_NAME``
in the spool directory) and answers the workers' `ferrymail.orchestrator.host.HostLimiter`
in the framed protocol of `ferrymail.orchestrator.hostwire`.

- **Leases belong to the connection** that took them: when a worker dies, the kernel closes
  its socket and every lease it held is released at once (no TTL).
- **Waiters are woken by a push**: a connection refused for concurrency on a key gets one
  ``released`` notice for that key when a lease of it is freed (by anyone), so its waiting
  jobs retry without polling.
- **Suspensions** are the spool directory's file (every worker reads it too); dynamic ones
  from replies (``suspend``) are written to it here, so they hold host-wide.
- **Prefetch**: a ``message`` request with ``slots`` N reserves N consecutive slots of every
  rate in one GCRA step (`LocalLimiter.message_now`); the worker keeps them
  (`ferrymail.orchestrator.prefetch`).
- **Bounds**: `MAX_CONNECTIONS` connections, `MAX_LEASES_PER_CONNECTION` leases each,
  `prefetch.PREFETCH_MAX` slots a request; a
  frame past `hostwire.MAX_FRAME` or not JSON closes that connection (logged
  ``limiter.protocol_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferrymail.observe import log
from ferrymail.observe.log import log_event
from ferrymail.orchestrator.hostwire import (
    FrameDecoder,
    ProtocolError,
    adopt_from_wire,
    attempt_from_wire,
    denied_to_wire,
    encode,
    lease_id,
    limits_from_wire,
)
from ferrymail.orchestrator.limiter import Denied, Lease
from ferrymail.orchestrator.local import LocalLimiter
from ferrymail.orchestrator.prefetch import PREFETCH_MAX

SOCKET_NAME = "limiter.sock"
MAX_CONNECTIONS = 1024
MAX_LEASES_PER_CONNECTION = 100_000
MAX_SUBSCRIBED_KEYS = 100_000  # keys with a waiting connection; past it, all are woken


def socket_path(spool_dir: str | Path) -> Path:
    """``spool_dir/limiter.sock``, absolute (a relative spool path is the start directory's)."""
    return Path(spool_dir).absolute() / SOCKET_NAME


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter, name: str) -> None:
        self.writer = writer
        self.name = name
        self.leases: dict[str, Lease] = {}

    def send(self, obj: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(obj))


class LimiterService:
    """The state and the request handling (no socket of its own: see `serve`)."""

    def __init__(self, limiter: LocalLimiter) -> None:
        self.limiter = limiter
        self.conns: set[_Conn] = set()
        self.waiting: dict[str, set[_Conn]] = {}  # key -> connections refused on it
        self.requests = 0  # answered (connect, message)
        self.refused = 0

    def handle(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any] | None:
        """One request; the reply (None: no reply). ProtocolError on a malformed request."""
        op = req.get("op")
        rid = req.get("id")
        if op == "release":
            lease = conn.leases.pop(lease_id(req.get("lease")), None)
            if lease is not None:
                self._release(lease)
            return None
        if op == "adopt":
            for lease in adopt_from_wire(req.get("leases")):
                if lease.id not in conn.leases and self._room(conn):
                    self.limiter.adopt(lease)
                    conn.leases[lease.id] = lease
            return None
        if op == "connected":  # one-way: a new connection stands, ``ago`` seconds ago
            ago = req.get("ago")
            if not isinstance(ago, (int, float)) or isinstance(ago, bool) or ago < 0:
                raise ProtocolError("connected needs ago >= 0")
            self.limiter.connected_now(limits_from_wire(req.get("l")), float(ago))
            return None
        if op == "subscribe":  # more waiters of this worker than one push woke
            key = req.get("key")
            if not isinstance(key, str):
                raise ProtocolError("subscribe needs a key")
            self._subscribe(key, conn)
            return None
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise ProtocolError(f"request {op!r} needs an integer id")
        self.requests += 1
        if op == "connect":
            lid = lease_id(req.get("lease"))
            if lid in conn.leases or not self._room(conn):
                raise ProtocolError(f"lease {lid} is already held, or too many leases")
            got = self.limiter.connect_now(attempt_from_wire(req.get("a")),
                                           limits_from_wire(req.get("l")), lid)
            if isinstance(got, Denied):
                self.refused += 1
                if got.kind == "concurrency" and got.key:
                    self._subscribe(got.key, conn)
                return {"id": rid, "denied": denied_to_wire(got)}
            if got.keys:
                conn.leases[got.id] = got
            return {"id": rid, "lease": got.id, "limits": got.limits}
        if op == "message":
            lid = req.get("lease")
            lease = conn.leases.get(lease_id(lid)) if lid is not None else None
            ahead = req.get("ahead", 0.0)
            if not isinstance(ahead, (int, float)) or isinstance(ahead, bool) or ahead < 0:
                raise ProtocolError("ahead must be a number >= 0")
            slots = req.get("slots", 1)
            if (not isinstance(slots, int) or isinstance(slots, bool)
                    or not 1 <= slots <= PREFETCH_MAX):
                raise ProtocolError(f"slots must be an integer from 1 to {PREFETCH_MAX}")
            res = self.limiter.message_now(attempt_from_wire(req.get("a")),
                                           limits_from_wire(req.get("l")), lease, float(ahead),
                                           slots)
            if isinstance(res, Denied):
                self.refused += 1
                return {"id": rid, "denied": denied_to_wire(res)}
            reply: dict[str, Any] = {"id": rid, "hold": res or 0.0}
            if slots > 1:
                reply["slots"] = slots  # reserved: the worker keeps no more than this
            return reply
        raise ProtocolError(f"unknown op {op!r}")

    async def suspend(self, req: dict[str, Any]) -> dict[str, Any]:
        fields, duration, reason = req.get("fields"), req.get("duration"), req.get("reason")
        if not (isinstance(fields, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
                and isinstance(duration, (int, float)) and isinstance(reason, str)):
            raise ProtocolError("suspend needs fields {str: str}, duration, reason")
        try:
            await self.limiter.suspend(fields, float(duration), reason)
        except ValueError as e:
            return {"id": req.get("id"), "error": str(e)}
        return {"id": req.get("id")}

    def _room(self, conn: _Conn) -> bool:
        return len(conn.leases) < MAX_LEASES_PER_CONNECTION

    def _subscribe(self, key: str, conn: _Conn) -> None:
        if key not in self.waiting and len(self.waiting) >= MAX_SUBSCRIBED_KEYS:
            self._notify_all()
        self.waiting.setdefault(key, set()).add(conn)

    def _notify_all(self) -> None:
        for key in list(self.waiting):
            for c in self.waiting.pop(key):
                c.send({"op": "released", "key": key})

    def _release(self, lease: Lease) -> None:
        self.limiter.release(lease)
        for key in lease.keys:
            for c in self.waiting.pop(key, ()):
                c.send({"op": "released", "key": key})

    def closed(self, conn: _Conn) -> None:
        """The connection is gone (its worker died or stopped): free all it held."""
        self.conns.discard(conn)
        for waiters in self.waiting.values():
            waiters.discard(conn)
        leases, conn.leases = conn.leases, {}
        if leases:
            log_event("limiter.leases_freed", worker=conn.name, leases=len(leases))
        for lease in leases.values():
            self._release(lease)

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer, "?")
        if len(self.conns) >= MAX_CONNECTIONS:
            log_event("limiter.connection_refused", "warning", limit=MAX_CONNECTIONS)
            writer.close()
            return
        self.conns.add(conn)
        decoder = FrameDecoder()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for req in decoder.feed(data):
                    if req.get("op") == "hello":
                        conn.name = str(req.get("worker", "?"))[:32]
                        continue
                    if req.get("op") == "suspend":
                        conn.send(await self.suspend(req))
                        continue
                    reply = self.handle(conn, req)
                    if reply is not None:
                        conn.send(reply)
        except ProtocolError as e:
            log_event("limiter.protocol_error", "warning", worker=conn.name, error=str(e),
                      effect="connection closed, its leases freed")
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed(conn)
            writer.close()


async def serve(spool_dir: str | Path, ready: Callable[[], None] | None = None) -> None:
    """Serve on ``spool_dir/limiter.sock`` until SIGTERM/SIGINT."""
    path = socket_path(spool_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    limiter = LocalLimiter.for_spool(str(spool_dir))
    service = LimiterService(limiter)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o177)  # the socket is created 0600: the workers' user only
    try:
        server = await asyncio.start_unix_server(service.client, path=str(path))
    finally:
        os.umask(old)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, log.reopen)  # logrotate, forwarded by the supervisor
    log_event("limiter.started", pid=os.getpid(), socket=str(path))
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        server.close()
        for conn in list(service.conns):
            conn.writer.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        log_event("limiter.stopped", pid=os.getpid(), requests=service.requests,
                  refused=service.refused)
