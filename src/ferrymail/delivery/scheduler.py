"""The scheduler: ready queues per destination, bounded concurrency, retry timing.

Messages come from the spool (`due`), are split into `Job`s (one per recipient domain) and
wait in their destination's ready queue. A destination is the transport plus the next hop:
the transport's fixed ``connection.server`` when it has one (every domain routed there shares
the queue, its health and its connections), else the recipient domain. A queue id is "in
flight" from fetch until all its jobs end and is excluded from `due`, so no recipient is ever
tried twice at once.

Starting jobs (`_dispatch`): destinations take turns while the total is under
``queues.total_concurrency``. Each may run what its health allows (`destinations.py`: slow
start from ``initial_concurrency``, halved on a connection failure, KumoMTA's ready-count
curve, 0 while dead, 1 while probing, the others waiting for the probe's verdict);
destinations without a recent success together hold at most ``unproven_share`` of the
total, so tarpits and silent MXs never take every slot.
The engine reports each attempt's verdict on the destination (`feedback`); a destination
marked dead has its waiting jobs, and any fetched later, deferred at once through
``defer_job`` (no connection) until the parking period ends and one probe goes out.

Fetching: a full look at the spool (everything due, soonest first) refills the ready queues
up to ``fetch_limit`` waiting jobs whenever fewer than ``low_water`` wait, and at least every
FULL_FETCH_EVERY seconds or when a retry comes due; a job's end alone does not query the spool
above the low-water mark. New mail (`wake()`) is fetched at once, whatever waits: by queue id
after the newest fetched, with room for up to another ``fetch_limit`` jobs. A destination's
ready queue holds at most ``fetch_limit`` jobs, or UNPROVEN_READY while it has no recent
success; a message with a job for a full destination is "parked" (left in the spool, kept out
of fetches) until that queue has drained to half or the destination proves itself, so a dead
or hung destination's backlog cannot keep mail for others from being fetched.

The loop wakes when mail is stored (`wake()`), when a job ends, or at the spool's
`next_due()`. Retry timing (`plan_retry`) is pure and walks ``retry.intervals`` by attempt
number (the last interval repeats), bounded by ``retry.count`` and ``retry.during``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ferrymail.config.models import Retry, RunningConfig
from ferrymail.delivery.connect import hostport
from ferrymail.delivery.destinations import DestinationHealth, HealthState, Transition
from ferrymail.delivery.routing import recipient_domain, transport_id_for
from ferrymail.observe.log import log_event
from ferrymail.spool import QueuedMessage, RecipientRecord, Spool, SpoolError

IDLE_POLL = 5.0  # longest sleep while something due could not be fetched (in flight)
COOLDOWN = 30.0  # a job that crashed (a bug, not a delivery result): its message rests this long
FULL_FETCH_EVERY = 1.0  # longest time between full looks at the spool while jobs keep ending
PARK_MAX_FACTOR = 4  # at most fetch_limit * this parked queue ids (kept out of fetches)
DEFER_BATCH = 64  # jobs of dead destinations deferred concurrently (one spool commit)
UNPROVEN_READY = 4  # waiting jobs an unproven destination may hold; more are parked
HEALTH_KEEP = 10000  # idle destinations' health records kept before pruning
STATE_WRITE_EVERY = 1.0  # seconds between writes of the destination state file
DESTINATIONS_FILE = "destinations.json"  # its name in the spool directory (`queue list`)
UNPROVEN_LOG_EVERY = 10.0  # seconds between log lines about a full unproven share
MX_SITE_TTL = 300.0  # seconds a learned MX set keeps a domain on that set's queue
MX_SITES_MAX = 100_000  # learned domains kept (then forgotten at once and relearned)


# -- retry timing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPlan:
    """What follows a temporary failure of a recipient's ``attempts``-th attempt."""

    expired: bool  # retry.count or retry.during exhausted: bounce now
    next_attempt: float  # when to try again (meaningless if expired)
    notify: bool  # a "delayed" DSN is due now (a notify interval was reached)
    notified: int  # the recipient's new count of "delayed" DSNs sent
    reason: str = ""  # why it expired


