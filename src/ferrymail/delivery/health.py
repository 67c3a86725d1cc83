"""Proxy-tier health: per proxy and per (proxy, source IP), passive failure classes, active checks.

Failure classes (kept apart because they mean different things, see
``shared/reference/shaping-and-proxy-ha.md`` §6):

- ``connect``: the TCP connection to the proxy was refused or timed out, or the PROXY header
  could not be written: the proxy is down. Counted against the proxy.
- ``bind``: the proxy accepted the header, then closed or stayed silent before the banner.
  HAProxy cannot report a failed bind (`usesrc clientip` of an address it does not hold) or an
  unreachable MX; it just closes. Counted against the (proxy, source) pair, and against the
  proxy only once ``spread`` different sources of it failed within the window.
- ``check``: an active check (TCP connect to the proxy) failed; counted like ``connect``.

A banner received through the proxy is a success for the pair and the proxy.

States (`HealthEntry.state`): ``up``; ``suspended`` until a time (after ``failures`` failures
of a class within ``window`` seconds; the first suspension lasts ``suspend`` seconds, each
failed probe doubles it up to ``suspend_max``); ``probing`` once the suspension is over: the
next use is a probe (one at a time), whose success lifts the suspension and whose failure
suspends again. A proxy with an active check is lifted by the first check that connects
(for ``connect``/``check`` suspensions); a pair is probed through the proxy when the check has
a ``probe`` target. Another instance's transitions arrive through a `HealthStore` and apply
here as they are (cluster-wide skipping); without Redis the store is in-process.

`HealthBook` is sans-IO (time is passed in); `HealthChecker` runs the active checks and
`RedisHealthStore` shares the book's transitions. Each transition is one ``proxy.health`` log
line (state, class, reason, proxy, source).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Protocol

from ferrymail.config.models import StartupConfig
from ferrymail.config.proxyha import ProxyCheck, ProxyHealthPolicy
from ferrymail.delivery.connect import ProxyRoute, Source, Timeouts
from ferrymail.delivery.errors import DeliveryError, ProxyConnectError
from ferrymail.observe.log import log_event

FailureClass = Literal["connect", "bind", "check"]
State = Literal["up", "suspended", "probing"]
PROBE_CLAIM = 60.0  # seconds one probe may take before another may be tried
PROXY_DEATH_GRACE = 5.0  # pair failures this long before a proxy went down are the proxy's
SUSPECT_FOR = 10.0  # seconds others avoid a proxy whose session just broke, unless resolved
MAX_TRACKED = 10000  # (proxy, source) pairs remembered; the healthy oldest are forgotten


def classify(error: DeliveryError) -> FailureClass | None:
    """The failure class of a connection error, or None when it says nothing about a proxy."""
    if isinstance(error, ProxyConnectError):
        return "connect"
    if error.kind == "proxy":
        return "bind"
    return None


def instance_name() -> str:
    """``hostname:pid:random``: who noticed a transition (shown by ``proxy status``); the
    random part tells apart engines of one process and a restarted process's new life."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


@dataclass(frozen=True)
class HealthEntry:
    """The health of one proxy (``source`` None) or one (proxy, source) pair.

    Times are Unix seconds. ``until`` is the end of a suspension (None when up). ``backoff``
    is the length of the current (or last) suspension in seconds. ``origin`` names the instance
    that made the transition.
    """

    proxy: str
    source: str | None
    state: State
    failure_class: str | None = None
    reason: str = ""
    since: float = 0.0
    until: float | None = None
    last_failure: float | None = None
    backoff: float = 0.0
    origin: str = ""

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.proxy, self.source)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> HealthEntry:
        """ValueError for anything that is not an entry this module wrote."""
        try:
            data = json.loads(text)
            if data.get("state") not in ("up", "suspended", "probing"):
                raise ValueError(f"unknown state {data.get('state')!r}")
            return cls(**data)
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a proxy health entry: {e}") from None


@dataclass
class _Track:
    entry: HealthEntry
    failures: deque[float] = field(default_factory=deque)
    probe_until: float = 0.0  # a probe is under way until then
    suspect_owner: object = None  # who reconnects after a session through the proxy broke
    suspect_until: float = 0.0


Transition = Callable[[HealthEntry], None]


