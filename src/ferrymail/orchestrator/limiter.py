"""The one interface delivery asks for slots, whichever scope answers (process or Redis).

``connect(attempt, limits)`` before opening a connection: suspensions, then every
concurrency lease and every connection interval of ``limits``, all or none; a `Lease` or a
`Denied`. ``message(attempt, limits, lease, ahead)`` before each message on a connection, new or
reused: suspensions, the lease still held (extended), every rate, all or none; with
``ahead`` > 0 a rate slot up to that far in the future is reserved and the seconds to hold
the message are returned (None: send now). ``connected(limits, ago)`` once the connection
stands, ``ago`` seconds after its TCP connection was established: every connection interval
of ``limits`` then counts from that moment (the grant was taken before connecting, and a
connect delayed by a busy event loop must not bring the next one closer). ``release``
when the connection closes. ``wait(denied, timeout)`` sleeps until a slot may be free: a
release in this process, the computed time for rates and intervals, or a short poll for what
other instances hold. Nothing here spins or counts a delivery attempt.

GCRA (generic cell rate algorithm, as in ATM's and redis-cell's): a counter keeps a
theoretical arrival time ``tat``; a message at ``now`` passes iff
``now >= max(tat, now) - (burst - 1) * interval``, and then ``tat = max(tat, now) + interval``.
Over any window of W seconds at most ``W / interval + burst`` messages pass
(``interval = S / N`` for a rate of N per S seconds), and with ``burst`` 1 two passes are at
least ``interval`` apart, which is what ``connectinterval`` uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from ferrymail.orchestrator.policy import Attempt, Limit

if TYPE_CHECKING:
    from ferrymail.orchestrator.suspensions import Suspension

STATUS_FILE = "cluster-status.json"  # in the spool directory: the cluster state, for queue list
EPSILON = 1e-9  # seconds: float sums of intervals must not make an on-time request late

DenyKind = Literal["concurrency", "rate", "connectinterval", "suspended", "lost", "closed"]


@dataclass(frozen=True)
class Denied:
    """Why no slot now: ``reason`` for logs and ``queue list``; ``retry_after`` seconds until
    it may pass (None: until a connection somewhere is released)."""

    kind: DenyKind
    reason: str
    retry_after: float | None = None
    key: str = ""  # the counter that refused (concurrency: whose lease would free it)


@dataclass
class Lease:
    """Concurrency slots one connection holds (one member per concurrency key)."""

    id: str
    keys: tuple[str, ...]
    limits: dict[str, int] = field(default_factory=dict)  # key -> concurrency at acquisition
    shared: bool = False  # held in Redis (False: in this process, e.g. during a fallback)
    lost: bool = False  # the store no longer has it: close the connection after this message
    released: bool = False


def gcra(tat: float | None, now: float, interval: float, burst: int, ahead: float = 0.0,
         slots: int = 1, spacing: float = 0.0) -> tuple[bool, float, float]:
    """One GCRA step: (allowed, tat to store if allowed, seconds to wait).

    ``ahead`` > 0 reserves a slot up to that many seconds in the future: allowed, and the
    wait is how long to hold the message before sending it (its conforming time), so a
    sender that wakes late loses no slot. Refused: the wait is until a reservation could
    be made (until the slot itself with ``ahead`` 0). ``slots`` > 1 reserves that many
    consecutive slots, each counted as ``max(interval, spacing)`` (the caller uses them
    ``spacing`` apart, the largest interval of the message's rates, so a faster rate is
    never used later than its slot by more than a constant: prefetch, see
    `ferrymail.orchestrator.prefetch`); the wait is the first one's."""
    t = now if tat is None or tat < now else tat
    allow_at = t - (burst - 1) * interval
    if allow_at - now <= ahead + EPSILON:
        step = interval if slots == 1 else max(interval, spacing)
        return True, t + slots * step, max(0.0, allow_at - now)
    return False, t, allow_at - now - ahead


def ms(seconds: float) -> str:
    """``80 ms`` / ``2.5 s``: a wait for people."""
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Limiter(Protocol):
    """What the delivery engine uses; see the module doc."""

    async def connect(self, attempt: Attempt, limits: tuple[Limit, ...]) -> Lease | Denied: ...

    async def message(self, attempt: Attempt, limits: tuple[Limit, ...],
                      lease: Lease | None, ahead: float = 0.0) -> Denied | float | None: ...

    async def connected(self, limits: tuple[Limit, ...], ago: float) -> None: ...

    def release(self, lease: Lease) -> None: ...

    async def wait(self, denied: Denied, timeout: float) -> None: ...

    def wake(self) -> None: ...

    async def suspend(self, fields: dict[str, str], duration: float, reason: str) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, object]: ...

    def active_suspensions(self, now: float) -> list[Suspension]: ...
