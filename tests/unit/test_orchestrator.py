"""Shaping policies and the in-process limiter, on a fake clock; GCRA and leases as properties."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.config import ConfigError, parse_running
from ferrymail.orchestrator.limiter import Denied, Lease, gcra
from ferrymail.orchestrator.local import LocalLimiter, divided
from ferrymail.orchestrator.policy import (
    Attempt,
    Limit,
    Rate,
    limits_for,
    limits_for_domains,
    value_matches,
)
from ferrymail.orchestrator.suspensions import SuspensionFile, new_suspension

POLICIES = """
policies:
  - fields: [localip, grouping]
    conditions:
      - if: { grouping: "&gmail" }
        then: { concurrency: 10, rate: "600/60", connectinterval: 0.5 }
      - if: { localip: [192.0.2.10, 192.0.2.11] }
        then: { rate: "100/3600" }
    default: { concurrency: 5, rate: "100/60" }
  - fields: [localip]
    conditions:
      - if: { localip: 198.51.100.0/24 }
        then: { concurrency: 2 }
  - default: { rate: "1000/1", burst: 50 }
groupings:
  - id: gmail
    remotemx: ["*.google.com", "*.googlemail.com"]
"""


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def attempt(localip: str = "192.0.2.1", mx: str = "mx.example.net",
            domain: str = "example.net") -> Attempt:
    return Attempt(localip=localip, remoteip="203.0.113.5", remotemx=mx,
                   recipientdomain=domain, transportid="mx")


# -- policies -> limits -----------------------------------------------------------------------


def test_grouping_condition_and_default():
    cfg = parse_running(POLICIES)
    gmail = limits_for(cfg, attempt(mx="alt1.aspmx.l.google.com", domain="corp.example"))
    by_key = {lim.key: lim for lim in gmail}
    lim = by_key["localip=192.0.2.1|grouping=&gmail"]
    assert (lim.concurrency, lim.rate, lim.connectinterval) == (10, Rate(600, 60.0), 0.5)
    assert lim.label == "localip=192.0.2.1, grouping=&gmail"
    assert by_key["*"].rate == Rate(1000, 1.0, 50)  # the global counter
    other = {lim.key: lim for lim in limits_for(cfg, attempt())}
    assert other["localip=192.0.2.1|grouping=example.net"].concurrency == 5  # default
    assert "localip=192.0.2.1" not in other  # second policy: no default, no match


def test_limits_are_remembered_per_config_and_a_reload_brings_new_ones():
    """limits_for remembers a path's limits, keyed on the running config object: the same
    attempt under a reloaded config with other numbers gets the new numbers at once."""
    a = attempt()
    old = parse_running(POLICIES)
    first = limits_for(old, a)
    assert limits_for(old, a) is first  # the remembered tuple
    new = parse_running(POLICIES.replace("{ concurrency: 5,", "{ concurrency: 7,"))
    by_key = {lim.key: lim for lim in limits_for(new, a)}
    assert by_key["localip=192.0.2.1|grouping=example.net"].concurrency == 7
    assert limits_for(new, attempt(localip="192.0.2.10"))[0].key.startswith("localip=192.0.2.10")
    assert {lim.key: lim for lim in limits_for(old, a)} == {lim.key: lim for lim in first}


def test_list_and_cidr_conditions_and_scarcest_first():
    cfg = parse_running(POLICIES)
    warm = {lim.key: lim for lim in limits_for(cfg, attempt(localip="192.0.2.11"))}
    assert warm["localip=192.0.2.11|grouping=example.net"].rate == Rate(100, 3600.0)
    assert warm["localip=192.0.2.11|grouping=example.net"].concurrency is None
    lims = limits_for(cfg, attempt(localip="198.51.100.7"))
    assert [lim.concurrency for lim in lims][:2] == [2, 5]  # scarcest concurrency first


def test_smarthost_attempt_counts_against_each_recipient_domain():
    cfg = parse_running("""
policies:
  - fields: [recipientdomain]
    conditions:
      - if: { recipientdomain: a.test }
        then: { concurrency: 1 }
    default: { concurrency: 4 }
  - fields: [localip]
    default: { rate: "10/1" }