class HealthBook:
    """Health of proxies and (proxy, source) pairs; pure logic, clock passed in.

    ``on_transition(entry)`` is called for every state change made here (not for entries
    applied from other instances): log it, publish it.
    """

    def __init__(self, policy: ProxyHealthPolicy | None = None, *,
                 on_transition: Transition | None = None, origin: str = "") -> None:
        self.policy = policy or ProxyHealthPolicy()
        self.on_transition = on_transition
        self.origin = origin or instance_name()
        self._tracks: dict[tuple[str, str | None], _Track] = {}
        self._bind_sources: dict[str, dict[str, float]] = {}  # proxy -> source -> last bind fail

    # -- queries

    def state(self, proxy: str, source: str | None, now: float) -> State:
        t = self._tracks.get((proxy, source))
        if t is None or t.entry.state == "up":
            return "up"
        if t.entry.until is not None and t.entry.until <= now:
            return "probing"
        return "suspended"

    def usable(self, source: Source, now: float, *, claim: bool = False) -> bool:
        """Whether ``source`` may be used now: its proxy and its pair are up, or probing with
        no probe under way (``claim`` makes this use the probe). Direct sources always are."""
        if source.proxy is None:
            return True
        names = [(str(source.proxy), None), (str(source.proxy), source.address)]
        probing = []
        for key in names:
            st = self.state(key[0], key[1], now)
            if st == "suspended":
                return False
            if st == "probing":
                t = self._tracks[key]
                if t.probe_until > now:
                    return False
                probing.append(t)
        if claim:
            for t in probing:
                t.probe_until = now + PROBE_CLAIM
        return True

    def suspect(self, source: Source, now: float, owner: object) -> bool:
        """A session through ``source``'s proxy broke (peer closed, reset): until ``owner``'s
        reconnect resolves it, other connects avoid the proxy (`blocked`), so a proxy that died
        under load costs one failed connection, not one per session. False if another owner
        already holds the suspicion."""
        if source.proxy is None:
            return True
        t = self._track((str(source.proxy), None), now)
        if t.suspect_until > now and t.suspect_owner is not owner:
            return False
        t.suspect_owner, t.suspect_until = owner, now + SUSPECT_FOR
        return True

    def resolved(self, source: Source, owner: object) -> None:
        """``owner``'s reconnect is over (whatever its result): lift its suspicion."""
        if source.proxy is None:
            return
        t = self._tracks.get((str(source.proxy), None))
        if t is not None and t.suspect_owner is owner:
            t.suspect_owner, t.suspect_until = None, 0.0

    def blocked(self, source: Source, now: float, owner: object = None) -> bool:
        """Whether a new connection through ``source`` should go elsewhere: its proxy is
        suspended, or under another owner's suspicion."""
        if source.proxy is None:
            return False
        key = (str(source.proxy), None)
        if self.state(key[0], None, now) == "suspended":
            return True
        t = self._tracks.get(key)
        return t is not None and t.suspect_until > now and t.suspect_owner is not owner

    def is_up(self, proxy: ProxyRoute | None, now: float) -> bool:
        """Whether ``proxy`` itself is usable (not suspended); None (direct) always is. Its
        pairs are not looked at: see `usable` for a source."""
        return proxy is None or self.state(str(proxy), None, now) != "suspended"

    def down(self, now: float) -> list[tuple[str, int, float]]:
        """``(server, port, seconds left)`` of every proxy suspended now (for metrics)."""
        out = []
        for (name, source), t in self._tracks.items():
            if source is None and t.entry.until is not None and t.entry.state != "up" \
                    and t.entry.until > now:
                host, _, port = name.rpartition(":")
                out.append((host.strip("[]"), int(port), t.entry.until - now))
        return out

    def entries(self, now: float) -> list[HealthEntry]:
        """Every tracked entry, with ``probing`` for suspensions that ran out."""
        out = []
        for (proxy, source), t in self._tracks.items():
            st = self.state(proxy, source, now)
            out.append(t.entry if st == t.entry.state else replace(t.entry, state=st))
        return sorted(out, key=lambda e: (e.proxy, e.source or ""))

    def suspended_pairs(self, proxy: str, now: float) -> list[str]:
        """Sources of ``proxy`` whose pair is suspended or probing."""
        return [k[1] for k, t in self._tracks.items()
                if k[0] == proxy and k[1] is not None and t.entry.state != "up"]

    # -- events

    def success(self, source: Source, now: float) -> None:
        """A banner came through ``source``'s proxy: the pair and the proxy are up."""
        if source.proxy is None:
            return
        proxy = str(source.proxy)
        self._bind_sources.get(proxy, {}).pop(source.address or "", None)
        self._up((proxy, source.address), now, "banner received")
        self._up((proxy, None), now, "banner received")

    def failure(self, source: Source, cls: FailureClass, reason: str, now: float) -> None:
        """A connection through ``source``'s proxy failed with class ``cls``."""
        if source.proxy is None:
            return
        proxy = str(source.proxy)
        if cls == "bind" and self.state(proxy, None, now) == "suspended":
            return  # the proxy is down: that explains an EOF, the pair is not to blame
        if cls == "bind":
            self._count((proxy, source.address), cls, reason, now, self.policy.bind.failures,
                        self.policy.bind.window)
            recent = self._bind_sources.setdefault(proxy, {})
            recent[source.address or ""] = now
            window = self.policy.bind.window
            for src, when in list(recent.items()):
                if when < now - window:
                    del recent[src]
            if len(recent) >= self.policy.spread:
                self._suspend((proxy, None), cls, f"{len(recent)} sources failed within "
                              f"{window:g}s; last: {reason}", now)
        else:
            self._count((proxy, None), cls, reason, now, self.policy.connect.failures,
                        self.policy.connect.window)

    def check_result(self, proxy: ProxyRoute, ok: bool, reason: str, now: float) -> None:
        """An active TCP check of ``proxy``: a success lifts a connect/check suspension."""
        key = (str(proxy), None)
        if ok:
            t = self._tracks.get(key)
            if t is not None and t.entry.state != "up" and t.entry.failure_class in (
                    "connect", "check"):
                down_since = t.entry.since
                self._up(key, now, "active check connected")
                # pairs that failed as their proxy died (sessions it cut) come back with it
                self._bind_sources.pop(key[0], None)
                for (name, src), pt in list(self._tracks.items()):
                    if (name == key[0] and src is not None and pt.entry.state != "up"
                            and pt.entry.failure_class == "bind"
                            and pt.entry.since >= down_since - PROXY_DEATH_GRACE):
                        self._up((name, src), now, "its proxy is back (the failure was the "
                                 "proxy's)")
            return
        self._count(key, "check", reason, now, self.policy.connect.failures,
                    self.policy.connect.window)

    def probe_result(self, source: Source, ok: bool, reason: str, now: float) -> None:
        """An active probe through the pair's proxy: banner (ok) or not."""
        if source.proxy is None:
            return
        key = (str(source.proxy), source.address)
        if ok:  # a banner through the proxy: the pair and the proxy work
            self._bind_sources.get(key[0], {}).pop(source.address or "", None)
            self._up(key, now, "probe got a banner")
            self._up((key[0], None), now, "probe got a banner")
        else:
            self._suspend(key, "bind", f"probe failed: {reason}", now)

    def apply(self, entry: HealthEntry) -> bool:
        """Take another instance's transition as it is; False if it is our own or older."""
        if entry.origin == self.origin:
            return False
        t = self._tracks.get(entry.key)
        if t is not None and t.entry.since > entry.since:
            return False
        if t is None:
            self._tracks[entry.key] = _Track(entry)
        else:
            t.entry = entry
            t.probe_until = 0.0
            if entry.state == "up":
                t.failures.clear()
        return True

    # -- internals

    def _count(self, key: tuple[str, str | None], cls: FailureClass, reason: str, now: float,
               failures: int, window: float) -> None:
        t = self._track(key, now)
        t.failures.append(now)
        while len(t.failures) > failures:
            t.failures.popleft()
        t.entry = replace(t.entry, last_failure=now)
        st = self.state(key[0], key[1], now)
        if st == "probing" or (len(t.failures) >= failures and t.failures[0] >= now - window):
            self._suspend(key, cls, reason, now)

    def _suspend(self, key: tuple[str, str | None], cls: FailureClass, reason: str,
                 now: float) -> None:
        t = self._track(key, now)
        st = self.state(key[0], key[1], now)
        if st == "suspended":
            t.entry = replace(t.entry, last_failure=now)
            return  # concurrent failures do not lengthen a running suspension
        prev = t.entry.backoff
        backoff = (self.policy.suspend if st == "up" or prev <= 0
                   else min(prev * 2, self.policy.suspend_max))
        t.probe_until = 0.0
        t.failures.clear()
        self._set(t, replace(t.entry, state="suspended", failure_class=cls, reason=reason,
                             since=now, until=now + backoff, last_failure=now, backoff=backoff,
                             origin=self.origin))

    def _up(self, key: tuple[str, str | None], now: float, reason: str) -> None:
        t = self._tracks.get(key)
        if t is None:
            return
        t.failures.clear()
        t.probe_until = 0.0
        if t.entry.state != "up":
            self._set(t, replace(t.entry, state="up", reason=reason, since=now, until=None,
                                 origin=self.origin))

    def _track(self, key: tuple[str, str | None], now: float) -> _Track:
        t = self._tracks.get(key)
        if t is None:
            if len(self._tracks) >= MAX_TRACKED:
                for k, old in list(self._tracks.items()):
                    if old.entry.state == "up":
                        del self._tracks[k]
                        break
            t = _Track(HealthEntry(key[0], key[1], "up", since=now, origin=self.origin))
            self._tracks[key] = t
        return t

    def _set(self, t: _Track, entry: HealthEntry) -> None:
        t.entry = entry
        if self.on_transition is not None:
            self.on_transition(entry)


