"""Prefetched rate slots (`ferrymail.orchestrator.prefetch`) in `HostLimiter` against a real
limiter service on a Unix socket in this process, on a fake clock shared by the service and
both simulated workers (a round trip takes no fake time, so the bounds are exact):

- exactness (hypothesis): whatever the rates and the two workers' arrival patterns, over any
  window of W seconds at most ``(W + LATE) / interval + burst`` messages are sent per rate;
- the round trips it saves, the background refill, LATE drops, and the wire's ``slots``.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ferrymail.orchestrator.host import HostLimiter
from ferrymail.orchestrator.hostservice import LimiterService, _Conn
from ferrymail.orchestrator.hostwire import ProtocolError, attempt_to_wire, limit_to_wire
from ferrymail.orchestrator.limiter import EPSILON, Denied, gcra
from ferrymail.orchestrator.local import LocalLimiter
from ferrymail.orchestrator.policy import Attempt, Limit, Rate
from ferrymail.orchestrator.prefetch import LATE, PREFETCH_MAX, RateSlots, plan
from ferrymail.orchestrator.suspensions import FILE_NAME, RECHECK, SuspensionFile

A = Attempt("192.0.2.1", "198.51.100.7", "mx.example.com", "example.com", "t")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Host:
    """A limiter service (fake clock) on ``dir/limiter.sock`` and two workers."""

    def __init__(self, d: Path, clock: Clock) -> None:
        self.path = d / "limiter.sock"
        self.clock = clock
        self.service = LimiterService(LocalLimiter(
            clock=clock, suspensions=SuspensionFile(d / FILE_NAME)))
        self.workers = [HostLimiter(self.path, d, workers=2, worker=i, clock=clock)
                        for i in range(2)]

    async def __aenter__(self) -> Host:
        self.server = await asyncio.start_unix_server(self.service.client, path=str(self.path))
        for w in self.workers:
            await w.start()
            assert w.shared
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self.workers:
            await w.stop()
        for _ in range(1000):  # the service sees both connections close
            if not self.service.conns:
                break
            await asyncio.sleep(0.001)
        self.server.close()
        await self.server.wait_closed()


def run_with_host(scenario: Callable[[Host, Clock], Awaitable[None]]) -> None:
    """``scenario(host, clock)`` against a fresh `Host` on a fresh fake clock."""
    async def main(d: Path) -> None:
        clock = Clock()
        async with Host(d, clock) as host:
            await scenario(host, clock)

    with tempfile.TemporaryDirectory(prefix="fm-prefetch-") as d:
        asyncio.run(asyncio.wait_for(main(Path(d)), 30))


def assert_within_bound(sent: list[float], rate: Rate) -> None:
    """GCRA over any window of the sends, widened by LATE: m sends from s_i to s_j need
    m <= (s_j - s_i + LATE) / interval + burst."""
    sent = sorted(sent)
    iv = rate.interval
    for i in range(len(sent)):
        for j in range(i + rate.burst, len(sent)):
            m = j - i + 1
            assert m <= (sent[j] - sent[i] + LATE) / iv + rate.burst + 1e-6, (
                f"{m} sends in {sent[j] - sent[i]:.6f} s at {rate} (interval {iv:.6f} s)")


# -- exactness ---------------------------------------------------------------------------

RATES = st.builds(Rate, st.sampled_from([50, 500, 1000, 3000, 20_000, 1_000_000]),
                  st.sampled_from([1.0, 2.0]), st.integers(1, 4))
EVENT = st.tuples(st.integers(0, 1),                     # worker
                  st.floats(0.0, 4.0),                    # gap before it, in intervals
                  st.sampled_from([0.0, 0.0, 0.0, 0.002, 0.0045, 0.006, 0.03]),  # and in s
                  st.integers(1, 4),                      # messages at once
                  st.sampled_from([0.0, 0.0005, 0.02]),   # ahead (s)
                  st.integers(0, 2))                      # path: rate a, rate b, or both


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ra=RATES, rb=RATES, events=st.lists(EVENT, min_size=1, max_size=50))
@example(ra=Rate(1000, 1.0), rb=Rate(50, 1.0), events=[  # both workers keep 4 slots, then
    (0, 0, 0, 1, 0.2, 0), (1, 0, 0, 1, 0.2, 0),         # 30 ms later: stale, must be dropped
    (0, 0, 0.03, 4, 0.2, 0), (1, 0, 0, 4, 0.2, 0), (0, 0, 0, 1, 0.2, 0)])
def test_two_workers_never_pass_more_than_the_bound_plus_late(
        ra: Rate, rb: Rate, events: list[tuple[int, float, float, int, float, int]]) -> None:
    la = Limit("a", "a", rate=ra)
    lb = Limit("b", "b", rate=rb)
    paths = [(la,), (lb,), (la, lb)]
    step = min(ra.interval, rb.interval)
    sent: dict[str, list[float]] = {"a": [], "b": []}

    async def scenario(host: Host, clock: Clock) -> None:
        for worker, gap, jump, n, ahead, path in events:
            clock.now += gap * step + jump
            limits = paths[path]
            got = await asyncio.gather(*(host.workers[worker].message(A, limits, None, ahead)
                                         for _ in range(n)))
            for g in got:
                if isinstance(g, Denied):
                    assert g.kind == "rate" and g.retry_after is not None
                    continue
                at = clock.now + (g or 0.0)
                assert (g or 0.0) <= ahead + EPSILON
                for lim in limits:
                    sent[lim.key].append(at)
            await asyncio.sleep(0)  # let a background refill run, sometimes

    run_with_host(scenario)
    assert_within_bound(sent["a"], ra)
    assert_within_bound(sent["b"], rb)


# -- what prefetch saves and how -----------------------------------------------------------


def test_plan_prefetches_only_rates_above_400_per_second() -> None:
    def count(*rates: Rate) -> int:
        return plan([Limit(f"k{i}", "k", rate=r) for i, r in enumerate(rates)]).count

    assert count(Rate(20, 1.0)) == 1
    assert count(Rate(400, 1.0)) == 2  # 2.5 ms apart: two fit in 5 ms
    assert count(Rate(399, 1.0)) == 1
    assert count(Rate(1000, 1.0)) == 5
    assert count(Rate(1_000_000, 1.0)) == PREFETCH_MAX
    assert count(Rate(1_000_000, 1.0), Rate(1000, 1.0)) == 5  # the slowest rate decides


def test_fast_rate_costs_a_round_trip_per_batch_not_per_message() -> None:
    rate = Limit("g", "g", rate=Rate(1_000_000, 1.0))  # never binds: 64 slots a request

    async def scenario(host: Host, clock: Clock) -> None:
        w = host.workers[0]
        for _ in range(640):
            clock.now += 1e-6
            assert await w.message(A, (rate,), None, 0.2) is None
        # one request a 64 slots; the refill starts before they run out, so a few more
        assert 10 <= host.service.requests <= 25, host.service.requests
        # another worker's prefetch comes after what this one holds: no slot twice
        got = await host.workers[1].message(A, (rate,), None, 0.2)
        assert got is None or got > 0

    run_with_host(scenario)


def test_slow_rate_still_asks_per_message() -> None:
    rate = Limit("s", "s", rate=Rate(20, 1.0))

    async def scenario(host: Host, clock: Clock) -> None:
        for _ in range(5):
            clock.now += 0.05
            assert await host.workers[0].message(A, (rate,), None) is None
        assert host.service.requests == 5

    run_with_host(scenario)


def test_kept_slots_past_late_are_dropped_and_fetched_again() -> None:
    rate = Limit("g", "g", rate=Rate(10_000, 1.0))  # 0.1 ms apart: 50 slots a request

    async def scenario(host: Host, clock: Clock) -> None:
        w = host.workers[0]
        assert await w.message(A, (rate,), None) is None
        assert w.slots.kept(plan([rate]).key) == 49
        asked = host.service.requests
        clock.now += 0.5  # long past every kept slot's use-by time
        assert await w.message(A, (rate,), None) is None
        assert w.slots.dropped == 49
        assert host.service.requests == asked + 1  # a fresh request, not a stale slot

    run_with_host(scenario)


def test_refill_runs_in_the_background_before_the_slots_run_out() -> None:
    rate = Limit("g", "g", rate=Rate(10_000, 1.0))

    async def scenario(host: Host, clock: Clock) -> None:
        w = host.workers[0]
        p = plan([rate])
        assert await w.message(A, (rate,), None, 0.2) is None
        for _ in range(p.count - 1):  # use the kept ones on time
            clock.now += rate.rate.interval  # type: ignore[union-attr]
            await w.message(A, (rate,), None, 0.2)
        await asyncio.gather(*w.slots.tasks)
        assert w.slots.kept(p.key) == p.count  # refilled without a message waiting
        assert host.service.requests == 2

    run_with_host(scenario)


def test_concurrent_messages_share_one_request() -> None:
    rate = Limit("g", "g", rate=Rate(1_000_000, 1.0))

    async def scenario(host: Host, clock: Clock) -> None:
        got = await asyncio.gather(*(host.workers[0].message(A, (rate,), None, 0.2)
                                     for _ in range(30)))
        assert all(g is None or 0 < g <= 30e-6 for g in got)  # kept slots, 1 µs apart
        assert host.service.requests == 1

    run_with_host(scenario)


def test_a_suspension_stops_kept_slots_too() -> None:
    rate = Limit("g", "g", rate=Rate(1_000_000, 1.0))

    async def scenario(host: Host, clock: Clock) -> None:
        w = host.workers[0]
        assert await w.message(A, (rate,), None) is None
        await w.suspend({"localip": "192.0.2.1"}, 60, "451 slow down")
        await asyncio.sleep(RECHECK + 0.05)  # the worker looks at the file again
        assert w.slots.kept(plan([rate]).key) > 0
        got = await w.message(A, (rate,), None)
        assert isinstance(got, Denied) and got.kind == "suspended"

    run_with_host(scenario)


def test_a_worker_keeps_only_the_slots_the_service_confirms() -> None:
    rate = Limit("g", "g", rate=Rate(1_000_000, 1.0))

    async def scenario(host: Host, clock: Clock) -> None:
        handle = host.service.handle

        def without_slots(conn: _Conn, req: dict) -> dict | None:
            req.pop("slots", None)  # a service that knows nothing of prefetch
            return handle(conn, req)

        host.service.handle = without_slots  # type: ignore[method-assign]
        w = host.workers[0]
        for _ in range(3):
            clock.now += 1e-6
            assert await w.message(A, (rate,), None, 0.2) is None
            assert w.slots.kept(plan([rate]).key) == 0
        assert host.service.requests == 3

    run_with_host(scenario)


def test_service_reserves_n_slots_in_one_step_and_bounds_n() -> None:
    clock = Clock()
    svc = LimiterService(LocalLimiter(clock=clock))
    c = _Conn(None, "0")  # type: ignore[arg-type]
    lim = Limit("g", "g", rate=Rate(1000, 1.0))

    def ask(slots: object) -> dict:
        reply = svc.handle(c, {"id": 1, "op": "message", "a": attempt_to_wire(A),
                               "l": [limit_to_wire(lim)], "lease": None, "ahead": 0.0,
                               "slots": slots})
        assert reply is not None
        return reply

    assert ask(5) == {"id": 1, "hold": 0.0, "slots": 5}
    clock.now += 0.004  # the 5th slot is at +4 ms, the next free one at +5 ms
    assert ask(1)["denied"][0] == "rate"
    clock.now += 0.001
    assert ask(1) == {"id": 1, "hold": 0.0}
    for bad in (0, -1, PREFETCH_MAX + 1, 2.5, True, "3"):
        with pytest.raises(ProtocolError, match="slots"):
            ask(bad)


def test_gcra_counts_each_prefetched_slot_as_the_largest_interval() -> None:
    # slots used 1 ms apart (the slower rate's) must cost the faster rate 1 ms each too
    ok, tat, wait = gcra(None, 10.0, 0.0001, 1, 0.0, 5, 0.001)
    assert ok and wait == 0.0 and tat == pytest.approx(10.005)
    assert gcra(None, 10.0, 0.0001, 1, 0.0, 1, 0.001)[1] == pytest.approx(10.0001)


def test_rate_slots_keep_and_take_on_a_fake_clock() -> None:
    async def scenario() -> None:
        clock = Clock()
        slots = RateSlots(clock)
        p = plan([Limit("g", "g", rate=Rate(1000, 1.0))])  # 1 ms apart, 5 a request

        async def never() -> tuple[float, int] | None:
            raise AssertionError("no refill expected")

        slots.keep(p, 0.0)  # slot 0 used by the asker: 1..4 kept at +1..+4 ms
        clock.now += 0.0005
        assert await slots.take(p, never) is None  # +1 ms is further than ahead 0
        assert await slots.take(p, never, 0.001) == pytest.approx(0.0005)  # hold until +1 ms
        clock.now += 0.0015 + LATE + 0.0001  # slot 2 (+2 ms) is now more than LATE past
        assert slots.dropped == 0
        fetched: list[int] = []

        async def refill() -> tuple[float, int] | None:
            fetched.append(1)
            return 0.0, p.count

        # now +7.1 ms: slot +2 is 5.1 ms late (dropped), +3 is 4.1 ms late (used), and
        # +4 is within REFILL_BEFORE of its use-by time: the next 5 are fetched meanwhile
        got = await slots.take(p, refill, 0.001)
        assert got == 0.0 and slots.dropped == 1
        await asyncio.gather(*slots.tasks)
        assert fetched == [1] and slots.kept(p.key) == 1 + p.count
        await slots.stop()
        assert slots.kept(p.key) == 0

    asyncio.run(scenario())


def test_kept_slots_are_bounded_in_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from ferrymail.orchestrator import prefetch

    monkeypatch.setattr(prefetch, "MAX_KEYS", 3)

    async def scenario() -> None:
        slots = RateSlots(Clock())
        plans = [plan([Limit(f"k{i}", "k", rate=Rate(1000, 1.0))]) for i in range(4)]
        for p in plans[:3]:
            slots.keep(p, 0.0)
        assert slots.status() == {"keys": 3, "dropped": 0, "overflows": 0}
        slots.keep(plans[3], 0.0)  # a fourth key: the bound, logged and counted
        assert slots.status() == {"keys": 1, "dropped": 0, "overflows": 1}
        assert slots.kept(plans[3].key) == 4 and slots.kept(plans[0].key) == 0

    asyncio.run(scenario())