def plan_retry(retry: Retry, attempts: int, received_at: float, now: float,
               notified: int = 0) -> RetryPlan:
    """Schedule after a temporary failure; ``attempts`` counts this attempt (1 = first try).

    The wait is ``intervals[attempts-1]`` (the last one repeats). The recipient expires once
    ``attempts - 1`` retries reached ``retry.count``, or once it is ``retry.during`` seconds
    old; the next attempt is never later than that age limit, so the last try happens at it.
    A "delayed" notice is due when the interval used has ``notify: true`` and that step was not
    notified yet (a repeating last interval notifies once).
    """
    deadline = received_at + retry.during
    if attempts - 1 >= retry.count:
        return RetryPlan(True, now, False, notified,
                         f"retry count {retry.count} exhausted after {attempts} attempts")
    if now >= deadline:
        return RetryPlan(True, now, False, notified,
                         f"maximum queue time {retry.during:g}s exceeded")
    step = min(max(attempts, 1), len(retry.intervals)) - 1
    interval = retry.intervals[step]
    steps_to_notify = sum(1 for iv in retry.intervals[: step + 1] if iv.notify)
    notify = interval.notify and steps_to_notify > notified
    return RetryPlan(
        False,
        min(now + interval.interval, deadline),
        notify,
        max(notified, steps_to_notify) if notify else notified,
    )


