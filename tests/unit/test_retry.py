"""Retry schedule math: interval walk with last-interval repeat, count, during, notify steps."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ferrymail.config import Retry, RetryInterval
from ferrymail.delivery.scheduler import plan_retry


def retry(*intervals: float | tuple[float, bool], count: int = 30,
          during: float = 10**6) -> Retry:
    ivs = tuple(RetryInterval(interval=i[0], notify=i[1]) if isinstance(i, tuple)
                else RetryInterval(interval=i) for i in intervals)
    return Retry(count=count, intervals=ivs, during=during)


def test_walks_intervals_and_repeats_the_last() -> None:
    r = retry(10, 20, 30)
    waits = [plan_retry(r, a, received_at=0, now=1000).next_attempt - 1000 for a in range(1, 7)]
    assert waits == [10, 20, 30, 30, 30, 30]
    assert all(r.delay(a).interval == w for a, w in zip(range(1, 7), waits, strict=True))


def test_count_limits_retries() -> None:
    r = retry(5, count=2)
    assert not plan_retry(r, 1, 0, 10).expired  # first try failed: retry 1 of 2
    assert not plan_retry(r, 2, 0, 10).expired  # retry 1 failed: retry 2 of 2
    last = plan_retry(r, 3, 0, 10)
    assert last.expired and "count 2" in last.reason


def test_count_zero_bounces_at_first_temporary_failure() -> None:
    assert plan_retry(retry(5, count=0), 1, 0, 10).expired


def test_during_expires_and_clamps_the_last_try_to_the_deadline() -> None:
    r = retry(100, during=250)
    assert plan_retry(r, 1, received_at=0, now=10).next_attempt == 110
    clamped = plan_retry(r, 2, received_at=0, now=200)
    assert not clamped.expired and clamped.next_attempt == 250
    late = plan_retry(r, 3, received_at=0, now=250)
    assert late.expired and "250" in late.reason


def test_notify_once_per_notify_step() -> None:
    r = retry(10, (20, True), 30, (40, True))
    notified = 0
    seen = []
    for attempt in range(1, 8):
        p = plan_retry(r, attempt, 0, 100, notified)
        seen.append(p.notify)
        notified = p.notified
    assert seen == [False, True, False, True, False, False, False]
    assert notified == 2


def test_repeating_notify_interval_notifies_once() -> None:
    r = retry(10, (20, True))
    notified = 0
    flags = []
    for attempt in range(1, 6):
        p = plan_retry(r, attempt, 0, 100, notified)
        flags.append(p.notify)
        notified = p.notified
    assert flags == [False, True, False, False, False]


def test_no_notice_when_expiring() -> None:
    r = retry((10, True), count=0)
    p = plan_retry(r, 1, 0, 5)
    assert p.expired and not p.notify


@given(
    intervals=st.lists(st.integers(1, 10_000), min_size=1, max_size=6),
    attempts=st.integers(1, 100),
    count=st.integers(0, 60),
    during=st.integers(1, 10**6),
    age=st.integers(0, 2 * 10**6),
)
def test_properties(intervals: list[int], attempts: int, count: int, during: int,
                    age: int) -> None:
    r = retry(*intervals, count=count, during=during)
    received = 1_000_000.0
    now = received + age
    p = plan_retry(r, attempts, received, now)
    if attempts - 1 >= count or age >= during:
        assert p.expired
        return
    assert not p.expired
    assert now < p.next_attempt <= received + during
    wait = intervals[min(attempts, len(intervals)) - 1]
    assert p.next_attempt == min(now + wait, received + during)
