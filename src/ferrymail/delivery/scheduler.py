"""The scheduler: ready queues per destination, bounded concurrency, retry timing.

Messages come from the spool (`due`), are split per destination (transport + recipient
domain) into `Job`s and wait in that destination's ready queue. Jobs start while the
destination has fewer than ``queues.concurrency`` running and the total is under
``queues.total_concurrency``; destinations take turns, so a slow or dead destination holds
at most its own slots and never delays the others. A queue id is "in flight" from fetch until
all its jobs end and is excluded from `due`, so no recipient is ever tried twice at once.

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
    """

    def __init__(
        self,
        spool: Spool,
        config: Callable[[], RunningConfig],
        run_job: Callable[[Job], Awaitable[float | None]],
        *,
        clock: Callable[[], float] = time.time,
        fetch_limit: int = 1000,
    ) -> None:
        self.spool = spool
        self.config = config
        self.run_job = run_job
        self.clock = clock
        self.fetch_limit = fetch_limit
        self._ready: dict[Destination, deque[Job]] = {}
        self._active: dict[Destination, int] = {}
        self._total = 0
        self._in_flight: dict[str, int] = {}  # queue id -> jobs not finished
        self._cooldown: dict[str, float] = {}  # queue id -> monotonic time it may run again
        self._wakeups: list[float] = []  # heap of clock() times something becomes due
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.idle = asyncio.Event()  # set while nothing is running or waiting (for tests)

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

    def wake(self) -> None:
        """New mail was stored (or something changed): look at the spool now."""
        self._wake.set()

    @property
    def running(self) -> int:
        return self._total

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._ready.values())

    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

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
            if self._total == 0 and not self.waiting:
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
            return IDLE_POLL  # held: keep everything queued; a reload wakes us
        room = max(self.fetch_limit - self.waiting, 0)
        now = self.clock()
        if self._cooldown:
            mono = time.monotonic()
            self._cooldown = {q: t for q, t in self._cooldown.items() if t > mono}
        if room:
            exclude = (*self._in_flight, *self._cooldown)
            messages = await self.spool.due(now, limit=room, exclude=exclude)
            for msg in messages:
                jobs = split_jobs(msg, cfg, now)
                if not jobs:
                    continue
                self._in_flight[msg.queue_id] = len(jobs)
                for job in jobs:
                    self._ready.setdefault(job.destination, deque()).append(job)
            if len(messages) >= room:
                return 0.0  # more may be due: come back once jobs free some room
        nxt = await self.spool.next_due()
        now = self.clock()
        while self._wakeups and self._wakeups[0] <= now:
            heapq.heappop(self._wakeups)
        # A next_due in the past belongs to a message in flight (or not fetched for lack of
        # room): a job's end wakes us for those. Otherwise sleep until the soonest known time.
        times = [t for t in (nxt, *self._wakeups[:1]) if t is not None and t > now]
        return min(min(times) - now, IDLE_POLL) if times else IDLE_POLL

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
                started = True
                if not queue:
                    del self._ready[dest]

    def _start(self, job: Job) -> None:
        dest = job.destination
        self._active[dest] = self._active.get(dest, 0) + 1
        self._total += 1
        task = asyncio.create_task(self._guard(job), name=f"deliver-{job.queue_id}-{dest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            dest = job.destination
            self._active[dest] -= 1
            if not self._active[dest]:
                del self._active[dest]
            self._total -= 1
            left = self._in_flight.get(job.queue_id, 1) - 1
            if left <= 0:
                self._in_flight.pop(job.queue_id, None)
            else:
                self._in_flight[job.queue_id] = left
            if not self._stopping:
                self._dispatch()
                self._wake.set()
