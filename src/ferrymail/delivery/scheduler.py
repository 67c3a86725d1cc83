"""The scheduler: ready queues per destination, bounded concurrency, retry timing.

Messages come from the spool (`due`), are split per destination (transport + recipient
domain) into `Job`s and wait in that destination's ready queue. Jobs start while the
destination has fewer than ``queues.concurrency`` running and the total is under
``queues.total_concurrency``; destinations take turns, so a slow or dead destination holds
at most its own slots and never delays the others. A queue id is "in flight" from fetch until
all its jobs end and is excluded from `due`, so no recipient is ever tried twice at once.

Fetching: a full look at the spool (everything due, soonest first) refills the ready queues
up to ``fetch_limit`` waiting jobs whenever fewer than ``low_water`` wait, and at least every
FULL_FETCH_EVERY seconds or when a retry comes due; a job's end alone does not query the spool
above the low-water mark. New mail (`wake()`) is fetched at once, whatever waits: by queue id
after the newest fetched, with room for up to another ``fetch_limit`` jobs, of which no single
destination may take more than ``fetch_limit``. So a dead destination with a long ready queue
cannot keep new mail for others from leaving: a message with a job for a destination already
holding ``fetch_limit`` waiting jobs is "parked" (left in the spool, kept out of fetches)
until that queue has drained to half.

The loop wakes when mail is stored (`wake()`), when a job ends, or at the spool's
`next_due()`. Retry timing (`plan_retry`) is pure and walks ``retry.intervals`` by attempt
number (the last interval repeats), bounded by ``retry.count`` and ``retry.during``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ferrymail.config.models import Retry, RunningConfig
from ferrymail.delivery.routing import recipient_domain, transport_id_for
from ferrymail.observe.log import log_event
from ferrymail.spool import QueuedMessage, RecipientRecord, Spool, SpoolError

IDLE_POLL = 5.0  # longest sleep while something due could not be fetched (in flight)
COOLDOWN = 30.0  # a job that crashed (a bug, not a delivery result): its message rests this long
FULL_FETCH_EVERY = 1.0  # longest time between full looks at the spool while jobs keep ending
PARK_MAX_FACTOR = 4  # at most fetch_limit * this parked queue ids (kept out of fetches)


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
    """A ready queue's key: the transport and the recipient domain."""

    transport: str  # "" when routing failed (unknown server id): the engine reports it
    domain: str

    def __str__(self) -> str:
        return f"{self.transport or '?'}/{self.domain or '-'}"


@dataclass(frozen=True)
class Job:
    """One attempt's work: the recipients of one message that share a destination."""

    message: QueuedMessage
    destination: Destination
    recipients: tuple[RecipientRecord, ...]

    @property
    def queue_id(self) -> str:
        return self.message.queue_id


def split_jobs(message: QueuedMessage, cfg: RunningConfig, now: float) -> list[Job]:
    """The jobs for a message's pending recipients that are due at ``now``, per destination."""
    groups: dict[Destination, list[RecipientRecord]] = {}
    for rec in message.recipients:
        if not rec.state.pending or rec.next_attempt > now:
            continue
        try:
            transport = transport_id_for(rec, message.envelope, cfg)
        except KeyError:
            transport = ""
        dest = Destination(transport, recipient_domain(rec.address))
        groups.setdefault(dest, []).append(rec)
    return [Job(message, d, tuple(rs)) for d, rs in groups.items()]


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
    ) -> None:
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
        half = max(self.fetch_limit // 2, 1)
        for dest in [d for d in self._parked if len(self._ready.get(d, ())) < half]:
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
            jobs = split_jobs(msg, cfg, now)
            if not jobs:
                continue
            full = next((j.destination for j in jobs
                         if len(self._ready.get(j.destination, ())) >= self.fetch_limit), None)
            if full is not None:
                if parked < self.fetch_limit * PARK_MAX_FACTOR:
                    self._parked.setdefault(full, set()).add(qid)
                    parked += 1
                continue
            self._in_flight[qid] = len(jobs)
            for job in jobs:
                self._ready.setdefault(job.destination, deque()).append(job)
            self._waiting += len(jobs)
            taken += 1
        return taken

    def _dispatch(self) -> None:
        cfg = self.config()
        per_dest = cfg.queues.concurrency
        total = cfg.queues.total_concurrency
        started = True
        while started and self._total < total:
            started = False
            for dest in list(self._ready):
                queue = self._ready[dest]
                if not queue:
                    del self._ready[dest]
                    continue
                if self._active.get(dest, 0) >= per_dest or self._total >= total:
                    continue
                self._start(queue.popleft())
                self._waiting -= 1
                started = True
                if not queue:
                    del self._ready[dest]

    def _start(self, job: Job) -> None:
        dest = job.destination
        self._active[dest] = self._active.get(dest, 0) + 1
        self._total += 1
        self._slots[id(job)] = dest
        task = asyncio.create_task(self._guard(job), name=f"deliver-{job.queue_id}-{dest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _free_slot(self, job: Job) -> bool:
        dest = self._slots.pop(id(job), None)
        if dest is None:
            return False  # released already
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
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Nothing was recorded; without a pause the message would be due again at once.
            self._cooldown[job.queue_id] = time.monotonic() + COOLDOWN
            heapq.heappush(self._wakeups, self.clock() + COOLDOWN)
            log_event("scheduler.job_error", "error", qid=job.queue_id,
                      destination=str(job.destination), error=f"{type(e).__name__}: {e}",
                      retry_in_s=COOLDOWN)
        finally:
            self._free_slot(job)
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
