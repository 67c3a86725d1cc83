"""The Redis limiter against a real ``redis-server`` on a free loopback port: several
limiters (as several instances would) share leases, rates and suspensions; a lost instance's
leases expire; Redis stopping and coming back empty is survived.
"""

from __future__ import annotations

import asyncio
import time

from ferrymail.config.policies import Cluster as ClusterConfig
from ferrymail.orchestrator.limiter import Denied, Lease
from ferrymail.orchestrator.policy import Attempt, Limit, Rate
from ferrymail.orchestrator.redis import RedisLimiter, add_suspension
from ferrymail.orchestrator.suspensions import new_suspension
from tests.integration.outbound_harness import LogCapture, run
from tests.realpeers import redis_server

A = Attempt(localip="127.0.0.2", recipientdomain="dest.test", grouping="dest.test")


def limiter(url: str, name: str, **extra: object) -> RedisLimiter:
    cfg = ClusterConfig(redis=url, instance=name, heartbeat=0.1, timeout=0.3, **extra)
    return RedisLimiter(cfg, default_instance=name)


async def started(*limiters: RedisLimiter) -> None:
    for lim in limiters:
        await lim.start()
    await asyncio.sleep(0.25)  # a heartbeat or two: every instance registered


def test_leases_are_shared_and_all_or_none():
    with redis_server() as r:
        async def main() -> None:
            a, b = limiter(r.url, "a"), limiter(r.url, "b")
            await started(a, b)
            small = Limit("ip", "localip=127.0.0.2", concurrency=2)
            big = Limit("g", "grouping=dest.test", concurrency=3)
            got = [await x.connect(A, (small, big)) for x in (a, b, a)]
            assert [isinstance(x, Lease) for x in got] == [True, True, False]
            assert isinstance(got[2], Denied)
            assert got[2].reason == "concurrency 2/2 for localip=127.0.0.2"
            # the refused one took nothing from the bigger set: one more fits there alone
            assert isinstance(await b.connect(A, (big,)), Lease)
            assert isinstance(await a.connect(A, (big,)), Denied)
            a.release(got[0])
            await asyncio.sleep(0.05)
            assert isinstance(await b.connect(A, (small,)), Lease)
            await a.stop()
            await b.stop()

        run(main, 30)


def test_killed_instance_leases_expire_within_ttl():
    with redis_server() as r:
        async def main() -> None:
            a = limiter(r.url, "a", lease_ttl=2.0)
            b = limiter(r.url, "b", lease_ttl=2.0)
            await started(a, b)
            c = Limit("ip", "localip=127.0.0.2", concurrency=1)
            assert isinstance(await a.connect(A, (c,)), Lease)
            await a.cluster.stop()  # "kill -9": no release, no more heartbeats
            t0 = time.monotonic()
            while not isinstance(await b.connect(A, (c,)), Lease):
                assert time.monotonic() - t0 < 2.0 + 0.5
                await asyncio.sleep(0.05)
            assert time.monotonic() - t0 > 1.0  # it was held until the TTL ran out
            await b.stop()

        run(main, 30)


def test_shared_rate_over_two_instances_stays_within_gcra_bound():
    with redis_server() as r:
        async def main() -> None:
            a, b = limiter(r.url, "a"), limiter(r.url, "b")
            await started(a, b)
            rate = Limit("ip", "localip=127.0.0.2", rate=Rate(20, 1.0))
            passed: list[float] = []

            async def sender(lim: RedisLimiter) -> None:
                end = time.monotonic() + 2.0
                while time.monotonic() < end:
                    d = await lim.message(A, (rate,), None)
                    if d is None:
                        passed.append(time.monotonic())
                    else:
                        assert d.kind == "rate" and d.retry_after is not None
                        await asyncio.sleep(d.retry_after)

            async def redis_time() -> float:
                sec, usec = await a.cluster.call(lambda r: r.time())
                return sec + usec / 1e6

            t0 = await redis_time()
            await asyncio.gather(sender(a), sender(b), sender(a))
            t1 = await redis_time()
            passed.sort()
            # On Redis time, exactly: every grant moved the state one interval on, and none
            # was made before it, so over [t0, t1] at most 20·(t1 - t0) + 1 passed.
            assert 20 * 2 * 0.9 <= len(passed) <= 20 * (t1 - t0) + 1
            # On this process's clock (when the replies arrived): 60 ms of scheduling slack.
            for i in range(len(passed)):
                for j in range(i, len(passed)):
                    assert j - i + 1 <= 20 * (passed[j] - passed[i] + 0.06) + 1
            await a.stop()
            await b.stop()

        run(main, 30)


