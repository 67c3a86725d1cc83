"""Prefetched rate slots: one round trip to a shared store reserves several, kept locally.

Used by the limiters whose store is a round trip away: `ferrymail.orchestrator.redis`
(``message.lua``) and `ferrymail.orchestrator.host` (the limiter service). A message's rates
are planned (`plan`): ``count`` slots per request, as many as fit in `PREFETCH_WINDOW` at
the slowest rate of the message (its largest interval, the ``spacing``), at most
`PREFETCH_MAX`. Only rates faster than 400/s get more than one (2.5 ms apart: two fit in
5 ms); a rate of 20/s costs one round trip per message, as before.

The store reserves ``count`` consecutive GCRA slots in one step (`limiter.gcra` with
``slots``, ``message.lua`` with ``slots``) and answers the first one's hold; the caller uses
that one and keeps the others (`RateSlots.keep`) at ``time of the answer + hold + i ·
spacing``, never earlier than the store reserved them. A kept slot is used at or after its
time and at most `LATE` after it, else dropped (a slot cannot be saved for later: that would
bunch it with the slots after it). So over any window of W seconds at most
``(W + LATE) / interval + burst`` messages pass a rate (``interval = S / N``): the GCRA bound
plus ``N · LATE / S`` messages (0.5 % of a second's count), the documented tolerance
(property-tested against a real limiter service in ``tests/unit/test_prefetch.py``).

Before the kept slots run out (the last one is taken, or its use-by time is within
`REFILL_BEFORE`), the next ``count`` are fetched in the background, reserved up to
`REFILL_AHEAD` ahead (so that a rate that binds, whose next slot is just after the kept
ones, is refilled too), so that messages seldom wait for a round trip: waiting, not the
call, cost the delivery rate (bench/shaping.py). Messages that find no slot while a fetch
for the same rates is in flight wait for it and take one of its slots rather than ask too.
A kept slot further ahead than a message's ``ahead`` stays kept (the store is asked, and
says how long to wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from ferrymail.observe.log import log_event
from ferrymail.orchestrator.limiter import EPSILON
from ferrymail.orchestrator.policy import Limit

PREFETCH_WINDOW, PREFETCH_MAX = 0.005, 64  # seconds of slots per request; slots per request
LATE = 0.005  # a kept slot not used within this long after its time is dropped
REFILL_BEFORE = 0.002  # kept slots this close to running out are refetched in the background
REFILL_AHEAD = PREFETCH_WINDOW  # a refill reserves up to this far ahead (after the kept ones)
MAX_KEYS = 10_000  # rate-key sets with kept slots; past it, all kept slots are dropped

Fetch = Callable[[], Awaitable[tuple[float, int] | None]]
"""A background request for a plan's ``count`` slots with ``ahead`` `REFILL_AHEAD`: (the
first slot's hold in seconds, slots reserved), or None when refused or the store is down
(it raises nothing)."""


@dataclass(frozen=True)
class Plan:
    """How one message's rates are prefetched: ``key`` the rate keys (whose slots are
    interchangeable), ``spacing`` seconds between kept slots (the largest interval),
    ``count`` slots per request (1: no prefetch)."""

    key: tuple[str, ...]
    spacing: float
    count: int


def plan(rates: Sequence[Limit]) -> Plan:
    """The plan for a message whose limits with a rate are ``rates`` (at least one)."""
    spacing = max(lim.rate.interval for lim in rates if lim.rate is not None)
    count = max(1, min(PREFETCH_MAX, int(PREFETCH_WINDOW / spacing)))
    return Plan(tuple(lim.rate_key for lim in rates), spacing, count)


class RateSlots:
    """The slots one limiter keeps, per rate-key set, and its fetches in flight.

    ``take`` gives a kept slot (refilling in the background when they run low); a caller
    that gets None asks the store itself inside ``fetching`` and hands the answer to
    ``keep``. ``clock`` is monotonic seconds (injectable for tests); it must be the clock
    the store's holds are measured against (this host's for the limiter service)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._slots: dict[tuple[str, ...], deque[float]] = {}
        self._fetching: dict[tuple[str, ...], asyncio.Future[None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()  # background refills
        self.dropped = 0  # kept slots dropped unused (more than LATE past their time)
        self.overflows = 0  # times MAX_KEYS was reached (every kept slot dropped)

    async def take(self, p: Plan, refill: Fetch, ahead: float = 0.0) -> float | None:
        """Seconds to hold the message for a kept slot (0.0: send now; at most ``ahead``),
        or None: none kept (or the next is further ahead), ask the store. ``refill``
        fetches the next slots when these run low."""
        if p.count <= 1:
            return None
        for _ in range(3):  # slots another message of ours is fetching: wait, take one
            now = self.clock()
            kept = self._slots.get(p.key)
            while kept:
                t = kept[0]
                if t - now > ahead + EPSILON:
                    return None  # kept for later; the store says how long to wait
                kept.popleft()
                if t >= now - LATE:
                    if not kept or kept[-1] + LATE - now < REFILL_BEFORE:
                        self._refill(p, refill)
                    return t - now if t - now > EPSILON else 0.0
                self.dropped += 1
            pending = self._fetching.get(p.key)
            if pending is None:
                break
            await asyncio.shield(pending)
        return None

    @contextlib.contextmanager
    def fetching(self, p: Plan) -> Iterator[None]:
        """Marks a request for ``p``'s slots in flight: ``take`` of the same rates waits
        for it instead of sending one more."""
        fut = self._begin(p.key)
        try:
            yield
        finally:
            self._end(p.key, fut)

    def _begin(self, key: tuple[str, ...]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fetching.setdefault(key, fut)
        return fut

    def _end(self, key: tuple[str, ...], fut: asyncio.Future[None]) -> None:
        if self._fetching.get(key) is fut:
            del self._fetching[key]
        fut.set_result(None)

    def keep(self, p: Plan, hold: float, *, first: int = 1, count: int | None = None) -> None:
        """Keep slots ``first`` .. ``count - 1`` of an answer whose first slot is ``hold``
        seconds from now (``first`` 1: the caller uses slot 0 itself); ``count`` is what the
        store says it reserved (default ``p.count``, never more)."""
        count = p.count if count is None else min(count, p.count)
        if count <= first:
            return
        start = self.clock() + hold
        if p.key not in self._slots and len(self._slots) >= MAX_KEYS:
            self.overflows += 1
            log_event("limiter.prefetch_overflow", "warning", keys=len(self._slots),
                      limit=MAX_KEYS, effect="every kept rate slot dropped")
            self._slots.clear()
        self._slots.setdefault(p.key, deque()).extend(
            start + i * p.spacing for i in range(first, count))

    def clear(self) -> None:
        """Drop every kept slot (the store that reserved them is gone or replaced)."""
        self._slots.clear()

    def status(self) -> dict[str, int]:
        return {"keys": len(self._slots), "dropped": self.dropped, "overflows": self.overflows}

    def kept(self, key: tuple[str, ...]) -> int:
        return len(self._slots.get(key, ()))

    def _refill(self, p: Plan, refill: Fetch) -> None:
        if p.key in self._fetching:
            return
        fut = self._begin(p.key)  # at once: the next take must not start a second refill

        async def fetch() -> None:
            try:
                got = await refill()
                if got is not None:
                    self.keep(p, got[0], first=0, count=got[1])
            except Exception as e:  # a bug here must not leave a task's error unread
                log_event("limiter.prefetch_failed", "error", error=f"{type(e).__name__}: {e}")
            finally:
                self._end(p.key, fut)

        task = asyncio.get_running_loop().create_task(fetch())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stop(self, timeout: float = 2.0) -> None:
        """Let background refills finish (at most ``timeout`` s), then drop what is kept."""
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=timeout)
            for task in late:
                task.cancel()
        self.clear()