""")
    smarthost = Attempt(localip="192.0.2.1", remotemx="relay.test", transportid="out")
    assert [lim.key for lim in limits_for_domains(cfg, smarthost, ("b.test",))] == [
        "recipientdomain=b.test", "localip=192.0.2.1"]
    both = limits_for_domains(cfg, smarthost, ("a.test", "b.test"))
    assert [(lim.key, lim.concurrency) for lim in both] == [
        ("recipientdomain=a.test", 1), ("recipientdomain=b.test", 4),
        ("localip=192.0.2.1", None)]  # the shared rate once, scarcest first


def test_rate_key_carries_the_spec():
    a = Limit("k", "k", rate=Rate(20, 1.0))
    b = Limit("k", "k", rate=Rate(30, 1.0))
    assert a.rate_key != b.rate_key


@pytest.mark.parametrize(("field", "pattern", "value", "expected"), [
    ("remotemx", "*.google.com", "aspmx.l.google.com", True),
    ("remotemx", "*.google.com", "google.com", False),
    ("recipientdomain", "Example.COM", "example.com", True),
    ("localip", "192.0.2.0/24", "192.0.2.77", True),
    ("localip", "192.0.2.0/24", "::1", False),
    ("localip", "2001:db8::/32", "2001:db8::5", True),
    ("remoteip", "203.0.113.5", "203.0.113.6", False),
    ("grouping", "&gmail", "&gmail", True),
])
def test_value_matching(field, pattern, value, expected):
    assert value_matches(field, pattern, value) is expected


@pytest.mark.parametrize(("text", "message"), [
    ("policies:\n  - fields: [localip]\n    default: {rate: '600'}\n",
     "policies[0].default.rate: expected a rate 'N/S'"),
    ("policies:\n  - fields: [localip]\n    conditions:\n      - if: {grouping: '&g'}\n"
     "        then: {concurrency: 1}\n", "not among the policy's fields"),
    ("policies:\n  - fields: [grouping]\n    conditions:\n      - if: {grouping: '&nope'}\n"
     "        then: {concurrency: 1}\n", "unknown grouping '&nope'"),
    ("policies:\n  - fields: [localip]\n    conditions:\n      - if: {localip: mx.example}\n"
     "        then: {concurrency: 1}\n", "is not an IP address or CIDR network"),
    ("policies:\n  - fields: [colour]\n", "policies[0].fields[0]"),
    ("policies:\n  - default: {concurrency: 0}\n", "policies[0].default.concurrency"),
])
def test_policy_errors_name_line_and_path(text, message):
    with pytest.raises(ConfigError) as info:
        parse_running(text, "running.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("running.yaml:")


# -- the local limiter, fake clock ------------------------------------------------------------


def test_concurrency_all_or_none_and_release():
    clock = FakeClock()
    lim = LocalLimiter(clock=clock)
    small = Limit("a", "localip=a", concurrency=1)
    big = Limit("b", "grouping=b", concurrency=5)
    first = lim.connect_now(attempt(), (small, big))
    assert isinstance(first, Lease)
    second = lim.connect_now(attempt(), (small, big))
    assert isinstance(second, Denied) and second.kind == "concurrency"
    assert second.reason == "concurrency 1/1 for localip=a"
    assert lim.held("b") == 1  # the refused connection holds nothing
    lim.release(first)
    lim.release(first)  # twice is harmless
    assert lim.held("a") == lim.held("b") == 0
    assert isinstance(lim.connect_now(attempt(), (small, big)), Lease)


def test_connectinterval_on_fake_clock():
    clock = FakeClock()
    lim = LocalLimiter(clock=clock)
    ci = Limit("k", "localip=k", connectinterval=0.5)
    assert isinstance(lim.connect_now(attempt(), (ci,)), Lease)
    clock.t += 0.3
    d = lim.connect_now(attempt(), (ci,))
    assert isinstance(d, Denied) and d.kind == "connectinterval"
    assert d.retry_after == pytest.approx(0.2)
    assert "next connection in 200 ms" in d.reason
    clock.t += 0.2
    assert isinstance(lim.connect_now(attempt(), (ci,)), Lease)


def test_connectinterval_counts_from_the_connection_not_the_grant():
    clock = FakeClock()
    lim = LocalLimiter(clock=clock)
    ci = Limit("k", "localip=k", connectinterval=0.5)
    assert isinstance(lim.connect_now(attempt(), (ci,)), Lease)  # granted at 1000.0
    clock.t += 0.08  # the connection stood at 1000.03, reported 50 ms later
    lim.connected_now((ci,), 0.05)
    clock.t = 1000.5  # the grant's interval is over, the connection's is not
    d = lim.connect_now(attempt(), (ci,))
    assert isinstance(d, Denied) and d.retry_after == pytest.approx(0.03)
    clock.t = 1000.53
    assert isinstance(lim.connect_now(attempt(), (ci,)), Lease)
    lim.connected_now((ci,), 0.6)  # never moves the state earlier than the grant made it
    clock.t = 1000.9
    assert isinstance(lim.connect_now(attempt(), (ci,)), Denied)


def test_rate_per_message_and_burst():
    clock = FakeClock()
    lim = LocalLimiter(clock=clock)
    r = Limit("k", "localip=k", rate=Rate(10, 1.0, burst=3))
    assert [lim.message_now(attempt(), (r,), None) for _ in range(3)] == [None] * 3
    d = lim.message_now(attempt(), (r,), None)
    assert d is not None and d.kind == "rate" and d.retry_after == pytest.approx(0.1)
    assert d.reason == "rate 10/1 burst 3 for localip=k: next slot in 100 ms"
    clock.t += 0.1
    assert lim.message_now(attempt(), (r,), None) is None


def test_two_rates_all_or_none():
    clock = FakeClock()
    lim = LocalLimiter(clock=clock)
    fast = Limit("f", "f", rate=Rate(100, 1.0))
    slow = Limit("s", "s", rate=Rate(1, 1.0))
    assert lim.message_now(attempt(), (fast, slow), None) is None
    clock.t += 0.02
    d = lim.message_now(attempt(), (fast, slow), None)
    assert d is not None and "for s:" in d.reason
    # the refused message took nothing from the fast counter: it passes alone now
    assert lim.message_now(attempt(), (fast,), None) is None
    assert lim.message_now(attempt(), (fast,), None) is not None


def test_split_divides_limits():
    clock = FakeClock()
    lim = LocalLimiter(clock=clock, divisor=lambda: 3, note=lambda: "redis unreachable: split 1/3")
    c = Limit("k", "localip=k", concurrency=4)
    leases = [lim.connect_now(attempt(), (c,)) for _ in range(3)]
    assert [isinstance(x, Lease) for x in leases] == [True, True, False]  # ⌈4/3⌉ = 2
    assert leases[2].reason.endswith("(redis unreachable: split 1/3)")
    assert [divided(3, 3), divided(1, 3), divided(10, 3), divided(5, 0)] == [1, 1, 4, 5]
    r = Limit("r", "r", rate=Rate(20, 1.0))
    assert lim.message_now(attempt(), (r,), None) is None
    clock.t += 0.1
    d = lim.message_now(attempt(), (r,), None)
    assert d is not None and d.retry_after == pytest.approx(0.05)  # 20/3 per second


def test_suspension_file_matches_and_expires(tmp_path):
    clock = FakeClock(0.0)
    wall = FakeClock(1_700_000_000.0)
    store = SuspensionFile(tmp_path / "suspensions.json")
    lim = LocalLimiter(clock=clock, wall=wall, suspensions=store)
    s = new_suspension({"localip": "192.0.2.0/24", "grouping": "&gmail"}, 600, "abuse desk",
                       now=wall.t)
    store.add(s, wall.t)
    a = Attempt(localip="192.0.2.9", remotemx="x.google.com", grouping="&gmail")
    d = lim.connect_now(a, ())
    assert isinstance(d, Denied) and d.kind == "suspended"
    assert d.reason.startswith("suspended until 2023-11-14T22:23:20Z (abuse desk;")
    assert lim.message_now(a, (), None) is not None
    assert isinstance(lim.connect_now(Attempt(localip="192.0.2.9", grouping="&other"), ()),
                      Lease)
    wall.t += 601
    assert isinstance(lim.connect_now(a, ()), Lease)
    assert store.remove(s.id) and not store.remove(s.id)


def test_new_suspension_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown field 'colour'"):
        new_suspension({"colour": "red"}, 60, "")
    with pytest.raises(ValueError, match="localip"):
        new_suspension({"localip": "not-an-ip"}, 60, "")
    with pytest.raises(ValueError, match="duration"):
        new_suspension({"localip": "192.0.2.1"}, 0, "")


def test_wait_wakes_on_release_not_by_polling():
    async def body() -> None:
        lim = LocalLimiter()
        c = Limit("k", "k", concurrency=1)
        held = lim.connect_now(attempt(), (c,))
        assert isinstance(held, Lease)
        denied = lim.connect_now(attempt(), (c,))
        assert isinstance(denied, Denied)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lim.release, held)
        t0 = loop.time()
        await lim.wait(denied, 5.0)
        assert loop.time() - t0 < 1.0
        assert isinstance(lim.connect_now(attempt(), (c,)), Lease)

    asyncio.run(body())


# -- properties -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 50), period=st.sampled_from([0.5, 1.0, 10.0, 60.0]),
       burst=st.integers(1, 10),
       gaps=st.lists(st.floats(0.0, 0.5, allow_nan=False), min_size=1, max_size=300),
       window=st.floats(0.01, 30.0))
def test_gcra_never_exceeds_rate_in_any_window(n, period, burst, gaps, window):
    """Over any window of W seconds at most N·W/S + burst messages pass."""
    interval = period / n
    tat = None
    now = 0.0
    passed: list[float] = []
    for g in gaps:
        now += g
        ok, new_tat, wait = gcra(tat, now, interval, burst)
        if ok:
            tat = new_tat
            passed.append(now)
        else:
            assert wait > 0
    bound = n * window / period + burst
    j = 0
    for i, t in enumerate(passed):  # windows starting at each passed message are the worst
        while j < len(passed) and passed[j] < t + window:
            j += 1
        assert j - i <= bound + 1e-6, (passed, window)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 20), period=st.sampled_from([1.0, 10.0]), burst=st.integers(1, 5))
def test_gcra_allows_the_full_rate_when_asked_at_it(n, period, burst):
    """Asking exactly every interval, every request passes (no starving at the rate)."""
    interval = period / n
    tat = None
    for k in range(3 * n):
        ok, tat, _ = gcra(tat, k * interval, interval, burst)
        assert ok


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 6), divisor=st.integers(1, 4),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=200))
def test_leases_never_exceed_the_limit(limit, divisor, ops):
    lim = LocalLimiter(clock=FakeClock(), divisor=lambda: divisor)
    spec = (Limit("k", "k", concurrency=limit), Limit("g", "g", concurrency=limit + 1))
    held: list[Lease] = []
    for acquire, idx in ops:
        if acquire:
            got = lim.connect_now(attempt(), spec)
            if isinstance(got, Lease):
                held.append(got)
            else:
                assert len(held) == math.ceil(limit / divisor)
        elif held:
            lim.release(held.pop(idx % len(held)))
        assert lim.held("k") == len(held) <= max(1, math.ceil(limit / divisor))


def test_rate_reservation_holds_the_message_until_its_slot():
    clock = FakeClock()
    lim = LocalLimiter(clock=clock)
    r = Limit("k", "localip=k", rate=Rate(10, 1.0))
    assert lim.message_now(attempt(), (r,), None, ahead=0.25) is None  # now
    assert lim.message_now(attempt(), (r,), None, ahead=0.25) == pytest.approx(0.1)
    assert lim.message_now(attempt(), (r,), None, ahead=0.25) == pytest.approx(0.2)
    d = lim.message_now(attempt(), (r,), None, ahead=0.25)
    assert isinstance(d, Denied) and d.retry_after == pytest.approx(0.05)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 50), period=st.sampled_from([0.5, 1.0, 10.0]),
       burst=st.integers(1, 5), ahead=st.floats(0.0, 2.0),
       gaps=st.lists(st.floats(0.0, 0.3, allow_nan=False), min_size=1, max_size=200),
       window=st.floats(0.01, 20.0))
def test_gcra_reservations_never_exceed_rate_in_any_window(n, period, burst, ahead, gaps,
                                                           window):
    """Reserved slots (sent at now + wait) obey the same bound: N·W/S + burst per window."""
    interval = period / n
    tat = None
    now = 0.0
    sent: list[float] = []
    for g in gaps:
        now += g
        ok, new_tat, wait = gcra(tat, now, interval, burst, ahead)
        if ok:
            assert wait <= ahead + 1e-6
            tat = new_tat
            sent.append(now + wait)
    sent.sort()
    bound = n * window / period + burst
    j = 0
    for i, t in enumerate(sent):
        while j < len(sent) and sent[j] < t + window:
            j += 1
        assert j - i <= bound + 1e-6


def test_suspension_file_sees_another_writer_within_the_recheck_and_its_own_at_once(tmp_path):
    import time as _time

    from ferrymail.orchestrator import suspensions

    path = tmp_path / "suspensions.json"
    mine, other = SuspensionFile(path), SuspensionFile(path)
    assert mine.current() == []
    other.add(new_suspension({"localip": "192.0.2.1"}, 60, "by hand"))
    deadline = _time.monotonic() + 5 * suspensions.RECHECK + 5
    while not mine.current():  # seen within RECHECK (a stat at most that often)
        assert _time.monotonic() < deadline, "another process's suspension never seen"
        _time.sleep(0.01)
    mine.add(new_suspension({"localip": "192.0.2.2"}, 60, "own"))
    assert {s.fields["localip"] for s in mine.current()} == {"192.0.2.1", "192.0.2.2"}
