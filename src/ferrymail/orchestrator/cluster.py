"""The cluster's shared state in Redis: the client, the instance registry, the up/down state.

`Cluster` owns one asyncio Redis client (short socket timeouts, no hidden retries, so an
outage costs at most ``cluster.timeout`` per call and never stalls the event loop for long)
and a background loop that, every ``heartbeat`` seconds, registers this instance (a sorted
set of instance names scored by expiry on Redis ``TIME``; an instance that stops beating
drops out after three beats) and reads the live count. Other shared stores (the shaping
limiter, later proxy health) use `call`/`script` and `on_tick` rather than a client of
their own.

State: ``shared`` while Redis answers, ``fallback`` after a failed call until a heartbeat
succeeds again (retried with back-off, 0.25 s doubling to 1 s: while some instances are
back on Redis and others still in fallback, their counts do not see each other, so that
window is kept short). The live count used for the fallback's split is the largest seen
over the last six beats, so that a dead instance drops out within about a second and a Redis
restarted empty does not briefly look alone. Each transition is one ``cluster.state`` log
line; `status()` gives the current state, also written to ``cluster-status.json`` in the
spool directory on every change (``ferrymail queue list`` shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ferrymail.config.policies import Cluster as ClusterConfig
from ferrymail.observe.log import log_event
from ferrymail.orchestrator.limiter import STATUS_FILE

__all__ = ["STATUS_FILE", "Cluster", "RedisDown", "lua"]

BACKOFF_START, BACKOFF_MAX = 0.25, 1.0
REGISTRY_BEATS = 3  # an instance is alive for this many heartbeats after its last one


class RedisDown(Exception):
    """Redis did not answer (connection refused, timeout, or an error reply)."""


def lua(name: str) -> str:
    """The text of ``orchestrator/lua/<name>.lua``."""
    return resources.files("ferrymail.orchestrator").joinpath(f"lua/{name}.lua").read_text()


class Cluster:
    """One instance's membership: Redis client, registry heartbeat, shared/fallback state."""

    def __init__(self, cfg: ClusterConfig, instance: str,
                 status_file: Path | None = None) -> None:
        self.cfg = cfg
        self.status_file = status_file
        self.instance = cfg.instance or instance
        self.prefix = cfg.prefix
        self.client = aioredis.Redis.from_url(
            cfg.redis, socket_timeout=cfg.timeout, socket_connect_timeout=cfg.timeout,
            retry=Retry(NoBackoff(), 1), decode_responses=True)  # one reconnect, no wait
        self.state = "starting"
        self.instances = 1  # last known number of live instances (this one included)
        self._counts: deque[int] = deque(maxlen=2 * REGISTRY_BEATS)
        self.last_error = ""
        self.calls = 0  # round trips made (scripts and commands), for benchmarks and status
        self.since = time.time()
        self._scripts: dict[str, tuple[str, str]] = {}  # name -> (text, sha)
        self._ticks: list[Callable[[], Awaitable[None]]] = []
        self._transitions: list[Callable[[str], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_START

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def up(self) -> bool:
        return self.state == "shared"

    # -- calls

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run ``lua/<name>.lua`` (EVALSHA, loading it once); RedisDown on any failure."""
        self.calls += 1
        if name not in self._scripts:
            self._scripts[name] = (lua(name), "")
        text, sha = self._scripts[name]
        try:
            if sha:
                try:
                    return await self.client.evalsha(sha, len(keys), *keys, *args)
                except NoScriptError:
                    pass  # Redis restarted: load it again
            sha = await self.client.script_load(text)
            self._scripts[name] = (text, sha)
            return await self.client.evalsha(sha, len(keys), *keys, *args)
        except (TimeoutError, RedisError, OSError) as e:
            self.failed(e)
            raise RedisDown(str(e) or type(e).__name__) from e

    async def call(self, fn: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
        """``await fn(client)``; RedisDown on any failure (and the state goes to fallback)."""
        self.calls += 1
        try:
            return await fn(self.client)
        except (TimeoutError, RedisError, OSError) as e:
            self.failed(e)
            raise RedisDown(str(e) or type(e).__name__) from e

    def failed(self, e: BaseException) -> None:
        self.last_error = f"{type(e).__name__}: {e}"
        if self.state != "fallback":
            self._set("fallback")
            self._retry_at = time.monotonic() + BACKOFF_START
            self._backoff = BACKOFF_START

    def _set(self, state: str) -> None:
        old, self.state = self.state, state
        self.since = time.time()
        log_event("cluster.state", "warning" if state == "fallback" else "info",
                  state=state, previous=old, instance=self.instance, instances=self.instances,
                  fallback=self.cfg.fallback, redis=self.cfg.redis,
                  error=self.last_error if state == "fallback" else None)
        for cb in self._transitions:
            cb(state)
        self.write_status()

    def write_status(self) -> None:
        """Write `status()` to the status file (atomically), if there is one."""
        if self.status_file is None:
            return
        try:
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.status_file.with_name(self.status_file.name + ".tmp")
            tmp.write_text(json.dumps(self.status()))
            os.replace(tmp, self.status_file)
        except OSError as e:
            log_event("cluster.status_failed", "warning", file=str(self.status_file),
                      error=str(e))

    # -- lifecycle

    def on_tick(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Call ``fn`` after every successful heartbeat (e.g. extend leases, read state)."""
        self._ticks.append(fn)

    def on_transition(self, fn: Callable[[str], None]) -> None:
        self._transitions.append(fn)

    async def start(self) -> None:
        await self._beat()  # a Redis down at start: begin in fallback, keep trying
        self._task = asyncio.create_task(self._loop(), name="ferrymail-cluster")

    async def stop(self) -> None:
        if self.status_file is not None:
            with contextlib.suppress(OSError):
                self.status_file.unlink()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
            await self.client.zrem(self.key("instances"), self.instance)
        with contextlib.suppress(Exception):
            await self.client.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat)
            now = time.monotonic()
            if self.state == "fallback" and now < self._retry_at:
                continue
            await self._beat()

    async def _beat(self) -> None:
        try:
            count = await self.script("registry", [self.key("instances")],
                                      [self.instance, self.cfg.heartbeat * REGISTRY_BEATS])
        except RedisDown:
            if self.state == "starting":
                self._set("fallback")
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            return
        # The largest count of the last beats: a Redis that came back empty lists only the
        # instances that beat since, and a split by that count would overshoot.
        self._counts.append(max(1, int(count)))
        before, self.instances = self.instances, max(self._counts)
        if before != self.instances:
            self.write_status()
        if self.state != "shared":
            self._backoff = BACKOFF_START
            self._set("shared")
        for fn in self._ticks:
            try:
                await fn()
            except RedisDown:
                return
            except Exception as e:  # a bug in a tick must not stop the heartbeat
                log_event("cluster.tick_error", "error", error=f"{type(e).__name__}: {e}")

    def status(self) -> dict[str, object]:
        return {"pid": os.getpid(), "state": self.state, "instance": self.instance,
                "instances": self.instances,
                "redis": self.cfg.redis, "fallback": self.cfg.fallback,
                "since": self.since, "error": self.last_error or None}
