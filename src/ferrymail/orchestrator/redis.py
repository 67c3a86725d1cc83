"""The cluster-wide limiter: leases, GCRA and suspensions in Redis, shared by every instance.

Round trips: one script per new connection (``lua/acquire.lua``: every concurrency lease
and every connection interval, all or none), one per message when a rate applies
(``lua/message.lua``: the leases still held, every rate, all or none; for rates above
400/s one per several messages, the slots prefetched by `ferrymail.orchestrator.prefetch`),
one per closed connection (``lua/release.lua``), one per new connection when a connection
interval applies (``lua/connected.lua``: the interval counts from when the TCP connection
stood, not from the grant before it), and per heartbeat one for the registry plus, every
third of the lease TTL, one extending every lease this instance holds (``lua/extend.lua``). Time is
Redis ``TIME`` with microseconds, never a client clock. Keys: ``PREFIX:c:KEY`` (lease sets),
``PREFIX:i:KEY|ci:SPEC`` and ``PREFIX:r:KEY|rate:SPEC`` (GCRA), ``PREFIX:suspensions``
(hash id -> JSON), ``PREFIX:instances`` (registry). A single Redis (not Redis Cluster).

Leases are short (``cluster.lease_ttl``, 30 s) and extended by the heartbeat, so a killed
instance's slots come back within one TTL. A lease missing at extension (Redis restarted or
flushed) is added again when its set has room, else it is lost and the connection closes
after its current message.

While Redis is unreachable (`ferrymail.orchestrator.cluster`), ``cluster.fallback`` decides:
``split`` enforces each limit divided by the last known number of live instances in this
process (concurrency ⌈limit / n⌉, at least 1; rates and intervals n times slower), counting
the shared leases this instance still holds; ``local`` the full limits in this process;
``closed`` opens no new connection. Reasons then end in ``(redis unreachable: split 1/3)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from redis.exceptions import RedisError

from ferrymail.config.policies import Cluster as ClusterConfig
from ferrymail.observe import metrics
from ferrymail.observe.log import log_event
from ferrymail.orchestrator.cluster import Cluster, RedisDown
from ferrymail.orchestrator.limiter import Denied, Lease, ms
from ferrymail.orchestrator.local import LocalLimiter
from ferrymail.orchestrator.policy import Attempt, Limit
from ferrymail.orchestrator.prefetch import REFILL_AHEAD, Plan, RateSlots, plan
from ferrymail.orchestrator.suspensions import MAX_SUSPENSIONS, Suspension, first_match

POLL = (0.05, 0.15)  # seconds between looks at a full concurrency key other instances hold


class RedisLimiter:
    """`ferrymail.orchestrator.limiter.Limiter` shared through Redis (see module doc)."""

    scope = "redis"

    def __init__(self, cfg: ClusterConfig, *, default_instance: str,
                 status_file: Path | None = None) -> None:
        self.cfg = cfg
        self.cluster = Cluster(cfg, default_instance, status_file)
        self.fallback = LocalLimiter(divisor=self._divisor, note=self._note)
        self.suspensions: list[Suspension] = []
        self._held: dict[str, Lease] = {}  # lease id -> lease, for the heartbeat
        self._extended = 0.0
        self._synced = False  # the leases held are registered in Redis (after a fallback)
        self._releasing: set[asyncio.Task[None]] = set()
        self.slots = RateSlots()  # prefetched rate slots (see orchestrator/prefetch.py)
        self.cluster.on_tick(self._tick)
        self.cluster.on_transition(self._transition)

    # -- lifecycle

    async def start(self) -> None:
        await self.cluster.start()

    async def stop(self) -> None:
        if self._releasing:
            await asyncio.wait(set(self._releasing), timeout=2)
        await self.slots.stop()
        await self.cluster.stop()
        self.fallback.wake()

    def status(self) -> dict[str, object]:
        return {"scope": self.scope, **self.cluster.status(), "leases": len(self._held),
                "prefetch": self.slots.status()}

    @property
    def shared(self) -> bool:
        """Limits are answered by Redis (else by the fallback, see the module doc)."""
        return self.cluster.up and self._synced

    # -- fallback

    def _divisor(self) -> int:
        return self.cluster.instances if self.cfg.fallback == "split" else 1

    def _note(self) -> str:
        if self.cfg.fallback == "split":
            return f"redis unreachable: split 1/{self.cluster.instances}"
        return f"redis unreachable: {self.cfg.fallback}"

    def mode(self) -> str:
        """``shared`` while Redis answers, else the fallback in force (split, local, closed)."""
        return "shared" if self.cluster.up else self.cfg.fallback

    def fallback_note(self) -> str | None:
        """Why limits are not shared now (``redis unreachable: split 1/3``), None if they are."""
        return None if self.cluster.up else self._note()

    def active_suspensions(self, now: float) -> list[Suspension]:
        """The shared suspensions (last read from Redis) in force at ``now``."""
        return [s for s in self.suspensions if s.until > now]

    def _transition(self, state: str) -> None:
        metrics.cluster_transition(self.mode())
        if state == "fallback":
            # Connections open now keep their slots in the local count.
            for lease in self._held.values():
                self.fallback.adopt(lease)
        else:
            # Until the next tick has registered what was opened meanwhile, the fallback
            # keeps answering: an empty Redis must not hand out those slots a second time.
            self._synced = False
            self._extended = 0.0
        self.fallback.wake()

    # -- the Limiter interface

    def _suspended(self, attempt: Attempt) -> Denied | None:
        s = first_match(self.suspensions, attempt, time.time())
        if s is None:
            return None
        return Denied("suspended", s.describe(), max(0.0, s.until - time.time()))

    async def connect(self, attempt: Attempt, limits: tuple[Limit, ...]) -> Lease | Denied:
        denied = self._suspended(attempt)
        if denied is not None:
            return denied
        lease_limits = [lim for lim in limits if lim.concurrency is not None]
        intervals = [lim for lim in limits if lim.connectinterval is not None]
        lease_id = secrets.token_hex(8)
        if not lease_limits and not intervals:
            return Lease(lease_id, ())
        if self.shared:
            keys = [self.cluster.key("c", lim.key) for lim in lease_limits]
            keys += [self.cluster.key("i", lim.interval_key) for lim in intervals]
            args: list[object] = [lease_id, self.cfg.lease_ttl, len(lease_limits),
                                  len(intervals)]
            args += [lim.concurrency for lim in lease_limits]
            args += [lim.connectinterval for lim in intervals]
            try:
                res = await self.cluster.script("acquire", keys, args)
            except RedisDown:
                pass  # answered by the fallback below
            else:
                if res[0] == "ok":
                    lease = Lease(lease_id, tuple(lim.key for lim in lease_limits),
                                  {lim.key: lim.concurrency or 0 for lim in lease_limits},
                                  shared=True)
                    self._held[lease_id] = lease
                    if not self.shared:  # the fallback began while Redis answered us
                        self.fallback.adopt(lease)
                    return lease
                if res[0] == "concurrency":
                    lim = lease_limits[int(res[1]) - 1]
                    return Denied("concurrency", f"concurrency {res[2]}/{res[3]} for "
                                  f"{lim.label}", key=lim.key)
                lim = intervals[int(res[1]) - 1]
                wait = float(res[2])
                return Denied("connectinterval", f"connectinterval {lim.connectinterval:g}s "
                              f"for {lim.label}: next connection in {ms(wait)}", wait)
        if self.cfg.fallback == "closed":
            return Denied("closed", "redis unreachable: closed (no new connections)", 1.0)
        got = self.fallback.connect_now(attempt, limits, lease_id)
        if isinstance(got, Lease):
            self._held[lease_id] = got
        return got

    async def message(self, attempt: Attempt, limits: tuple[Limit, ...],
                      lease: Lease | None, ahead: float = 0.0) -> Denied | float | None:
        denied = self._suspended(attempt)
        if denied is not None:
            return denied
        if lease is not None and lease.lost:
            return Denied("lost", "the connection's concurrency lease was lost")
        rates = [lim for lim in limits if lim.rate is not None]
        if not rates:
            return None  # leases are kept alive by the heartbeat
        if self.shared:
            p = plan(rates)
            hold = await self.slots.take(p, lambda: self._fetch(p, rates), ahead)
            if hold is not None:
                return hold or None
            held = list(lease.keys) if lease is not None else []
            keys = [self.cluster.key("c", k) for k in held]
            keys += [self.cluster.key("r", k) for k in p.key]
            args: list[object] = [lease.id if lease else "", self.cfg.lease_ttl, len(held),
                                  len(rates), ahead, p.count]
            args += [lease.limits.get(k, 1) if lease else 1 for k in held]
            for lim in rates:
                assert lim.rate is not None
                args += [lim.rate.interval, lim.rate.burst]
            with self.slots.fetching(p):
                try:
                    res = await self.cluster.script("message", keys, args)
                except RedisDown:
                    res = None
                if res is not None and res[0] == "ok":
                    hold = float(res[1])
                    self.slots.keep(p, hold)
                    return hold or None
            if res is not None:
                if res[0] == "lost":
                    assert lease is not None
                    lease.lost = True
                    return Denied("lost", "the connection's concurrency lease was lost")
                lim = rates[int(res[1]) - 1]
                wait = float(res[2])
                return Denied("rate", f"rate {lim.rate} for {lim.label}: next slot in "
                              f"{ms(wait)}", wait)
        if self.cfg.fallback == "closed":
            return Denied("closed", "redis unreachable: closed (no new connections)", 1.0)
        return self.fallback.message_now(attempt, limits, lease, ahead)

    async def connected(self, limits: tuple[Limit, ...], ago: float) -> None:
        intervals = [lim for lim in limits if lim.connectinterval is not None]
        if not intervals:
            return
        if self.shared:
            keys = [self.cluster.key("i", lim.interval_key) for lim in intervals]
            with contextlib.suppress(RedisDown):
                await self.cluster.script("connected", keys, [ago, *[
                    lim.connectinterval for lim in intervals]])
                return
        self.fallback.connected_now(limits, ago)

    async def _fetch(self, p: Plan, rates: list[Limit]) -> tuple[float, int] | None:
        """The next ``p.count`` slots of ``rates`` in the background (`RateSlots` refill).
        Rates only: a connection's lease is checked by its own next fetch and the heartbeat."""
        keys = [self.cluster.key("r", k) for k in p.key]
        args: list[object] = ["", self.cfg.lease_ttl, 0, len(rates), REFILL_AHEAD, p.count]
        for lim in rates:
            assert lim.rate is not None
            args += [lim.rate.interval, lim.rate.burst]
        try:
            res = await self.cluster.script("message", keys, args)
        except RedisDown:
            return None
        return (float(res[1]), p.count) if res[0] == "ok" else None

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        self.fallback.release(lease)  # marks it released; harmless if never counted here
        self._held.pop(lease.id, None)
        if lease.keys and (lease.shared or self.cluster.up):
            task = asyncio.get_running_loop().create_task(self._release(lease))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _release(self, lease: Lease) -> None:
        keys = [self.cluster.key("c", k) for k in lease.keys]
        with contextlib.suppress(RedisDown):
            await self.cluster.script("release", keys, [lease.id])  # else: expires by TTL

    async def wait(self, denied: Denied, timeout: float) -> None:
        delay = denied.retry_after
        if delay is None:  # held by other instances too: look again soon (jittered)
            delay = random.uniform(*POLL)
        await self.fallback.wait(Denied(denied.kind, denied.reason, delay), timeout)

    def wake(self) -> None:
        self.fallback.wake()

    async def suspend(self, fields: dict[str, str], duration: float, reason: str) -> None:
        from ferrymail.orchestrator.suspensions import new_suspension

        s = new_suspension(fields, duration, reason, origin="reply")
        self.suspensions = [*self.suspensions, s]  # obeyed here at once
        with contextlib.suppress(RedisDown):
            await add_suspension(self.cluster, s)

    # -- heartbeat

    async def _tick(self) -> None:
        await self._refresh_suspensions()
        now = time.monotonic()
        if now - self._extended >= self.cfg.lease_ttl / 3 or not self._synced:
            await self._extend()
            self._extended = now
            self._synced = True

    async def _refresh_suspensions(self) -> None:
        raw = await self.cluster.call(lambda r: r.hgetall(self.cluster.key("suspensions")))
        items = []
        for value in raw.values():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                items.append(Suspension.from_json(value))
        self.suspensions = items

    async def _extend(self) -> None:
        pairs = [(lease, k) for lease in list(self._held.values()) for k in lease.keys]
        if not pairs:
            return
        keys = [self.cluster.key("c", k) for _, k in pairs]
        args: list[object] = [self.cfg.lease_ttl]
        for lease, k in pairs:
            args += [lease.id, lease.limits.get(k, 1)]
        lost = await self.cluster.script("extend", keys, args)
        for lease, _ in pairs:
            lease.shared = True
        for index in lost or ():
            lease, key = pairs[int(index) - 1]
            if not lease.lost:
                lease.lost = True
                log_event("shaping.lease_lost", "warning", lease=lease.id, key=key,
                          effect="the connection closes after its current message")


