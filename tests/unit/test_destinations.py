"""Destination health (sans-IO): slow start, failure feedback, dead parking, probes and the
ready-count curve; property tests over random event sequences."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ferrymail.config.models import DestinationPolicy
from ferrymail.delivery.destinations import DestinationHealth, HealthState, wanted_connections

POLICY = DestinationPolicy(initial_concurrency=2, dead_after=3, dead_backoff=60,
                           dead_backoff_max=200, recent_success=300)


def test_wanted_connections_follow_the_ready_count_as_kumomta():
    assert wanted_connections(20, 0) == 0
    assert wanted_connections(20, 1) == 1
    assert wanted_connections(20, 10) == 5  # ceil(20 * (1 - e^-0.23)) = ceil(4.11)
    assert wanted_connections(20, 100) == 18  # ceil(20 * 0.8997)
    assert wanted_connections(20, 10_000) == 20


@given(st.integers(1, 1000), st.integers(0, 100_000), st.integers(0, 100_000))
def test_wanted_connections_bounded_and_monotonic(limit, a, b):
    lo, hi = sorted((a, b))
    assert 0 <= wanted_connections(limit, lo) <= wanted_connections(limit, hi) <= limit
    assert (wanted_connections(limit, lo) == 0) == (lo == 0)


def test_slow_start_grows_by_one_per_success_to_the_limit():
    h = DestinationHealth(POLICY, 5)
    assert h.state is HealthState.SLOW_START and h.allowed(0, 5, 10_000) == 2
    changes = [h.success(float(i), POLICY, 5) for i in range(3)]
    assert [int(h.window), h.state] == [5, HealthState.NORMAL]
    assert changes[:2] == [None, None] and changes[2] is not None
    assert changes[2].after is HealthState.NORMAL
    assert h.allowed(3, 5, 10_000) == 5
    assert h.allowed(3, 5, 1) == 1  # one message waiting: one connection
    assert h.proven(2 + 299, POLICY) and not h.proven(2 + 301, POLICY)  # last success: 2


def test_failures_shrink_then_kill_then_one_probe_revives():
    h = DestinationHealth(POLICY, 20)
    for i in range(10):
        h.success(float(i), POLICY, 20)
    assert int(h.window) == 12
    c1 = h.failure(100, POLICY, 20, "connection refused")
    assert int(h.window) == 6 and c1 is not None and "12 -> 6" in c1.reason
    h.failure(101, POLICY, 20, "connection refused")
    assert int(h.window) == 3 and h.state is HealthState.SLOW_START
    dead = h.failure(102, POLICY, 20, "timeout")
    assert dead is not None and dead.after is HealthState.DEAD
    assert "3 consecutive connection failures: timeout" in dead.reason
    assert h.allowed(150, 20, 100) == 0 and h.describe(20, 150) == "dead 12s"
    assert h.failure(155, POLICY, 20, "late") is None  # an attempt that started before
    assert h.allowed(162, 20, 100) == 1 and h.state is HealthState.PROBING
    again = h.failure(170, POLICY, 20, "refused")
    assert again is not None and again.reason.startswith("probe failed")
    assert h.dead_until == 170 + 120  # doubled
    h.tick(290)
    h.failure(291, POLICY, 20, "refused")
    assert h.dead_until == 291 + 200  # capped at dead_backoff_max
    h.tick(491)
    revived = h.success(492, POLICY, 20)
    assert revived is not None and revived.before is HealthState.PROBING
    assert h.state is HealthState.SLOW_START and int(h.window) == 2 and h.backoff == 0


def test_a_success_between_failures_keeps_it_alive():
    h = DestinationHealth(POLICY, 20)
    for t in range(10):
        h.failure(t * 3, POLICY, 20, "x")
        h.failure(t * 3 + 1, POLICY, 20, "x")
        h.success(t * 3 + 2, POLICY, 20)
    assert h.state is not HealthState.DEAD


events = st.lists(st.tuples(st.sampled_from(["ok", "fail", "wait"]),
                            st.floats(0, 400, allow_nan=False)), max_size=60)


@given(events, st.integers(1, 50), st.integers(1, 60))
def test_invariants_over_any_event_sequence(seq, limit, initial):
    policy = DestinationPolicy(initial_concurrency=initial, dead_after=3, dead_backoff=10,
                               dead_backoff_max=100)
    h = DestinationHealth(policy, limit)
    now = 0.0
    for kind, dt in seq:
        now += dt
        if kind == "ok":
            h.success(now, policy, limit)
        elif kind == "fail":
            h.failure(now, policy, limit, "e")
        else:
            h.tick(now)
        assert 1 <= h.window <= limit
        assert h.backoff <= policy.dead_backoff_max
        allowed = h.allowed(now, limit, 10_000)
        assert 0 <= allowed <= limit
        if h.state is HealthState.DEAD:
            assert allowed == 0 and h.dead_until > now
        if h.state is HealthState.PROBING:
            assert allowed == 1


def test_domains_on_one_fixed_next_hop_share_a_destination_but_keep_their_own_jobs():
    from ferrymail.config import parse_running
    from ferrymail.delivery.scheduler import Destination, split_jobs
    from ferrymail.spool import Envelope, QueuedMessage, RecipientRecord, RecipientState

    cfg = parse_running("""
servers: [{id: in, transport: hop}]
routing: [{recipientdomain: "*.mx.test", transport: mx}]
transportgroups:
  - id: g
    transports:
      - {id: hop, connection: {server: 127.0.0.9, port: 2525}}
      - {id: mx}
""")
    rcpts = ("a@one.test", "b@two.test", "c@two.test", "d@x.mx.test", "e@y.mx.test")
    env = Envelope(sender="s@o.test", recipients=rcpts, client_ip="127.0.0.1", client_port=1,
                   helo="h", server_id="in", received_at=0.0)
    msg = QueuedMessage("0" * 16, env, tuple(
        RecipientRecord(r, RecipientState.QUEUED, 0, 0.0, "", None) for r in rcpts))
    jobs = split_jobs(msg, cfg, now=1.0)
    by_rcpts = {tuple(r.address for r in j.recipients): j.destination for j in jobs}
    hop = Destination("hop", "", "127.0.0.9:2525")
    assert by_rcpts == {
        ("a@one.test",): hop,  # one job per domain (the hook decides per domain) ...
        ("b@two.test", "c@two.test"): hop,  # ... on one shared queue for the next hop
        ("d@x.mx.test",): Destination("mx", "x.mx.test"),  # MX lookup: per domain
        ("e@y.mx.test",): Destination("mx", "y.mx.test"),
    }
    assert str(hop) == "hop/127.0.0.9:2525" and hop.name == "127.0.0.9:2525"
