"""Connection reuse: idle SMTP sessions kept per (source, proxy, destination IP, port, TLS mode).

After a transaction a session that is still usable and has sent fewer than
``connection.reuse.messages`` messages is parked here for ``connection.reuse.idle`` seconds;
the next attempt for the same path takes it instead of connecting again. A reaper closes
sessions whose idle time ran out. The peer may close a parked session at any time: `take`
skips sessions that are no longer usable, and the engine reconnects once if a taken session
fails before any reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from ferrymail.delivery.connect import Source
from ferrymail.smtp.client import SMTPClient

MAX_IDLE = 1000  # parked sessions in all; the oldest is closed to make room
REAP_EVERY = 1.0


@dataclass(frozen=True)
class PoolKey:
    """What a session must match to be reused: same source, HELO, proxy, destination, TLS."""

    source: Source
    dest_ip: str
    dest_port: int
    tls: str


@dataclass
class _Parked:
    client: SMTPClient
    expires: float


class ConnectionPool:
    """Idle sessions by `PoolKey`, each at most until its idle deadline."""

    def __init__(self, *, max_idle: int = MAX_IDLE,
                 clock: Callable[[], float] = time.monotonic,
                 on_closed: Callable[[SMTPClient], None] | None = None) -> None:
        self.max_idle = max_idle
        self.clock = clock
        self.on_closed = on_closed  # called once a session the pool closed is closed
        self._idle: dict[PoolKey, list[_Parked]] = {}
        self._order: OrderedDict[int, PoolKey] = OrderedDict()  # id(client) -> key, oldest first
        self._closing: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        # jobs waiting for a session of a key to be parked (`wait_parked`), oldest first
        self._waiters: dict[PoolKey, deque[asyncio.Future[None]]] = {}
        self.reused = 0  # sessions handed out again (for tests and metrics)

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_loop(), name="ferrymail-pool-reaper")

    async def close(self) -> None:
        """Close every parked session (with QUIT) and stop the reaper."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for key in list(self._idle):
            for parked in self._idle.pop(key):
                self._quit(parked.client)
        self._order.clear()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5)

    def take(self, key: PoolKey) -> SMTPClient | None:
        """A usable parked session for ``key`` (most recently parked first), or None."""
        return self.take_or_dead(key)[0]

    def take_or_dead(self, key: PoolKey) -> tuple[SMTPClient | None, bool]:
        """`take`, and whether a parked session of ``key`` was found closed by the peer
        before its idle time ran out (a sign the path, e.g. its proxy, went away)."""
        entries = self._idle.get(key)
        now = self.clock()
        dead = False
        while entries:
            parked = entries.pop()
            self._order.pop(id(parked.client), None)
            if parked.client.usable and parked.expires > now:
                if not entries:
                    del self._idle[key]
                self.reused += 1
                return parked.client, dead
            dead = dead or parked.expires > now
            self._quit(parked.client)
        self._idle.pop(key, None)
        return None, dead

    def put(self, key: PoolKey, client: SMTPClient, *, idle: float, max_messages: int,
            wake: bool = True) -> bool:
        """Park ``client`` if it can take another message; else QUIT it. True if parked.
        ``wake``: wake the oldest `wait_parked` waiter of ``key``."""
        if idle <= 0 or not client.usable or client.transactions >= max_messages:
            self._quit(client)
            return False
        while len(self._order) >= self.max_idle:
            _, old_key = self._order.popitem(last=False)
            old = self._idle.get(old_key)
            if old:
                self._quit(old.pop(0).client)
                if not old:
                    del self._idle[old_key]
        self._idle.setdefault(key, []).append(_Parked(client, self.clock() + idle))
        self._order[id(client)] = key
        if wake:
            self.wake_one(key)
        return True

    def wake_one(self, key: PoolKey) -> None:
        """Wake the oldest job waiting in `wait_parked` for ``key`` (a session was parked, or
        one of its sessions closed and the waiter should look again)."""
        waiters = self._waiters.get(key)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def parked(self, key: PoolKey, wanted: Callable[[SMTPClient], bool] | None = None) -> int:
        """How many sessions of ``key`` (for which ``wanted`` is true) are parked; some may
        since have been closed by the peer (`take` skips those)."""
        entries = self._idle.get(key, ())
        if wanted is None:
            return len(entries)
        return sum(1 for p in entries if wanted(p.client))

    def last_parked(self, key: PoolKey) -> SMTPClient | None:
        """The session `take` would try first for ``key`` (the most recently parked)."""
        entries = self._idle.get(key)
        return entries[-1].client if entries else None

    def waiting(self, key: PoolKey) -> int:
        """How many jobs wait in `wait_parked` for a session of ``key``."""
        return len(self._waiters.get(key, ()))

    async def wait_parked(self, key: PoolKey, timeout: float) -> bool:
        """Wait until a session of ``key`` is parked (True), at most ``timeout`` seconds
        (False). Each parking wakes one waiter, the oldest; it still has to `take` it."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, deque())
        waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                waiters.remove(fut)
            if not waiters and self._waiters.get(key) is waiters:
                del self._waiters[key]

    def has_idle(self, wanted: Callable[[SMTPClient], bool]) -> bool:
        """Whether a parked session for which ``wanted`` is true exists."""
        return any(wanted(p.client) for entries in self._idle.values() for p in entries)

    def close_idle(self, wanted: Callable[[SMTPClient], bool]) -> bool:
        """QUIT the longest-idle parked session for which ``wanted`` is true (e.g. one
        holding a concurrency slot another delivery waits for); True if there was one."""
        for cid, key in self._order.items():
            entries = self._idle.get(key, [])
            for i, parked in enumerate(entries):
                if id(parked.client) == cid and wanted(parked.client):
                    del entries[i]
                    if not entries:
                        del self._idle[key]
                    del self._order[cid]
                    self._quit(parked.client)
                    return True
        return False

    def discard(self, client: SMTPClient) -> None:
        """Close a session that is not parked (e.g. after a failure) without waiting."""
        client.close()

    def reap(self) -> int:
        """Close sessions past their idle deadline or closed by the peer; returns how many."""
        now = self.clock()
        closed = 0
        for key in list(self._idle):
            keep = []
            for parked in self._idle[key]:
                if parked.expires > now and parked.client.usable:
                    keep.append(parked)
                else:
                    self._order.pop(id(parked.client), None)
                    self._quit(parked.client)
                    closed += 1
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return closed

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY)
            self.reap()

    def _quit(self, client: SMTPClient) -> None:
        task = asyncio.get_running_loop().create_task(client.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        if self.on_closed is not None:
            on_closed = self.on_closed
            task.add_done_callback(lambda _: on_closed(client))