# -- suspensions in Redis (used by the limiter and by `ferrymail suspend`) ---------------------


async def add_suspension(cluster: Cluster, s: Suspension) -> None:
    key = cluster.key("suspensions")
    count = await cluster.call(lambda r: r.hlen(key))
    if count >= MAX_SUSPENSIONS:
        await prune_suspensions(cluster)
    await cluster.call(lambda r: r.hset(key, s.id, s.to_json()))


async def prune_suspensions(cluster: Cluster) -> None:
    key = cluster.key("suspensions")
    raw = await cluster.call(lambda r: r.hgetall(key))
    now = time.time()
    expired = [i for i, v in raw.items() if _until(v) <= now]
    if expired:
        await cluster.call(lambda r: r.hdel(key, *expired))


def _until(value: str) -> float:
    try:
        return Suspension.from_json(value).until
    except (ValueError, KeyError, TypeError):
        return 0.0


def suspension_client(cfg: ClusterConfig) -> Cluster:
    """A `Cluster` for one-shot commands (no heartbeat)."""
    return Cluster(cfg, "ferrymail-cli")


async def list_suspensions(cluster: Cluster) -> Sequence[Suspension]:
    raw = await cluster.call(lambda r: r.hgetall(cluster.key("suspensions")))
    out = []
    for value in raw.values():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            out.append(Suspension.from_json(value))
    return out


async def remove_suspension(cluster: Cluster, ident: str) -> bool:
    return bool(await cluster.call(lambda r: r.hdel(cluster.key("suspensions"), ident)))


__all__ = ["RedisError", "RedisLimiter", "add_suspension", "list_suspensions",
           "remove_suspension", "suspension_client"]