def log_transition(entry: HealthEntry) -> None:
    """The ``proxy.health`` log line of one transition."""
    level = "info" if entry.state == "up" else "warning"
    log_event("proxy.health", level, proxy=entry.proxy, source=entry.source or "*",
              state=entry.state, failure_class=entry.failure_class, reason=entry.reason,
              suspended_s=round(entry.backoff, 3) if entry.state == "suspended" else None,
              origin=entry.origin)


# -- shared store ---------------------------------------------------------------------------------


class HealthStore(Protocol):
    """Where the book's transitions go and other instances' arrive."""

    async def start(self, on_remote: Callable[[HealthEntry], None]) -> None: ...

    async def publish(self, entry: HealthEntry) -> None: ...

    async def entries(self) -> list[HealthEntry]: ...

    async def close(self) -> None: ...


class LocalHealthStore:
    """One instance on its own: transitions are kept here, nobody else hears of them."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str | None], HealthEntry] = {}

    async def start(self, on_remote: Callable[[HealthEntry], None]) -> None:
        return None

    async def publish(self, entry: HealthEntry) -> None:
        self._entries[entry.key] = entry

    async def entries(self) -> list[HealthEntry]:
        return sorted(self._entries.values(), key=lambda e: (e.proxy, e.source or ""))

    async def close(self) -> None:
        return None


REDIS_PREFIX = "ferrymail:proxyhealth:"
UP_TTL = 3600  # seconds an "up" entry stays readable for `proxy status`


class RedisHealthStore:
    """Transitions shared through Redis: one key per proxy / pair, one pub/sub channel.

    Key ``{prefix}entry:{proxy}|{source or *}`` holds the entry as JSON with a TTL (the rest of
    a suspension plus ``UP_TTL``, so a crashed instance's suspensions vanish by themselves);
    ``{prefix}events`` carries each transition to the other instances at once. Redis errors
    are logged and leave each instance with its own view (per-instance health).
    """

    def __init__(self, url: str, *, prefix: str = REDIS_PREFIX, timeout: float = 1.0) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout,
                                              socket_connect_timeout=timeout)
        self._listener: asyncio.Task[None] | None = None
        self._healthy = True

    @property
    def channel(self) -> str:
        return f"{self.prefix}events"

    def _key(self, entry: HealthEntry) -> str:
        return f"{self.prefix}entry:{entry.proxy}|{entry.source or '*'}"

    async def start(self, on_remote: Callable[[HealthEntry], None]) -> None:
        for entry in await self.entries():
            on_remote(entry)
        self._listener = asyncio.create_task(self._listen(on_remote),
                                             name="ferrymail-proxyhealth-listen")

    async def _listen(self, on_remote: Callable[[HealthEntry], None]) -> None:
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self.channel)
                self._ok()
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    try:
                        on_remote(HealthEntry.from_json(msg["data"]))
                    except ValueError as e:
                        log_event("proxy.health_store", "warning", store="redis",
                                  error=f"ignored a message on {self.channel}: {e}")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._failed(e)
                await asyncio.sleep(1.0)

    async def publish(self, entry: HealthEntry) -> None:
        ttl = UP_TTL
        if entry.until is not None:
            ttl += max(0, int(entry.until - time.time()) + 1)
        text = entry.to_json()
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key(entry), text, ex=ttl)
                pipe.publish(self.channel, text)
                await pipe.execute()
            self._ok()
        except Exception as e:
            self._failed(e)

    async def entries(self) -> list[HealthEntry]:
        out = []
        try:
            keys = [k async for k in self._redis.scan_iter(match=f"{self.prefix}entry:*",
                                                             count=500)]
            values = await self._redis.mget(keys) if keys else []
        except Exception as e:
            self._failed(e)
            return []
        for value in values:
            if value is None:
                continue
            try:
                out.append(HealthEntry.from_json(value))
            except ValueError:
                continue
        return sorted(out, key=lambda e: (e.proxy, e.source or ""))

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    def _ok(self) -> None:
        if not self._healthy:
            self._healthy = True
            log_event("proxy.health_store", store="redis", url=self.url, state="connected")

    def _failed(self, e: BaseException) -> None:
        if self._healthy:
            self._healthy = False
            log_event("proxy.health_store", "warning", store="redis", url=self.url,
                      state="unreachable", error=f"{type(e).__name__}: {e}",
                      effect="proxy health is per instance until Redis is back")


# -- active checks -------------------------------------------------------------------------------


async def tcp_check(proxy: ProxyRoute, timeout: float) -> str | None:
    """Connect to the proxy and close; None when it accepted, else why not."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(proxy.server, proxy.port)
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as e:
        return os.strerror(e.errno) if e.errno else str(e)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return None


async def banner_probe(source: Source, target: tuple[str, int], timeout: float) -> str | None:
    """Through ``source``'s proxy to ``target``; None when a 2xx banner arrived, else why not."""
    from ferrymail.delivery.connect import open_stream

    try:
        async with asyncio.timeout(timeout):
            reader, writer, _ = await open_stream(
                source, target[0], target[1], Timeouts(connect=timeout, banner=timeout))
            try:
                line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return f"no banner within {timeout:g}s"
    except (OSError, DeliveryError) as e:
        return str(e)
    if not line:
        return "EOF before banner"
    if line[:1] != b"2":
        return f"banner {line[:80]!r}"
    return None


@dataclass(frozen=True)
class CheckTarget:
    """One proxy to check, its settings, and its sources (for probes of suspended pairs)."""

    proxy: ProxyRoute
    check: ProxyCheck
    sources: tuple[Source, ...] = ()


class HealthChecker:
    """Runs the active checks of `targets()` (read at every round, so reloads apply)."""

    def __init__(self, book: HealthBook, targets: Callable[[], Iterable[CheckTarget]], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.book = book
        self.targets = targets
        self.clock = clock
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._supervise(), name="ferrymail-proxy-checks")

    async def stop(self) -> None:
        tasks = [t for t in [self._loop_task, *self._tasks.values()] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    async def _supervise(self) -> None:
        while True:
            wanted = {(t.proxy.server, t.proxy.port): t for t in self.targets()}
            for key in list(self._tasks):
                if key not in wanted:
                    self._tasks.pop(key).cancel()
            for key in wanted:
                if key not in self._tasks or self._tasks[key].done():
                    self._tasks[key] = asyncio.create_task(self._run(key),
                                                           name=f"ferrymail-check-{key[0]}")
            await asyncio.sleep(1.0)

    async def _run(self, key: tuple[str, int]) -> None:
        while True:
            current = {(t.proxy.server, t.proxy.port): t for t in self.targets()}.get(key)
            if current is None:
                return
            try:
                await self.check_once(current)
            except Exception as e:  # a bug here must not end the checks of this proxy
                log_event("proxy.check_error", "error", proxy=str(current.proxy),
                          error=f"{type(e).__name__}: {e}")
            await asyncio.sleep(current.check.interval)

    async def check_once(self, target: CheckTarget) -> None:
        """One round: TCP connect to the proxy; then probe its suspended pairs due a probe."""
        why = await tcp_check(target.proxy, target.check.timeout)
        self.book.check_result(target.proxy, why is None,
                               f"active check: cannot connect to proxy {target.proxy}: {why}",
                               self.clock())
        probe = target.check.probe
        if why is not None or probe is None:
            return
        name = str(target.proxy)
        for src in target.sources:
            if src.address is None or self.book.state(name, src.address, self.clock()) != (
                    "probing"):
                continue
            if not self.book.usable(src, self.clock(), claim=True):
                continue
            failed = await banner_probe(src, (probe.server, probe.port), target.check.timeout)
            self.book.probe_result(src, failed is None, failed or "", self.clock())


def health_store_for(startup: StartupConfig) -> HealthStore:
    """Redis when ``cluster.redis`` is set (health shared by the cluster), else in-process."""
    if startup.cluster is not None:
        c = startup.cluster
        return RedisHealthStore(c.redis, prefix=f"{c.prefix}:proxyhealth:", timeout=c.timeout)
    return LocalHealthStore()
