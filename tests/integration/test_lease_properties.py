"""Leases as a property, against a real ``redis-server`` running the limiter's own Lua scripts.

Hypothesis draws interleavings of acquire (one to three keys at once, all or none), extend
(one "instance"'s heartbeat over every lease it holds), release and the passing of time
(leases with a TTL of 30 ms expire on Redis ``TIME``), from three instances over three keys
with limits 1-3. After every step: no key holds more live leases than its limit; an acquire
was granted in every key or in none; a grant or refusal agrees with the model (what is
certainly held refuses, what has certainly expired frees its slot).

Expiry times are only known within the span of the call that set them (the script reads
``TIME`` itself), so the model keeps each lease's expiry as an interval read with ``TIME``
before and after the call, and only asserts outcomes that interval decides.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferrymail.orchestrator.cluster import lua
from tests.realpeers import redis_server

KEYS = ("k0", "k1", "k2")
INSTANCES = ("m1", "m2", "m3")
SHORT, LONG = 0.03, 30.0  # lease TTLs in seconds: one that expires within an example


@dataclass
class Held:
    instance: str
    keys: tuple[str, ...]
    # expiry on Redis time, per key: (earliest, latest) it may have been set to
    expiry: dict[str, tuple[float, float]] = field(default_factory=dict)


class Store:
    """The Lua scripts on one Redis, under a fresh key prefix per example."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.prefix = f"prop-{uuid.uuid4().hex[:8]}"
        self.acquire = r.register_script(lua("acquire"))
        self.extend_ = r.register_script(lua("extend"))
        self.release_ = r.register_script(lua("release"))

    def key(self, k: str) -> str:
        return f"{self.prefix}:c:{k}"

    def now(self) -> float:
        sec, usec = self.r.time()
        return sec + usec / 1e6

    def live(self, k: str) -> set[str]:
        """Members whose expiry is after Redis's now (what the scripts count)."""
        return set(self.r.zrangebyscore(self.key(k), f"({self.now():.6f}", "+inf"))


@pytest.fixture(scope="module")
def store_redis() -> Iterator[redis.Redis]:
    with redis_server() as server:
        client = redis.Redis(server.host, server.port, decode_responses=True)
        yield client
        client.close()


op = st.one_of(
    st.tuples(st.just("acquire"), st.sampled_from(INSTANCES),
              st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True),
              st.sampled_from((SHORT, LONG))),
    st.tuples(st.just("extend"), st.sampled_from(INSTANCES), st.sampled_from((SHORT, LONG))),
    st.tuples(st.just("release"), st.integers(0, 30)),
    st.tuples(st.just("sleep"), st.sampled_from((0.01, 0.04))),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(limits=st.tuples(*[st.integers(1, 3)] * len(KEYS)), ops=st.lists(op, max_size=25))
def test_leases_never_exceed_limits_all_or_none_and_expire(store_redis, limits, ops):
    s = Store(store_redis)
    limit = dict(zip(KEYS, limits, strict=True))
    held: dict[str, Held] = {}
    ids = (f"lease{i}" for i in itertools.count())
    for step in ops:
        if step[0] == "acquire":
            _, inst, keys, ttl = step
            lease = next(ids)
            t0 = s.now()
            res = s.acquire(keys=[s.key(k) for k in keys],
                            args=[lease, ttl, len(keys), 0, *[limit[k] for k in keys]])
            t1 = s.now()
            # What certainly held each key when the script ran (t0..t1), and what may have.
            certain = {k: sum(1 for h in held.values()
                              if k in h.expiry and h.expiry[k][0] > t1) for k in keys}
            maybe = {k: sum(1 for h in held.values()
                            if k in h.expiry and h.expiry[k][1] > t0) for k in keys}
            present = [lease in s.live(k) or lease in store_redis.zrange(s.key(k), 0, -1)
                       for k in keys]
            if res[0] == "ok":
                assert all(present), (step, present)  # all ...
                assert all(certain[k] < limit[k] for k in keys), (step, certain)
                held[lease] = Held(inst, tuple(keys), {k: (t0 + ttl, t1 + ttl) for k in keys})
            else:
                assert res[0] == "concurrency", res
                assert not any(present), (step, present)  # ... or none
                full = keys[int(res[1]) - 1]
                assert maybe[full] >= limit[full], (step, res, maybe)  # expired ones free
        elif step[0] == "extend":
            _, inst, ttl = step
            mine = [(lease, k) for lease, h in held.items() if h.instance == inst
                    for k in h.keys if k in h.expiry]
            if not mine:
                continue
            args: list[object] = [ttl]
            for lease, k in mine:
                args += [lease, limit[k]]
            t0 = s.now()
            lost = s.extend_(keys=[s.key(k) for _, k in mine], args=args)
            t1 = s.now()
            lost_at = {int(i) - 1 for i in lost}
            for i, (lease, k) in enumerate(mine):
                if i in lost_at:
                    # refused only when the lease had gone and others filled the key
                    assert lease not in s.live(k)
                    del held[lease].expiry[k]
                else:
                    held[lease].expiry[k] = (t0 + ttl, t1 + ttl)
        elif step[0] == "release":
            if not held:
                continue
            lease = sorted(held)[step[1] % len(held)]
            h = held.pop(lease)
            s.release_(keys=[s.key(k) for k in h.keys], args=[lease])
            assert all(lease not in store_redis.zrange(s.key(k), 0, -1) for k in h.keys)
        else:
            time.sleep(step[1])
        for k in KEYS:  # never more than the limit held, whatever happened
            assert len(s.live(k)) <= limit[k], (k, s.live(k), limit[k])
    for k in KEYS:
        store_redis.delete(s.key(k))
