"""The in-process limiter: exact limits for one instance (no ``cluster`` section).

Concurrency is a set of lease ids per key; rates and connection intervals are GCRA states
per key on a monotonic clock (injectable, so tests run on a fake one). A waiter wakes on any
release in this process or at the computed time, never by polling.

``divisor`` serves the Redis limiter's fallback: each limit is divided by it (concurrency
rounded up, at least 1; rates and intervals stretched by it), see `ferrymail.orchestrator.redis`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import Callable

from ferrymail.observe.log import log_event
from ferrymail.orchestrator.limiter import Denied, Lease, gcra, ms
from ferrymail.orchestrator.policy import Attempt, Limit
from ferrymail.orchestrator.suspensions import (
    FILE_NAME,
    Suspension,
    SuspensionFile,
    first_match,
    new_suspension,
)

MAX_KEYS = 100_000  # GCRA states kept; past it, states that no longer limit are dropped


def divided(limit: int, divisor: int) -> int:
    """A concurrency limit's share: ⌈limit / divisor⌉, at least 1."""
    return max(1, math.ceil(limit / max(1, divisor)))


class LocalLimiter:
    """`ferrymail.orchestrator.limiter.Limiter` for one process."""

    scope = "local"

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 suspensions: SuspensionFile | None = None,
                 divisor: Callable[[], int] | None = None,
                 note: Callable[[], str] | None = None) -> None:
        self.clock = clock
        self.wall = wall
        self.file = suspensions
        self.divisor = divisor or (lambda: 1)
        self.note = note  # appended to reasons (e.g. "redis unreachable: split 1/3")
        self._held: dict[str, set[str]] = {}
        self._tat: dict[str, float] = {}
        self._waiters: set[asyncio.Future[None]] = set()
        self.dynamic: list[Suspension] = []  # from replies, when there is no file

    @classmethod
    def for_spool(cls, spool_dir: str) -> LocalLimiter:
        from pathlib import Path

        return cls(suspensions=SuspensionFile(Path(spool_dir) / FILE_NAME))

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._wake()

    # -- checks

    def suspended(self, attempt: Attempt) -> Denied | None:
        items = self.file.current() if self.file is not None else []
        s = first_match([*items, *self.dynamic], attempt, self.wall())
        if s is None:
            return None
        return Denied("suspended", s.describe(), max(0.0, s.until - self.wall()))

    def _why(self, text: str) -> str:
        note = self.note() if self.note is not None else ""
        return f"{text} ({note})" if note else text

    def held(self, key: str) -> int:
        return len(self._held.get(key, ()))

    async def connect(self, attempt: Attempt, limits: tuple[Limit, ...]) -> Lease | Denied:
        return self.connect_now(attempt, limits)

    def connect_now(self, attempt: Attempt, limits: tuple[Limit, ...],
                    lease_id: str | None = None) -> Lease | Denied:
        denied = self.suspended(attempt)
        if denied is not None:
            return denied
        d = self.divisor()
        now = self.clock()
        for lim in limits:
            if lim.concurrency is not None:
                allowed = divided(lim.concurrency, d)
                if self.held(lim.key) >= allowed:
                    return Denied("concurrency", self._why(
                        f"concurrency {self.held(lim.key)}/{allowed} for {lim.label}"),
                        key=lim.key)
        new_tats: dict[str, float] = {}
        for lim in limits:
            if lim.connectinterval is not None:
                key = lim.interval_key
                ok, tat, wait = gcra(self._tat.get(key), now, lim.connectinterval * d, 1)
                if not ok:
                    return Denied("connectinterval", self._why(
                        f"connectinterval {lim.connectinterval:g}s for {lim.label}: next "
                        f"connection in {ms(wait)}"), wait)
                new_tats[key] = tat
        self._tat.update(new_tats)
        lease = Lease(lease_id or secrets.token_hex(8),
                      tuple(lim.key for lim in limits if lim.concurrency is not None))
        for lim in limits:
            if lim.concurrency is not None:
                self._held.setdefault(lim.key, set()).add(lease.id)
                lease.limits[lim.key] = lim.concurrency
        self._prune(now)
        return lease

    async def message(self, attempt: Attempt, limits: tuple[Limit, ...],
                      lease: Lease | None, ahead: float = 0.0) -> Denied | float | None:
        return self.message_now(attempt, limits, lease, ahead)

    def message_now(self, attempt: Attempt, limits: tuple[Limit, ...],
                    lease: Lease | None, ahead: float = 0.0,
                    slots: int = 1) -> Denied | float | None:
        """As `message`; ``slots`` > 1 reserves that many consecutive slots of every rate
        (the limiter service's answer to a prefetch, `ferrymail.orchestrator.prefetch`)."""
        denied = self.suspended(attempt)
        if denied is not None:
            return denied
        if lease is not None and lease.lost:
            return Denied("lost", "the connection's concurrency lease was lost")
        d = self.divisor()
        now = self.clock()
        new_tats: dict[str, float] = {}
        worst: Denied | None = None
        hold = 0.0
        spacing = max((lim.rate.interval * d for lim in limits if lim.rate is not None),
                      default=0.0)
        for lim in limits:
            if lim.rate is None:
                continue
            key = lim.rate_key
            ok, tat, wait = gcra(self._tat.get(key), now, lim.rate.interval * d, lim.rate.burst,
                                 ahead, slots, spacing)
            if ok:
                new_tats[key] = tat
                hold = max(hold, wait)
            elif worst is None or (worst.retry_after or 0) < wait:
                worst = Denied("rate", self._why(
                    f"rate {lim.rate} for {lim.label}: next slot in {ms(wait)}"), wait)
        if worst is not None:
            return worst
        self._tat.update(new_tats)
        return hold or None

    async def connected(self, limits: tuple[Limit, ...], ago: float) -> None:
        self.connected_now(limits, ago)

    def connected_now(self, limits: tuple[Limit, ...], ago: float) -> None:
        """Every connection interval of ``limits`` counts from ``ago`` seconds before now,
        when the connection was established (never moved earlier)."""
        d = self.divisor()
        at = self.clock() - ago
        for lim in limits:
            if lim.connectinterval is not None:
                key = lim.interval_key
                self._tat[key] = max(self._tat.get(key, at), at + lim.connectinterval * d)

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        for key in lease.keys:
            held = self._held.get(key)
            if held is not None:
                held.discard(lease.id)
                if not held:
                    del self._held[key]
        self._wake()

    def adopt(self, lease: Lease) -> None:
        """Count ``lease`` here too (a shared lease kept through a Redis outage)."""
        for key in lease.keys:
            self._held.setdefault(key, set()).add(lease.id)

    async def wait(self, denied: Denied, timeout: float) -> None:
        """Until a release here, or ``denied.retry_after``, at most ``timeout`` seconds."""
        delay = timeout if denied.retry_after is None else min(denied.retry_after, timeout)
        if delay <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await fut
        finally:
            self._waiters.discard(fut)

    def wake(self) -> None:
        """Wake every waiter now (e.g. a session holding a slot is idle in the pool)."""
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def suspend(self, fields: dict[str, str], duration: float, reason: str) -> None:
        s = new_suspension(fields, duration, reason, origin="reply", now=self.wall())
        now = self.wall()
        if self.file is not None:
            try:
                self.file.add(s, now)
            except (OSError, ValueError) as e:
                log_event("suspension.store_failed", "warning", error=str(e),
                          effect="kept in memory only")
            else:
                return
        self.dynamic = [*[x for x in self.dynamic if x.until > now][-999:], s]

    def _prune(self, now: float) -> None:
        if len(self._tat) > MAX_KEYS:
            # A state at or before now limits nothing more than no state does.
            self._tat = {k: t for k, t in self._tat.items() if t > now}

    def active_suspensions(self, now: float) -> list[Suspension]:
        """Suspensions in force at ``now`` (Unix seconds): the file's and the dynamic ones."""
        items = self.file.current() if self.file is not None else []
        return [s for s in (*items, *self.dynamic) if s.until > now]

    def status(self) -> dict[str, object]:
        return {"scope": self.scope, "leases": sum(map(len, self._held.values())),
                "keys": len(self._held)}
