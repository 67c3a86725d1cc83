"""The host-wide limiter a worker uses: limits shared by every worker of one ``ferrymail run``.

`HostLimiter` implements `ferrymail.orchestrator.limiter.Limiter` by asking the limiter
service (`ferrymail.orchestrator.hostservice`, a child of the supervisor) over its Unix
socket: one pipelined request per new connection that has a concurrency or interval limit,
one per message that has a rate (for rates above 400/s one per several messages: the slots
are prefetched as the Redis limiter does, `ferrymail.orchestrator.prefetch`), a one-way
release when the connection closes. Checks without such limits (suspensions only, and
suspensions before a prefetched slot is used) are answered here from the spool directory's
suspension file, which the service writes too.

**Service down** (crashed, restarting, not answering within `TIMEOUT`): the worker falls
back to its own `LocalLimiter` with each limit divided by the worker count N (concurrency
⌈limit / N⌉, rates and connect intervals N times slower: the `split` of
`ferrymail.orchestrator.redis`), counting the leases it still holds, and logs one
``limiter.state state=fallback`` line. It reconnects with back-off (0.1 s doubling to 1 s);
on reconnect it first re-registers (``adopt``) every lease it still holds, so the restarted
service counts them and nothing is double-counted, then logs ``limiter.state state=shared``.

**Waiting** for a concurrency slot: the service pushes ``released`` for a key this worker was
refused on when a lease of it is freed; a push wakes one waiter of that key here (the
oldest), and asks for the next push (``subscribe``) while more wait, so a freed slot does not
wake every waiting job of the worker to be refused again. A release that comes between a
refusal and the wait is not missed (a sequence number of pushes is compared).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferrymail.observe.log import log_event
from ferrymail.orchestrator.hostwire import (
    FrameDecoder,
    ProtocolError,
    adopt_to_wire,
    attempt_to_wire,
    denied_from_wire,
    encode,
    lease_limits,
    limit_to_wire,
)
from ferrymail.orchestrator.limiter import Denied, Lease
from ferrymail.orchestrator.local import LocalLimiter
from ferrymail.orchestrator.policy import Attempt, Limit
from ferrymail.orchestrator.prefetch import REFILL_AHEAD, Plan, RateSlots, plan
from ferrymail.orchestrator.suspensions import FILE_NAME, Suspension, SuspensionFile

STATUS_FILE = "limiter-status.json"  # in each worker's shard: its state, for queue list
TIMEOUT = 1.0  # seconds for a reply (or to connect) before falling back
BACKOFF_START, BACKOFF_MAX = 0.1, 1.0
MAX_BUFFER = 1 << 20  # bytes queued to a service that does not read: it is down
ADOPT_CHUNK = 500  # leases per adopt frame (a frame stays far below MAX_FRAME)
WAIT_CAP = 2.0  # seconds: a concurrency wait looks again at least this often


class HostLimiter:
    """`ferrymail.orchestrator.limiter.Limiter` shared by the workers of one host."""

    scope = "host"
    host_wide = True  # the engine puts its per-destination connection cap in here too

    def __init__(self, socket_path: str | Path, spool_dir: str | Path, *, workers: int,
                 worker: int = 0, timeout: float = TIMEOUT,
                 status_file: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(socket_path)
        self.status_file = status_file
        self.workers = max(1, workers)
        self.worker = worker
        self.timeout = timeout
        self.fallback = LocalLimiter(suspensions=SuspensionFile(Path(spool_dir) / FILE_NAME),
                                     divisor=lambda: self.workers, note=self._note)
        self.state = "starting"
        self.last_error = ""
        self._held: dict[str, Lease] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self._next_id = 0
        self._seq = 0  # "released" pushes received
        self._denied_seq: dict[str, int] = {}
        self._key_waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._connected: asyncio.Event | None = None
        self.slots = RateSlots(clock)  # prefetched rate slots, reserved by the service
        self.requests = 0  # requests sent that wait for a reply (round trips)

    # -- state

    @property
    def shared(self) -> bool:
        return self.state == "shared"

    def _note(self) -> str:
        return f"limiter service unreachable: split 1/{self.workers}"

    def fallback_note(self) -> str | None:
        return None if self.shared or self.state == "starting" else self._note()

    def mode(self) -> str:
        return "shared" if self.shared else "split"

    def status(self) -> dict[str, object]:
        return {"scope": self.scope, "state": self.state, "workers": self.workers,
                "leases": len(self._held), "error": self.last_error or None,
                "requests": self.requests,
                "prefetch": self.slots.status()}

    def active_suspensions(self, now: float) -> list[Suspension]:
        return self.fallback.active_suspensions(now)

    def _set(self, state: str) -> None:
        old, self.state = self.state, state
        self.slots.clear()  # a restarted service does not know the slots reserved before
        log_event("limiter.state", "warning" if state == "fallback" else "info", state=state,
                  previous=old, workers=self.workers, socket=str(self.path),
                  limits="split" if state == "fallback" else "host-wide",
                  error=self.last_error if state == "fallback" else None)
        self._write_status()

    def _write_status(self) -> None:
        """The state, atomically, to ``status_file`` (read by ``queue list``)."""
        if self.status_file is None:
            return
        doc = {"state": self.state, "workers": self.workers, "worker": self.worker,
               "since": time.time(), "error": self.last_error or None}
        try:
            tmp = self.status_file.with_name(self.status_file.name + ".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.status_file)
        except OSError as e:
            log_event("limiter.status_failed", "warning", file=str(self.status_file),
                      error=str(e))

    # -- lifecycle

    async def start(self) -> None:
        self._connected = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="ferrymail-host-limiter")
        with contextlib.suppress(TimeoutError):  # not up yet: start in fallback, keep trying
            async with asyncio.timeout(self.timeout):
                await self._connected.wait()

    async def stop(self) -> None:
        await self.slots.stop()  # a refill in flight gets its reply while the reader runs
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close()
        self._wake_all()
        if self.status_file is not None:
            with contextlib.suppress(OSError):
                self.status_file.unlink()

    async def _run(self) -> None:
        backoff = BACKOFF_START
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await asyncio.open_unix_connection(str(self.path))
            except (OSError, TimeoutError) as e:
                self._down(f"cannot connect to {self.path}: {e}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            self._writer = writer
            try:
                writer.write(encode({"op": "hello", "worker": self.worker}))
                held = [lease for lease in self._held.values() if lease.keys]
                for i in range(0, len(held), ADOPT_CHUNK):
                    writer.write(encode({"op": "adopt",
                                         "leases": adopt_to_wire(held[i:i + ADOPT_CHUNK])}))
                for lease in held:
                    lease.shared = True
                self.last_error = ""
                self._set("shared")
                assert self._connected is not None
                self._connected.set()
                self._wake_all()
                await self._read(reader)
                self._down("the limiter service closed the connection")
            except (OSError, ProtocolError) as e:
                self._down(f"{type(e).__name__}: {e}")
            except Exception as e:  # a bug here must not leave the worker without limits
                log_event("limiter.client_error", "error", error=f"{type(e).__name__}: {e}")
                self._down(f"{type(e).__name__}: {e}")
            await asyncio.sleep(BACKOFF_START)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder()
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for msg in decoder.feed(data):
                if msg.get("op") == "released":
                    self._seq += 1
                    self._wake_one(str(msg.get("key")))
                    continue
                rid = msg.get("id")
                if not isinstance(rid, int):
                    raise ProtocolError("a reply without an integer id")
                fut = self._pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    def _wake_one(self, key: str) -> None:
        waiters = self._key_waiters.get(key)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break
        if waiters:
            self._send({"op": "subscribe", "key": key})
        elif waiters is not None:
            del self._key_waiters[key]

    def _wake_all(self) -> None:
        waiters, self._key_waiters = self._key_waiters, {}
        for queue in waiters.values():
            for fut in queue:
                if not fut.done():
                    fut.set_result(None)
        self.fallback.wake()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_result(None)

    def _down(self, error: str) -> None:
        """Answer from the split fallback until the service is back (see module doc)."""
        self._close()
        if self.state == "fallback":
            return
        self.last_error = error
        for lease in self._held.values():  # connections open now keep their slots here
            self.fallback.adopt(lease)
        self._set("fallback")
        self._wake_all()

    async def _request(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """The service's reply, or None when it is down (the fallback answers then)."""
        writer = self._writer
        if not self.shared or writer is None:
            return None
        self._next_id += 1
        self.requests += 1
        rid = obj["id"] = self._next_id
        fut: asyncio.Future[dict[str, Any] | None] = (
            asyncio.get_running_loop().create_future())
        self._pending[rid] = fut
        try:
            writer.write(encode(obj))
            if writer.transport.get_write_buffer_size() > MAX_BUFFER:
                raise OSError("the limiter service does not read its socket")
            async with asyncio.timeout(self.timeout):
                return await fut
        except TimeoutError:
            self._down(f"no reply within {self.timeout:g}s")
        except (OSError, ProtocolError) as e:
            self._down(f"{type(e).__name__}: {e}")
        finally:
            self._pending.pop(rid, None)
        return None

    def _send(self, obj: dict[str, Any]) -> None:
        if self.shared and self._writer is not None:
            try:
                self._writer.write(encode(obj))
            except (OSError, ProtocolError) as e:
                self._down(f"{type(e).__name__}: {e}")

    # -- the Limiter interface

    async def connect(self, attempt: Attempt, limits: tuple[Limit, ...]) -> Lease | Denied:
        lid = secrets.token_hex(8)
        if not any(lim.concurrency is not None or lim.connectinterval is not None
                   for lim in limits):
            return self.fallback.suspended(attempt) or Lease(lid, ())
        reply = await self._request({"op": "connect", "a": attempt_to_wire(attempt),
                                     "l": [limit_to_wire(lim) for lim in limits],
                                     "lease": lid})
        if reply is not None:
            try:
                if "denied" in reply:
                    denied = denied_from_wire(reply["denied"])
                    if denied.key:
                        if len(self._denied_seq) > 10_000:
                            self._denied_seq.clear()
                        self._denied_seq[denied.key] = self._seq
                    return denied
                got = lease_limits(reply.get("limits"))
            except ProtocolError as e:
                self._down(f"bad reply: {e}")
            else:
                lease = Lease(lid, tuple(got), got, shared=True)
                if lease.keys:
                    self._held[lid] = lease
                    if not self.shared:  # the fallback began while the reply came
                        self.fallback.adopt(lease)
                return lease
        got_local = self.fallback.connect_now(attempt, limits, lid)
        if isinstance(got_local, Lease) and got_local.keys:
            self._held[lid] = got_local
        return got_local

    async def message(self, attempt: Attempt, limits: tuple[Limit, ...],
                      lease: Lease | None, ahead: float = 0.0) -> Denied | float | None:
        rates = [lim for lim in limits if lim.rate is not None]
        if not rates:
            return self.fallback.suspended(attempt)
        p = plan(rates)
        if p.count > 1 and self.shared:
            denied = self.fallback.suspended(attempt)  # the service checks it otherwise
            if denied is not None:
                return denied
            hold = await self.slots.take(p, lambda: self._fetch(attempt, rates, p), ahead)
            if hold is not None:
                return hold or None
        with self.slots.fetching(p):
            reply = await self._request(self._message_request(attempt, rates, lease, ahead, p))
            got = self._hold(reply)
            if isinstance(got, tuple):
                self.slots.keep(p, got[0], count=got[1])
                return got[0] or None
        return got if got is not None else self.fallback.message_now(attempt, limits, lease,
                                                                      ahead)

    def _message_request(self, attempt: Attempt, rates: list[Limit], lease: Lease | None,
                         ahead: float, p: Plan) -> dict[str, Any]:
        req = {"op": "message", "a": attempt_to_wire(attempt),
               "l": [limit_to_wire(lim) for lim in rates],
               "lease": lease.id if lease is not None and lease.keys else None, "ahead": ahead}
        if p.count > 1:
            req["slots"] = p.count
        return req

    def _hold(self, reply: dict[str, Any] | None) -> Denied | tuple[float, int] | None:
        """A message reply: (the first slot's hold in seconds, slots reserved), a refusal,
        or None (no answer)."""
        if reply is None:
            return None
        try:
            if "denied" in reply:
                return denied_from_wire(reply["denied"])
            hold, slots = reply.get("hold"), reply.get("slots", 1)
            if not isinstance(hold, (int, float)) or isinstance(hold, bool) or hold < 0:
                raise ProtocolError("hold must be a number >= 0")
            if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
                raise ProtocolError("slots must be a positive integer")
        except ProtocolError as e:
            self._down(f"bad reply: {e}")
            return None
        return float(hold), slots

    async def _fetch(self, attempt: Attempt, rates: list[Limit], p: Plan
                     ) -> tuple[float, int] | None:
        """The next ``p.count`` slots in the background (`RateSlots` refill): the first one's
        hold and how many were reserved; None if refused or the service is down."""
        got = self._hold(await self._request(self._message_request(attempt, rates, None,
                                                                   REFILL_AHEAD, p)))
        return got if isinstance(got, tuple) else None

    async def connected(self, limits: tuple[Limit, ...], ago: float) -> None:
        intervals = [lim for lim in limits if lim.connectinterval is not None]
        if not intervals:
            return
        if self.shared:  # one-way, like release; the service's clock is this host's
            self._send({"op": "connected", "ago": max(0.0, ago),
                        "l": [limit_to_wire(lim) for lim in intervals]})
            return
        self.fallback.connected_now(limits, ago)

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        self.fallback.release(lease)  # marks it released, wakes waiters of this worker
        if self._held.pop(lease.id, None) is not None:
            self._send({"op": "release", "lease": lease.id})

    async def wait(self, denied: Denied, timeout: float) -> None:
        if denied.kind == "concurrency" and denied.key and self.shared:
            if self._denied_seq.get(denied.key, self._seq) != self._seq:
                self._denied_seq.pop(denied.key, None)
                await asyncio.sleep(0)  # a release came since the refusal: try again now
                return
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue = self._key_waiters.setdefault(denied.key, deque())
            queue.append(fut)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(timeout, WAIT_CAP)):
                        await fut
            finally:
                if not fut.done():
                    fut.cancel()
            return
        if denied.retry_after is not None and self.shared:
            # a rate or interval: its time is known, and another job's release does not
            # bring it nearer (waking on one would only send this job to ask again)
            await asyncio.sleep(max(0.0, min(denied.retry_after, timeout)))
            return
        await self.fallback.wait(denied, timeout)

    def wake(self) -> None:
        """A session holding a slot went idle in the pool: the oldest waiter of each key
        looks again (one can take it; waking all would send each to the service)."""
        for key, waiters in list(self._key_waiters.items()):
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
                    break
            if not waiters:
                self._key_waiters.pop(key, None)
        self.fallback.wake()

    async def suspend(self, fields: dict[str, str], duration: float, reason: str) -> None:
        """Through the service (it writes the shared file, one writer for the host); by
        this worker itself while the service is down."""
        reply = await self._request({"op": "suspend", "fields": fields, "duration": duration,
                                     "reason": reason})
        if reply is not None and "error" not in reply:
            return
        await self.fallback.suspend(fields, duration, reason)