# -- jobs and destinations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """A ready queue's key: the transport and the next hop.

    The next hop is the transport's fixed ``connection.server`` (``host:port``) when it has
    one: every recipient domain routed there shares one queue, its health and its connections
    (KumoMTA's MX rollup). Otherwise it is the recipient domain (``nexthop`` empty).
    """

    transport: str  # "" when routing failed (unknown server id): the engine reports it
    domain: str  # the recipient domain; "" for a fixed next hop shared by several domains
    nexthop: str = ""

    @property
    def name(self) -> str:
        """The next hop if fixed, else the recipient domain."""
        return self.nexthop or self.domain

    def __str__(self) -> str:
        return f"{self.transport or '?'}/{self.name or '-'}"


@dataclass(frozen=True)
class Job:
    """One attempt's work: the recipients of one message that share a destination."""

    message: QueuedMessage
    destination: Destination
    recipients: tuple[RecipientRecord, ...]

    @property
    def queue_id(self) -> str:
        return self.message.queue_id

    @property
    def domain(self) -> str:
        """The recipient domain (a job's recipients share one)."""
        return recipient_domain(self.recipients[0].address) if self.recipients else ""


def destination_for(cfg: RunningConfig, transport: str, domain: str,
                    mx_site: Callable[[str], str | None] | None = None) -> Destination:
    """The queue for ``domain`` via ``transport``: its fixed server if it has one, else the
    MX site ``mx_site(domain)`` learned from an earlier lookup (``mx:`` + its MX host names),
    else the domain itself."""
    try:
        conn = cfg.transport(transport).connection
    except KeyError:
        return Destination(transport, domain)
    if conn.server is not None:
        return Destination(transport, "", hostport(conn.server, conn.port))
    site = mx_site(domain) if mx_site is not None else None
    if site is not None:
        return Destination(transport, "", f"{site}:{conn.port}")
    return Destination(transport, domain)


def mx_site_name(hosts: Sequence[str]) -> str:
    """KumoMTA's site name for an MX set: ``mx:`` + the sorted, lower-cased host names."""
    return "mx:" + ",".join(sorted({h.lower().rstrip(".") for h in hosts}))


def split_jobs(message: QueuedMessage, cfg: RunningConfig, now: float,
               mx_site: Callable[[str], str | None] | None = None) -> list[Job]:
    """The jobs for a message's pending recipients that are due at ``now``: one per
    recipient domain, each with its destination (`destination_for`)."""
    groups: dict[tuple[Destination, str], list[RecipientRecord]] = {}
    for rec in message.recipients:
        if not rec.state.pending or rec.next_attempt > now:
            continue
        try:
            transport = transport_id_for(rec, message.envelope, cfg)
        except KeyError:
            transport = ""
        domain = recipient_domain(rec.address)
        # One job per recipient domain even on a shared next hop: the pre-delivery hook
        # decides per domain. The jobs share the next hop's queue, health and connections.
        dest = destination_for(cfg, transport, domain, mx_site)
        groups.setdefault((dest, domain), []).append(rec)
    return [Job(message, d, tuple(rs)) for (d, _), rs in groups.items()]


class Scheduler:
    """Feeds jobs from the spool to ``run_job`` under the concurrency limits of the config.

    ``run_job`` must record the results in the spool itself and may return the earliest
    next_attempt it set (so the scheduler wakes then even while other messages, due but in
    flight, hide it from `Spool.next_due`). An exception from it is logged, and the message
    rests for COOLDOWN seconds (its recipients are unchanged and would be due at once).
    ``low_water`` defaults to a fifth of ``fetch_limit``.

    A job holds its concurrency slot until ``run_job`` returns or calls `release` (once its
    connection work is over and only the recording of results is left); its queue id stays in
    flight until ``run_job`` returns either way.
    """

    def __init__(
        self,
        spool: Spool,
        config: Callable[[], RunningConfig],
        run_job: Callable[[Job], Awaitable[float | None]],
        *,
        clock: Callable[[], float] = time.time,
        fetch_limit: int = 1000,
        low_water: int | None = None,
        defer_job: Callable[[Job, str, float], Awaitable[float | None]] | None = None,
        state_path: Path | None = None,
    ) -> None:
        self.share = 1  # workers sharing queues.concurrency host-wide (see _dispatch)
        if fetch_limit < 1:
            raise ValueError(f"fetch_limit must be at least 1, not {fetch_limit}")
        self.spool = spool
        self.config = config
        self.run_job = run_job
        self.clock = clock
        self.fetch_limit = fetch_limit
        self.low_water = min(fetch_limit, max(1, fetch_limit // 5 if low_water is None
                                              else low_water))
        self.fetches = 0  # calls of Spool.due (for tests and profiling)
        self._ready: dict[Destination, deque[Job]] = {}
        self._waiting = 0  # jobs in the ready queues
        self._active: dict[Destination, int] = {}
        self._total = 0
        self._slots: dict[int, Destination] = {}  # id(job) -> its destination, while it has a slot
        self._in_flight: dict[str, int] = {}  # queue id -> jobs not finished
        self._cooldown: dict[str, float] = {}  # queue id -> monotonic time it may run again
        self._parked: dict[Destination, set[str]] = {}  # full destination -> ids left behind
        self._newest: str | None = None  # highest queue id fetched so far
        self._wakeups: list[float] = []  # heap of clock() times something becomes due
        self._next_due: float | None = None  # the spool's next_due() at the last full fetch
        self._full_at = 0.0  # monotonic time of the next full fetch, at the latest
        self._new_mail = False  # wake() was called: fetch what was stored since
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.idle = asyncio.Event()  # set while nothing is in flight or waiting (for tests)
        self.defer_job = defer_job
        self.state_path = state_path
        self._health: dict[Destination, DestinationHealth] = {}
        self._unproven_slots: set[int] = set()  # id(job) of slots held by unproven destinations
        self._fed: set[int] = set()  # id(job) of running jobs that reported feedback
        self._deferring: deque[tuple[Job, str, float]] = deque()
        self._defer_task: asyncio.Task[None] | None = None
        self._state_write: asyncio.TimerHandle | None = None
        self._mx_sites: dict[str, tuple[str, float]] = {}  # domain -> (site, monotonic expiry)
        self._unproven_full = False  # the unproven share is full (since it last had room)
        self._unproven_logged = -UNPROVEN_LOG_EVERY  # monotonic time of the last log line
        self.unproven_share_hits = 0  # times the unproven share filled up (counted bound)
        # called with a queue id once its last running attempt ended (admin queue actions)
        self.on_released: list[Callable[[str], None]] = []

    # -- lifecycle

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="ferrymail-scheduler")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop fetching, let running jobs finish for up to ``timeout`` s, then cancel them.

        A cancelled job has recorded nothing: its recipients come due again after a restart.
        """
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self._ready.clear()
        self._waiting = 0
        if self._state_write is not None:
            self._state_write.cancel()
            self._write_state()  # the last states, for `queue list` while stopped

    def wake(self) -> None:
        """New mail was stored (or something changed): look at the spool now."""
        self._new_mail = True
        self._wake.set()

    @property
    def running(self) -> int:
        return self._total

    @property
    def waiting(self) -> int:
        return self._waiting

    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    def release(self, job: Job) -> None:
        """``job`` no longer needs its concurrency slot (its results are being recorded):
        start the next job now. Its queue id stays in flight until ``run_job`` returns."""
        if self._free_slot(job) and not self._stopping:
            self._dispatch()

    # -- queue control (admin): a claimed queue id is kept out of fetches like one in flight

    def claim(self, queue_id: str) -> bool:
        """Keep ``queue_id`` from being fetched until `unclaim`; False if an attempt runs."""
        if queue_id in self._in_flight:
            return False
        self._in_flight[queue_id] = 0  # no job: nothing but `unclaim` removes it
        return True

    def unclaim(self, queue_id: str) -> None:
        """End a `claim` and look at the whole spool at once (e.g. the message is due now)."""
        if self._in_flight.get(queue_id) == 0:
            del self._in_flight[queue_id]
        self._full_at = 0.0
        self._wake.set()

    def parked(self) -> frozenset[str]:
        """Queue ids left in the spool because a destination of theirs had a full queue."""
        return frozenset(q for ids in self._parked.values() for q in ids)

    # -- the loop

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                sleep = await self._fill()
            except SpoolError as e:
                log_event("scheduler.error", "error", error=str(e))
                sleep = 1.0
            except Exception as e:  # never let the loop die: mail would stop leaving
                log_event("scheduler.error", "error", error=f"{type(e).__name__}: {e}")
                sleep = 1.0
            self._dispatch()
            if not self._in_flight and not self._waiting:
                self.idle.set()
            else:
                self.idle.clear()
            if sleep > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(sleep):
                        await self._wake.wait()

    async def _fill(self) -> float:
        """Fetch due messages into the ready queues; returns how long to sleep afterwards."""
        cfg = self.config()
        if cfg.queues.hold:
            self._new_mail = False
            self._full_at = 0.0
            return IDLE_POLL  # held: keep everything queued; a reload wakes us
        new_mail, self._new_mail = self._new_mail, False
        now = self.clock()
        mono = time.monotonic()
        if self._cooldown:
            self._cooldown = {q: t for q, t in self._cooldown.items() if t > mono}
        for dest in [d for d in self._parked
                     if len(self._ready.get(d, ())) < max(self._ready_cap(d, mono) // 2, 1)]:
            del self._parked[dest]  # drained enough: its parked messages may come back
        while self._wakeups and self._wakeups[0] <= now:
            heapq.heappop(self._wakeups)
            self._full_at = 0.0  # a retry came due
        if self._waiting < self.low_water or mono >= self._full_at:
            return await self._fill_full(cfg, now, mono)
        if new_mail and self._newest is not None:
            room = min(self.fetch_limit, 2 * self.fetch_limit - self._waiting)
            if room > 0:
                self.fetches += 1
                messages = await self.spool.due(now, limit=room, after=self._newest)
                taken = self._take(messages, cfg, now)
                if len(messages) >= room and taken:
                    self._new_mail = True  # there may be more
                    return 0.0
        return self._sleep(now, mono)

    async def _fill_full(self, cfg: RunningConfig, now: float, mono: float) -> float:
        """Everything due, soonest first, up to fetch_limit waiting jobs."""
        room = self.fetch_limit - self._waiting
        if room <= 0 and any(len(q) >= self.fetch_limit for q in self._ready.values()):
            # a full destination takes the room: still look past it, a little at a time
            room = min(self.low_water, 2 * self.fetch_limit - self._waiting)
        if room > 0:
            exclude = [*self._in_flight, *self._cooldown]
            for ids in self._parked.values():
                exclude += ids
            self.fetches += 1
            messages = await self.spool.due(now, limit=room, exclude=exclude)
            parked_before = sum(map(len, self._parked.values()))
            taken = self._take(messages, cfg, now)
            parked_now = sum(map(len, self._parked.values())) - parked_before
            if len(messages) >= room and parked_now and not taken:
                self._full_at = 0.0  # all went to full queues: look past them at once
                return 0.0
        self._next_due = await self.spool.next_due()
        now = self.clock()
        mono = time.monotonic()
        # While jobs keep waking us (above the low-water mark they do not fetch), look at
        # everything now and then: retries coming due, mail stored with an older queue id.
        self._full_at = mono + (FULL_FETCH_EVERY if self._waiting >= self.low_water
                                else IDLE_POLL)
        # A next_due in the past belongs to a message in flight (or not fetched for lack of
        # room): a job's end wakes us for those. Otherwise sleep until the soonest known time.
        if self._next_due is not None and self._next_due > now:
            self._full_at = min(self._full_at, mono + self._next_due - now)
        return self._sleep(now, mono)

    def _sleep(self, now: float, mono: float) -> float:
        times = [self._full_at - mono]
        if self._wakeups:
            times.append(self._wakeups[0] - now)
        return min(max(min(times), 0.0), IDLE_POLL)

    def _take(self, messages: list[QueuedMessage], cfg: RunningConfig, now: float) -> int:
        """Put the jobs of ``messages`` in the ready queues; returns how many messages."""
        taken = 0
        parked = sum(map(len, self._parked.values()))
        for msg in messages:
            qid = msg.queue_id
            if self._newest is None or qid > self._newest:  # fixed-width hex: ordered as text
                self._newest = qid
            if qid in self._in_flight:  # (a fetch by id does not exclude those in flight)
                continue
            jobs = split_jobs(msg, cfg, now, self.mx_site)
            if not jobs:
                continue
            mono = time.monotonic()
            full = next((j.destination for j in jobs
                         if len(self._ready.get(j.destination, ()))
                         >= self._ready_cap(j.destination, mono)), None)
            if full is not None:
                if parked < self.fetch_limit * PARK_MAX_FACTOR:
                    self._parked.setdefault(full, set()).add(qid)
                    parked += 1
                continue
            self._in_flight[qid] = len(jobs)
            for job in jobs:
                health = self._health.get(job.destination)
                if health is not None:  # a parking period that ended: probing now
                    self._note(job.destination, health.tick(mono), health,
                               cfg.queues.concurrency)
                if health is not None and health.state is HealthState.DEAD:
                    self._defer(job, health, mono)  # parked at once: no attempt starts
                    continue
                self._ready.setdefault(job.destination, deque()).append(job)
                self._waiting += 1
            taken += 1
        return taken

    def _ready_cap(self, dest: Destination, mono: float) -> int:
        """Waiting jobs ``dest`` may hold: fetch_limit, or UNPROVEN_READY while it has no
        recent success (a tarpit's backlog must not fill the ready queues)."""
        health = self._health.get(dest)
        if health is not None and health.proven(mono, self.config().queues.destination):
            return self.fetch_limit
        return min(self.fetch_limit, UNPROVEN_READY)

    def _dispatch(self) -> None:
        """Start jobs, destinations taking turns, within every limit (see `destinations`)."""
        cfg = self.config()
        # one of N workers sharing a host-wide cap: its window aims at its share, so that
        # workers do not keep asking for slots the others hold (the cap itself stays exact)
        per_dest = max(1, math.ceil(cfg.queues.concurrency / self.share))
        total = cfg.queues.total_concurrency
        policy = cfg.queues.destination
        unproven_cap = max(1, math.ceil(total * policy.unproven_share))
        mono = time.monotonic()
        started = True
        while started and self._total < total:
            started = False
            for dest in list(self._ready):
                if self._total >= total:
                    break
                queue = self._ready[dest]
                active = self._active.get(dest, 0)
                health = self._health_of(dest, per_dest)
                self._note(dest, health.tick(mono), health, per_dest)
                if health.state is HealthState.DEAD:
                    # parked: no attempt while dead. While probing, the others wait (at most
                    # UNPROVEN_READY) for the probe's verdict: deferring them for a whole
                    # backoff would hold mail for a destination that answered the probe.
                    while queue:
                        self._waiting -= 1
                        self._defer(queue.pop(), health, mono)
                if not queue:
                    del self._ready[dest]
                    continue
                if active >= health.allowed(mono, per_dest, len(queue) + active):
                    continue
                unproven = not health.proven(mono, policy)
                if unproven and len(self._unproven_slots) >= unproven_cap:
                    self._unproven_share_full(dest, unproven_cap)
                    continue
                self._start(queue.popleft(), unproven)
                self._waiting -= 1
                started = True
                if not queue:
                    del self._ready[dest]

    def _start(self, job: Job, unproven: bool = False) -> None:
        dest = job.destination
        self._active[dest] = self._active.get(dest, 0) + 1
        self._total += 1
        self._slots[id(job)] = dest
        if unproven:
            self._unproven_slots.add(id(job))
        task = asyncio.create_task(self._guard(job), name=f"deliver-{job.queue_id}-{dest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _free_slot(self, job: Job) -> bool:
        dest = self._slots.pop(id(job), None)
        if dest is None:
            return False  # released already
        if id(job) in self._unproven_slots:
            self._unproven_slots.discard(id(job))
            self._unproven_full = False  # the share has room: the next time it fills counts
        self._active[dest] -= 1
        if not self._active[dest]:
            del self._active[dest]
        self._total -= 1
        return True

    async def _guard(self, job: Job) -> None:
        try:
            when = await self.run_job(job)
            if when is not None:
                heapq.heappush(self._wakeups, when)
            if id(job) not in self._fed:
                self.feedback(job, True)  # no word on the destination: it did its part
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._job_failed(job, e)
        finally:
            self._fed.discard(id(job))
            self._free_slot(job)
            self._job_done(job)

    def _job_failed(self, job: Job, e: Exception) -> None:
        """A job raised: nothing was recorded, so without a pause the message would be due
        again at once; it waits ``COOLDOWN`` seconds, logged."""
        self._cooldown[job.queue_id] = time.monotonic() + COOLDOWN
        heapq.heappush(self._wakeups, self.clock() + COOLDOWN)
        log_event("scheduler.job_error", "error", qid=job.queue_id,
                  destination=str(job.destination), error=f"{type(e).__name__}: {e}",
                  retry_in_s=COOLDOWN)

    def _job_done(self, job: Job) -> None:
        """``job`` is over (run or deferred): its message leaves flight after its last job."""
        left = self._in_flight.get(job.queue_id, 1) - 1
        if left <= 0:
            self._in_flight.pop(job.queue_id, None)
            for callback in self.on_released:
                try:
                    callback(job.queue_id)
                except Exception as e:  # a bug there must not stop the scheduling below
                    log_event("scheduler.callback_error", "error", qid=job.queue_id,
                              error=f"{type(e).__name__}: {e}")
        else:
            self._in_flight[job.queue_id] = left
        if not self._stopping:
            self._dispatch()
            self._wake.set()

    def _unproven_share_full(self, dest: Destination, cap: int) -> None:
        """The bound on slots of unproven destinations held back ``dest``: counted each time
        the share fills up, logged at most every UNPROVEN_LOG_EVERY seconds."""
        if self._unproven_full:
            return
        self._unproven_full = True
        self.unproven_share_hits += 1
        mono = time.monotonic()
        if mono - self._unproven_logged < UNPROVEN_LOG_EVERY:
            return
        self._unproven_logged = mono
        holders: dict[str, int] = {}
        for job_id in self._unproven_slots:
            held = self._slots.get(job_id)
            if held is not None:
                holders[str(held)] = holders.get(str(held), 0) + 1
        log_event("scheduler.unproven_share_full", "warning", cap=cap, waiting=str(dest),
                  held_by=",".join(f"{d}:{n}" for d, n in sorted(holders.items())),
                  times=self.unproven_share_hits,
                  effect="destinations without a recent success wait; proven ones go on")

    # -- MX rollup

    def learn_mx(self, domain: str, hosts: Sequence[str]) -> None:
        """``domain``'s MX hosts (from the engine's lookup): later jobs for it go to the
        queue of that MX set, shared with every domain that has the same set, for
        MX_SITE_TTL seconds."""
        if not hosts:
            return
        if len(self._mx_sites) >= MX_SITES_MAX:
            self._mx_sites.clear()  # bounded; relearned at the next lookups
        self._mx_sites[domain.lower()] = (mx_site_name(hosts), time.monotonic() + MX_SITE_TTL)

    def mx_site(self, domain: str) -> str | None:
        """The MX site learned for ``domain``, if still fresh."""
        known = self._mx_sites.get(domain.lower())
        if known is None or known[1] < time.monotonic():
            return None
        return known[0]

    # -- destination health

    def feedback(self, job: Job, ok: bool | None, error: str = "") -> None:
        """What ``job``'s attempt says about its destination: True = the peer answered (a
        session or a reply), False = a connection-level failure (refused, timeout, EOF before
        the banner, a refused session), None = nothing (config, hook, loop). ``run_job``
        calls this once before `release`; a job that returns without it counts as True."""
        self._fed.add(id(job))
        if ok is None:
            return
        cfg = self.config()
        limit = cfg.queues.concurrency
        dest = job.destination
        health = self._health_of(dest, limit)
        mono = time.monotonic()
        if ok:
            self._note(dest, health.success(mono, cfg.queues.destination, limit), health, limit)
            if dest in self._parked:
                del self._parked[dest]  # proven: what waited behind its small cap may come
                self._wake.set()
            return
        change = health.failure(mono, cfg.queues.destination, limit, error)
        self._note(dest, change, health, limit)
        if health.state is HealthState.DEAD:
            self._parked.pop(dest, None)  # fetched again, they are deferred until the probe

    def _health_of(self, dest: Destination, limit: int) -> DestinationHealth:
        health = self._health.get(dest)
        if health is None:
            if len(self._health) >= HEALTH_KEEP:
                self._prune_health()
            health = self._health[dest] = DestinationHealth(self.config().queues.destination,
                                                            limit)
        return health

    def _prune_health(self) -> None:
        """Forget idle destinations that are neither dead nor probing (bounded memory)."""
        busy = set(self._ready) | set(self._active) | set(self._parked)
        for dest, h in list(self._health.items()):
            if dest not in busy and h.state in (HealthState.NORMAL, HealthState.SLOW_START):
                del self._health[dest]

    def _note(self, dest: Destination, change: Transition | None, health: DestinationHealth,
              limit: int) -> None:
        """One log line per state change (and a state-file write soon after)."""
        if change is None:
            return
        mono = time.monotonic()
        fields: dict[str, object] = {
            "destination": str(dest), "from": change.before.value, "to": change.after.value,
            "state": health.describe(limit, mono), "failures": health.failures,
            "reason": change.reason, "waiting": len(self._ready.get(dest, ())),
            "active": self._active.get(dest, 0),
        }
        level = "info"
        if change.after is HealthState.DEAD:
            level = "warning"
            fields["dead_until"] = _iso(self.clock() + health.dead_until - mono)
        log_event("destination.state", level, **fields)
        self._schedule_state_write()

    def destinations(self) -> list[dict[str, object]]:
        """Destinations with work, failures, or dead or probing: their state (`queue list`).

        A dead destination past its period shows as ``dead 0s`` until the scheduler next
        looks at it (that look is the logged transition to probing)."""
        cfg = self.config()
        limit = cfg.queues.concurrency
        mono = time.monotonic()
        now = self.clock()
        out: list[dict[str, object]] = []
        for dest, h in self._health.items():
            waiting = len(self._ready.get(dest, ()))
            active = self._active.get(dest, 0)
            if (not waiting and not active and not h.failures
                    and h.state in (HealthState.NORMAL, HealthState.SLOW_START)):
                continue
            row: dict[str, object] = {
                "destination": str(dest), "state": h.state.value,
                "describe": h.describe(limit, mono), "window": int(h.window), "limit": limit,
                "failures": h.failures, "waiting": waiting, "active": active,
                "error": h.last_error,
            }
            if h.state is HealthState.DEAD:
                row["dead_until"] = now + h.dead_until - mono
            out.append(row)
        return out

    def _schedule_state_write(self) -> None:
        if self.state_path is None or self._state_write is not None:
            return
        loop = asyncio.get_running_loop()
        self._state_write = loop.call_later(STATE_WRITE_EVERY, self._write_state)

    def _write_state(self) -> None:
        """Write `destinations` to ``state_path`` atomically (read by ``queue list``)."""
        self._state_write = None
        if self.state_path is None:
            return
        doc = {"written_at": self.clock(), "destinations": self.destinations()}
        tmp = self.state_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, self.state_path)
        except OSError as e:
            log_event("scheduler.state_write_failed", "warning", path=str(self.state_path),
                      error=str(e))

    # -- parking: jobs for a dead destination end at once

    def _defer(self, job: Job, health: DestinationHealth, mono: float) -> None:
        """End ``job`` without an attempt at its destination: deferred by ``defer_job``
        until the destination's next probe (or, without it, kept out of fetches till then)."""
        wait = max(health.dead_until - mono, 0.0) if health.state is HealthState.DEAD else (
            max(health.backoff, 1.0))
        state = health.describe(self.config().queues.concurrency, mono)
        reason = (f"destination {job.destination} is {state}"
                  f" ({health.failures} connection failures"
                  f"{': ' + health.last_error if health.last_error else ''}); "
                  "delivery temporarily suspended")
        if self.defer_job is None:
            self._cooldown[job.queue_id] = mono + wait
            heapq.heappush(self._wakeups, self.clock() + wait)
            self._job_done(job)
            return
        self._deferring.append((job, reason, wait))
        if self._defer_task is None or self._defer_task.done():
            self._defer_task = asyncio.create_task(self._defer_worker(),
                                                   name="ferrymail-scheduler-defer")
            self._tasks.add(self._defer_task)
            self._defer_task.add_done_callback(self._tasks.discard)

    async def _defer_worker(self) -> None:
        """Defer parked jobs DEFER_BATCH at a time (the spool commits them together)."""
        while self._deferring:
            batch = [self._deferring.popleft()
                     for _ in range(min(DEFER_BATCH, len(self._deferring)))]
            await asyncio.gather(*(self._defer_one(*item) for item in batch))

    async def _defer_one(self, job: Job, reason: str, wait: float) -> None:
        assert self.defer_job is not None
        try:
            when = await self.defer_job(job, reason, wait)
            if when is not None:
                heapq.heappush(self._wakeups, when)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._job_failed(job, e)
        finally:
            self._job_done(job)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def destination_lines(spool_dir: Path, now: float) -> list[str]:
    """The running scheduler's destination states from ``spool_dir/DESTINATIONS_FILE``, as
    text lines for ``queue list`` (none if the file is absent; one line if it is unreadable).

    ``  live/127.0.0.1:2525  slow_start 3/20  waiting=4 active=2`` or
    ``  t/[10.0.0.1]:25  dead 42s  failures=3  error="network: ... refused"``.
    """
    path = spool_dir / DESTINATIONS_FILE
    try:
        doc = json.loads(path.read_text())
        rows = doc["destinations"]
        written = float(doc["written_at"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"destinations: cannot read {path}: {e}"]
    out = [f"destinations (as of {_iso(written)}, {len(rows)} not at full speed or busy):"]
    for row in rows:
        state = str(row.get("describe", row.get("state", "?")))
        if row.get("state") == "dead" and "dead_until" in row:
            state = f"dead {max(0.0, float(row['dead_until']) - now):.0f}s"
        line = (f"  {row.get('destination')}  {state}  waiting={row.get('waiting', 0)} "
                f"active={row.get('active', 0)}")
        if row.get("failures"):
            line += f"  failures={row['failures']}"
        if row.get("error"):
            line += f'  error="{row["error"]}"'
        out.append(line)
    return out