def test_redis_down_splits_then_restart_empty_resumes_shared():
    with redis_server() as r, LogCapture() as logs:
        async def main() -> None:
            lims = [limiter(r.url, n) for n in ("a", "b", "c")]
            await started(*lims)
            assert all(x.cluster.instances == 3 for x in lims)
            c = Limit("ip", "localip=127.0.0.2", concurrency=5)
            held = await lims[0].connect(A, (c,))
            assert isinstance(held, Lease)
            r.stop()
            await asyncio.sleep(0.3)
            # first call after the outage notices it; the split limit is ⌈5/3⌉ = 2 per
            # instance, counting the lease "a" still holds
            t0 = time.monotonic()
            second = await lims[0].connect(A, (c,))
            assert time.monotonic() - t0 < 1.0  # short socket timeouts, no stall
            assert isinstance(second, Lease)
            third = await lims[0].connect(A, (c,))
            assert isinstance(third, Denied)
            assert third.reason == ("concurrency 2/2 for localip=127.0.0.2 "
                                    "(redis unreachable: split 1/3)")
            assert isinstance(await lims[1].connect(A, (c,)), Lease)
            assert lims[0].cluster.state == "fallback"
            r.restart()  # empty
            deadline = time.monotonic() + 8
            while not all(x.cluster.up for x in lims):
                assert time.monotonic() < deadline, [x.status() for x in lims]
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)  # a tick: the leases held are registered again
            cl = lims[2].cluster
            held_now = await cl.call(lambda rc: rc.zcard(cl.key("c", "ip")))
            assert held_now == 3  # a's two and b's one, re-acquired in the empty Redis
            got = [await lims[2].connect(A, (c,)) for _ in range(3)]
            assert [isinstance(x, Lease) for x in got] == [True, True, False]
            for x in lims:
                await x.stop()

        run(main, 40)
    states = logs.lines("cluster.state")
    assert any("state=fallback" in ln and "instance=a" in ln for ln in states)
    assert any("state=shared previous=fallback" in ln for ln in states)


def test_suspension_reaches_every_instance_within_a_second():
    with redis_server() as r:
        async def main() -> None:
            lims = [limiter(r.url, n) for n in ("a", "b", "c")]
            await started(*lims)
            s = new_suspension({"localip": "127.0.0.2", "grouping": "dest.test"}, 600,
                               "blocklisted")
            await add_suspension(lims[0].cluster, s)
            t0 = time.monotonic()
            while not all(isinstance(x._suspended(A), Denied) for x in lims):
                assert time.monotonic() - t0 < 1.0
                await asyncio.sleep(0.02)
            d = await lims[1].connect(A, ())
            assert isinstance(d, Denied) and d.kind == "suspended" and "blocklisted" in d.reason
            other = Attempt(localip="127.0.0.3", grouping="dest.test")
            assert isinstance(await lims[1].connect(other, ()), Lease)
            for x in lims:
                await x.stop()

        run(main, 30)


def test_connection_interval_counts_from_the_connection():
    """``connected`` moves a shared interval to count from when the connection stood
    (lua/connected.lua), for every instance; never earlier than the grant made it."""
    with redis_server() as r:
        async def main() -> None:
            a, b = limiter(r.url, "a"), limiter(r.url, "b")
            await started(a, b)
            ci = Limit("ip", "localip=127.0.0.2", connectinterval=0.5)
            assert isinstance(await a.connect(A, (ci,)), Lease)
            await asyncio.sleep(0.3)
            await a.connected((ci,), 0.1)  # it stood 0.2 s after its grant
            await asyncio.sleep(0.25)  # 0.55 s after the grant, 0.35 s after the connection
            d = await b.connect(A, (ci,))
            assert isinstance(d, Denied) and d.kind == "connectinterval", d
            assert d.retry_after is not None and 0.1 <= d.retry_after <= 0.16, d
            await asyncio.sleep(d.retry_after)
            assert isinstance(await b.connect(A, (ci,)), Lease)
            await b.connected((ci,), 5.0)  # an old stamp does not move the state back
            assert isinstance(await a.connect(A, (ci,)), Denied)
            await a.stop()
            await b.stop()

        run(main, 30)


def test_prefetched_slots_one_script_per_batch_each_counted_as_the_largest_interval():
    """Rates above 400/s: one ``message.lua`` call reserves several slots (the shared
    `orchestrator/prefetch.py`), and with two rates each slot counts as the slower one's
    interval against both (a faster rate's slots are used that far apart)."""
    with redis_server() as r:
        async def main() -> None:
            a = limiter(r.url, "a")
            await started(a)
            slow = Limit("slow", "slow", rate=Rate(1000, 1.0))  # 1 ms: 5 slots a call
            fast = Limit("fast", "fast", rate=Rate(100_000, 1.0))  # 10 µs
            t0 = await a.cluster.call(lambda c: c.time())
            before = a.cluster.calls
            assert await a.message(A, (slow, fast), None, 0.5) is None
            assert a.slots.kept((slow.rate_key, fast.rate_key)) == 4
            assert a.cluster.calls - before <= 3  # the script (and perhaps a heartbeat: 2)
            tats = {k: float(await a.cluster.call(
                lambda c, k=k: c.get(a.cluster.key("r", k)))) for k in (slow.rate_key,
                                                                         fast.rate_key)}
            now = t0[0] + t0[1] / 1e6
            # both moved 5 x 1 ms on (the fast one would have moved 5 x 10 µs by its own)
            for key in (slow.rate_key, fast.rate_key):
                assert 0.0045 <= tats[key] - now <= 0.0055 + 0.05, (key, tats[key] - now)
            before = a.cluster.calls
            for _ in range(4):  # the kept ones: no call but the background refill as the
                got = await a.message(A, (slow, fast), None, 0.5)  # last is taken
                assert got is None or 0 < got <= 0.005
            await asyncio.gather(*a.slots.tasks)
            assert a.cluster.calls - before <= 3  # the refill (and perhaps a heartbeat: 2)
            await a.stop()

        run(main, 30)
