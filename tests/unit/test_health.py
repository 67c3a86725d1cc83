"""HealthBook: failure classes, thresholds, suspension back-off, probes, remote entries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.config.proxyha import ProxyHealthPolicy, Threshold
from ferrymail.delivery.connect import ProxyRoute, Source
from ferrymail.delivery.errors import DeliveryError, ProxyConnectError
from ferrymail.delivery.health import HealthBook, HealthEntry, classify

P = ProxyRoute("127.0.0.10", 2525)
A = Source("127.0.0.2", "a.test", "a", P)
B = Source("127.0.0.3", "b.test", "b", P)
C = Source("127.0.0.4", "c.test", "c", P)


def book(**policy: object) -> tuple[HealthBook, list[HealthEntry]]:
    seen: list[HealthEntry] = []
    return HealthBook(ProxyHealthPolicy(**policy), on_transition=seen.append,
                      origin="me"), seen


def test_classes() -> None:
    assert classify(ProxyConnectError("cannot connect to proxy")) == "connect"
    assert classify(DeliveryError("proxy", "EOF before banner via proxy")) == "bind"
    assert classify(DeliveryError("network", "reset")) is None


def test_connect_failure_suspends_the_proxy_at_once_and_all_its_sources() -> None:
    h, seen = book()
    h.failure(A, "connect", "refused", 10.0)
    assert [(e.proxy, e.source, e.state, e.failure_class) for e in seen] == [
        ("127.0.0.10:2525", None, "suspended", "connect")]
    assert not h.usable(A, 11.0) and not h.usable(B, 11.0)
    assert seen[0].until == 40.0 and seen[0].backoff == 30.0


def test_bind_failures_count_against_the_pair_only() -> None:
    h, seen = book(bind=Threshold(failures=2, window=10.0))
    h.failure(A, "bind", "EOF", 0.0)
    assert h.usable(A, 1.0) and not seen  # below the threshold
    h.failure(A, "bind", "EOF", 20.0)  # the first fell out of the window
    assert h.usable(A, 21.0) and not seen
    h.failure(A, "bind", "EOF", 25.0)
    assert [(e.source, e.state) for e in seen] == [("127.0.0.2", "suspended")]
    assert not h.usable(A, 26.0) and h.usable(B, 26.0)
    assert h.state(str(P), None, 26.0) == "up"


def test_bind_failures_of_several_sources_suspend_the_proxy() -> None:
    h, seen = book(bind=Threshold(failures=5, window=10.0), spread=3)
    h.failure(A, "bind", "EOF", 0.0)
    h.failure(B, "bind", "EOF", 1.0)
    assert h.state(str(P), None, 2.0) == "up"
    h.failure(C, "bind", "EOF", 2.0)
    assert h.state(str(P), None, 3.0) == "suspended"
    assert seen[-1].source is None and seen[-1].failure_class == "bind"
    assert "3 sources failed" in seen[-1].reason


def test_probe_lifts_or_doubles() -> None:
    h, seen = book(suspend=10.0, suspend_max=25.0)
    h.failure(A, "connect", "refused", 0.0)
    assert h.state(str(P), None, 10.0) == "probing"
    assert h.usable(A, 10.0, claim=True)  # this use is the probe
    assert not h.usable(B, 10.5)  # one probe at a time
    h.failure(A, "connect", "refused", 11.0)  # the probe failed: 20 s now
    assert seen[-1].backoff == 20.0 and seen[-1].until == 31.0
    h.usable(A, 31.0, claim=True)
    h.failure(A, "connect", "refused", 31.0)
    assert seen[-1].backoff == 25.0  # capped
    h.usable(A, 56.0, claim=True)
    h.success(A, 56.0)
    assert seen[-1].state == "up" and h.usable(B, 56.0)
    h.failure(A, "connect", "refused", 57.0)
    assert seen[-1].backoff == 10.0  # back to the first suspension after a success


def test_concurrent_failures_do_not_lengthen_a_suspension() -> None:
    h, seen = book()
    h.failure(A, "connect", "refused", 0.0)
    h.failure(B, "connect", "refused", 0.1)
    assert len(seen) == 1 and seen[0].until == 30.0


def test_active_check_lifts_connect_suspension_not_bind() -> None:
    h, seen = book(bind=Threshold(failures=1, window=10.0), spread=2)
    h.check_result(P, False, "refused", 0.0)
    assert seen[-1].failure_class == "check" and not h.usable(A, 1.0)
    h.check_result(P, True, "", 2.0)
    assert seen[-1].state == "up" and h.usable(A, 2.0)
    h.failure(A, "bind", "EOF", 3.0)
    h.failure(B, "bind", "EOF", 3.0)
    assert h.state(str(P), None, 3.0) == "suspended"
    h.check_result(P, True, "", 4.0)  # a TCP connect says nothing about binding
    assert h.state(str(P), None, 4.0) == "suspended"
    h.probe_result(A, True, "", 5.0)
    assert h.state(str(P), "127.0.0.2", 5.0) == "up"


def test_direct_sources_are_always_usable() -> None:
    h, _ = book()
    direct = Source("127.0.0.2", "a.test")
    h.failure(direct, "connect", "x", 0.0)
    assert h.usable(direct, 0.0)


def test_remote_entries_apply_and_our_own_are_ignored() -> None:
    h, seen = book()
    other = HealthEntry(str(P), None, "suspended", "connect", "refused", since=5.0, until=35.0,
                        last_failure=5.0, backoff=30.0, origin="other:1")
    assert h.apply(other)
    assert not h.usable(A, 6.0) and not seen  # not re-announced as ours
    assert not h.apply(HealthEntry(str(P), None, "up", since=1.0, origin="other:1"))  # older
    assert h.apply(HealthEntry(str(P), None, "up", since=7.0, origin="other:2"))
    assert h.usable(A, 7.0)
    assert not h.apply(HealthEntry(str(P), None, "suspended", since=8.0, until=9.0,
                                   origin="me"))


def test_entry_json_round_trip_and_garbage() -> None:
    e = HealthEntry(str(P), "127.0.0.2", "suspended", "bind", "EOF", 1.0, 31.0, 1.0, 30.0, "x")
    assert HealthEntry.from_json(e.to_json()) == e
    for bad in (b"nope", b"{}", b'{"state": "up"}', b'{"state": "odd", "proxy": "p"}'):
        with pytest.raises(ValueError):
            HealthEntry.from_json(bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "C"]),
                          st.sampled_from(["connect", "bind", "check", "ok", "probe"]),
                          st.floats(min_value=0, max_value=50)), max_size=60))
def test_property_suspensions_are_bounded_and_explained(events: list) -> None:
    h, seen = book(suspend=5.0, suspend_max=40.0)
    srcs = {"A": A, "B": B, "C": C}
    now = 0.0
    for name, what, dt in events:
        now += dt
        src = srcs[name]
        if what == "ok":
            h.success(src, now)
        elif what == "probe":
            h.usable(src, now, claim=True)
        elif what == "check":
            h.check_result(P, False, "refused", now)
        else:
            h.failure(src, what, "x", now)
    for e in seen:
        if e.state == "suspended":
            assert 5.0 <= e.backoff <= 40.0 and e.until == pytest.approx(e.since + e.backoff)
            assert e.failure_class in ("connect", "bind", "check") and e.reason
        assert e.origin == "me"
    for e in h.entries(now):
        assert e.state in ("up", "suspended", "probing")


def test_probe_success_lifts_the_proxy_too() -> None:
    h, seen = book(bind=Threshold(failures=1, window=10.0), spread=2)
    h.failure(A, "bind", "EOF", 0.0)
    h.failure(B, "bind", "EOF", 0.0)
    assert h.state(str(P), None, 1.0) == "suspended"
    assert h.usable(A, 31.0, claim=True)  # proxy and pair probing: this is the probe
    h.probe_result(A, True, "", 31.0)
    assert h.state(str(P), None, 31.0) == "up" and h.state(str(P), A.address, 31.0) == "up"
    assert h.state(str(P), B.address, 31.0) == "probing"  # B still has to show it works


def test_proxy_level_views_for_metrics() -> None:
    h, _ = book()
    v6 = ProxyRoute("::1", 2526)
    h.failure(Source("::1", "x.test", None, v6), "connect", "refused", 0.0)
    for _ in range(2):
        h.failure(A, "bind", "EOF", 0.0)  # a pair only: the proxy stays up
    assert h.is_up(P, 1.0) and h.is_up(None, 1.0) and not h.is_up(v6, 1.0)
    assert h.down(10.0) == [("::1", 2526, 20.0)]
    assert h.down(31.0) == [] and h.is_up(v6, 31.0)  # ran out: probing, usable again


def test_proxy_failures_say_nothing_about_the_destination() -> None:
    from ferrymail.delivery.engine import Outcome, Route, destination_feedback

    proxied = Outcome(error=DeliveryError("proxy", "EOF before banner via proxy"),
                      route=Route(source=A))
    cut = Outcome(error=DeliveryError("network", "connection closed"), route=Route(source=A))
    assert destination_feedback(proxied)[0] is False  # without the proxy tier's view
    at_fault = {id(proxied)}
    assert destination_feedback(proxied, lambda o: id(o) in at_fault) == (None, "")
    assert destination_feedback(cut, lambda o: id(o) in at_fault)[0] is False


def test_pairs_cut_by_a_dying_proxy_come_back_with_it() -> None:
    h, seen = book(bind=Threshold(failures=1, window=60.0), spread=3)
    h.failure(C, "bind", "EOF", 1.0)  # long before the proxy died: stays suspended
    h.failure(A, "bind", "EOF", 10.0)  # a session cut as the proxy died
    h.check_result(P, False, "refused", 11.0)
    h.failure(B, "bind", "EOF", 11.5)  # while the proxy is down: not the pair's fault
    assert h.state(str(P), B.address, 12.0) == "up"
    h.check_result(P, True, "", 13.0)
    assert h.state(str(P), None, 13.0) == "up" and h.state(str(P), A.address, 13.0) == "up"
    assert h.state(str(P), C.address, 13.0) == "suspended"
    assert "its proxy is back" in seen[-1].reason
