"""Routing: transport choice, source/HELO/proxy precedence, family matching, health-aware RR."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.config import parse_running
from ferrymail.delivery.connect import ProxyRoute, Source
from ferrymail.delivery.errors import DeliveryError
from ferrymail.delivery.routing import (
    HookSource,
    SourceRotation,
    recipient_domain,
    sources_from_hook,
    transport_id_for,
    transport_sources,
)
from ferrymail.delivery.scheduler import Destination, split_jobs
from ferrymail.spool import Envelope, QueuedMessage, RecipientRecord, RecipientState

HOST = "mta.example.test"

CFG = parse_running("""
servers:
  - {id: in, transport: plain}
routing:
  - {recipientdomain: [special.test], transport: t-proxy}
addresses:
  - {id: own, address: 127.0.0.2, hostname: own.example.test,
     proxyprotocol: {server: 127.0.0.10, port: 2525, version: 2}}
  - {id: bare, address: 127.0.0.3, hostname: bare.example.test}
  - {id: nohelo, address: 127.0.0.4}
  - {id: six, address: "::1", hostname: six.example.test}
transportgroups:
  - id: grouped
    connection:
      proxyprotocol: {server: 127.0.0.20, port: 2526}
    transports:
      - id: t-group
        connection: {sourceip: {ipv4: [own, bare]}}
      - id: t-proxy
        connection:
          proxyprotocol: {server: 127.0.0.30, port: 2527}
          sourceip: {ipv4: [own, bare]}
      - id: t-noproxy
        connection:
          proxyprotocol: false
          sourceip: {ipv4: [own, bare]}
      - id: t-nosource
  - id: plain
    transports:
      - id: plain
      - id: direct
        connection: {sourceip: {ipv4: [bare, nohelo], ipv6: [six]}}
      - id: v4only
        connection: {sourceip: {ipv4: [bare]}}
      - id: nov6
        connection: {sourceip: {ipv6: false}}
      - id: weighted
        connection: {sourceip: {ipv4: [bare, bare, nohelo]}}
# With a pre-delivery hook (which may name sources per message) t-nosource passes the load
# check for proxied transports without a source address.
scripting: {hooks: {predelivery: "hooks/route.py"}}
""")


def by_id(plan_sources: tuple[Source, ...]) -> dict[str | None, Source]:
    return {s.address_id: s for s in plan_sources}


def test_address_proxy_wins_over_group_proxy() -> None:
    plan = transport_sources(CFG.transport("t-group"), HOST)
    s = by_id(plan.ipv4)
    assert s["own"].proxy == ProxyRoute("127.0.0.10", 2525, 2)
    assert s["bare"].proxy == ProxyRoute("127.0.0.20", 2526, 1)
    assert s["own"].helo == "own.example.test" and s["own"].address == "127.0.0.2"


def test_address_proxy_wins_over_transport_proxy_which_wins_over_group() -> None:
    s = by_id(transport_sources(CFG.transport("t-proxy"), HOST).ipv4)
    assert s["own"].proxy == ProxyRoute("127.0.0.10", 2525, 2)
    assert s["bare"].proxy == ProxyRoute("127.0.0.30", 2527, 1)


def test_transport_false_drops_group_proxy_but_not_address_proxy() -> None:
    s = by_id(transport_sources(CFG.transport("t-noproxy"), HOST).ipv4)
    assert s["own"].proxy == ProxyRoute("127.0.0.10", 2525, 2)
    assert s["bare"].proxy is None  # bound directly


def test_direct_sources_and_helo_fallback() -> None:
    plan = transport_sources(CFG.transport("direct"), HOST)
    s = by_id(plan.ipv4)
    assert all(src.proxy is None for src in plan.ipv4 + plan.ipv6)
    assert s["nohelo"].helo == HOST  # no address hostname: the instance's hostname
    assert [x.address for x in plan.ipv6] == ["::1"]
    assert plan.for_family(6) == plan.ipv6 and plan.for_family(4) == plan.ipv4


def test_no_sources_means_os_chosen_direct_for_both_families() -> None:
    plan = transport_sources(CFG.transport("plain"), HOST)
    assert plan.ipv4 == (Source(None, HOST),) and plan.ipv6 == (Source(None, HOST),)
    assert not plan.problems


def test_family_switched_off() -> None:
    plan = transport_sources(CFG.transport("nov6"), HOST)
    assert plan.ipv4 == (Source(None, HOST),) and plan.ipv6 == ()


def test_explicit_v4_sources_do_not_fall_back_to_os_choice_for_v6() -> None:
    plan = transport_sources(CFG.transport("v4only"), HOST)
    assert [s.address for s in plan.ipv4] == ["127.0.0.3"] and plan.ipv6 == ()


def test_proxy_without_source_is_a_config_problem() -> None:
    plan = transport_sources(CFG.transport("t-nosource"), HOST)
    assert plan.ipv4 == () and plan.ipv6 == ()
    assert "127.0.0.20:2526" in plan.problems[0] and "source" in plan.problems[0]


# -- hook overrides ----------------------------------------------------------------------------


def hook_plan(sources, **kw):
    kw.setdefault("proxy", None)
    kw.setdefault("no_proxy", False)
    return sources_from_hook(sources, transport=CFG.transport(kw.pop("transport", "t-proxy")),
                             cfg=CFG, hostname=HOST, **kw)


def test_hook_sources_by_ip_take_the_configured_address_proxy_and_helo() -> None:
    plan = hook_plan([HookSource("127.0.0.2"), HookSource("127.0.0.3", "custom.example.test")])
    own, bare = plan.ipv4
    assert own.address_id == "own" and own.proxy == ProxyRoute("127.0.0.10", 2525, 2)
    assert own.helo == "own.example.test"
    assert bare.helo == "custom.example.test" and bare.proxy == ProxyRoute("127.0.0.30", 2527)


def test_hook_unknown_ip_uses_transport_proxy_and_by_id_works() -> None:
    plan = hook_plan([HookSource("127.0.0.99"), HookSource("nohelo")])
    unknown, named = plan.ipv4
    assert unknown.address_id is None and unknown.proxy == ProxyRoute("127.0.0.30", 2527)
    assert unknown.helo == HOST
    assert named.address == "127.0.0.4" and named.address_id == "nohelo"


def test_hook_proxy_overrides_all_and_no_proxy_forces_direct() -> None:
    p = ProxyRoute("127.0.0.50", 2600, 2)
    plan = hook_plan([HookSource("127.0.0.2"), HookSource("127.0.0.3")], proxy=p)
    assert {s.proxy for s in plan.ipv4} == {p}
    plan = hook_plan(None, no_proxy=True)
    assert {s.proxy for s in plan.ipv4} == {None}
    assert {s.address for s in plan.ipv4} == {"127.0.0.2", "127.0.0.3"}


def test_hook_no_proxy_on_sourceless_proxied_transport_allows_os_choice() -> None:
    plan = hook_plan(None, no_proxy=True, transport="t-nosource")
    assert plan.ipv4 == (Source(None, HOST),) and not plan.problems
    plan = hook_plan(None, proxy=ProxyRoute("127.0.0.50", 2600), transport="plain")
    assert plan.ipv4 == () and "127.0.0.50:2600" in plan.problems[0]


def test_hook_family_split_and_bad_entry() -> None:
    plan = hook_plan([HookSource("::1"), HookSource("127.0.0.3")], no_proxy=True)
    assert [s.address for s in plan.ipv6] == ["::1"]
    assert [s.address for s in plan.ipv4] == ["127.0.0.3"]
    with pytest.raises(DeliveryError) as exc:
        hook_plan([HookSource("not-an-address")])
    assert exc.value.kind == "config" and "not-an-address" in str(exc.value)


# -- health-aware round robin ------------------------------------------------------------------

P1 = ProxyRoute("127.0.0.10", 2525)
P2 = ProxyRoute("127.0.0.11", 2525)
S1 = Source("127.0.0.2", "a.test", "a", P1)
S2 = Source("127.0.0.3", "b.test", "b", P2)
S3 = Source("127.0.0.4", "c.test", "c", None)


def test_round_robin_rotates_start() -> None:
    rr = SourceRotation()
    firsts = [rr.order("k", [S1, S2, S3], 0.0)[0] for _ in range(6)]
    assert firsts == [S1, S2, S3, S1, S2, S3]
    assert rr.order("k", [S1, S2, S3], 0.0) == [S1, S2, S3]  # whole list, rotated
    assert rr.order("other", [S1, S2], 0.0)[0] == S1  # keys rotate independently


def _down(rr: SourceRotation, src: Source, now: float) -> None:
    rr.health.failure(src, "connect", "refused", now)


def test_round_robin_skips_downed_proxy_while_another_is_up() -> None:
    rr = SourceRotation()
    _down(rr, S1, now=100.0)
    for _ in range(4):
        assert rr.order("k", [S1, S2], 110.0) == [S2]
    assert S1 in rr.order("k", [S1, S2], 131.0)  # suspension of 30 s over: S1 may probe


def test_all_down_still_tries_everything() -> None:
    rr = SourceRotation()
    _down(rr, S1, 0.0)
    _down(rr, S2, 0.0)
    assert set(rr.order("k", [S1, S2], 1.0)) == {S1, S2}


def test_direct_sources_are_always_up_and_duplicates_weight() -> None:
    rr = SourceRotation()
    _down(rr, S1, 0.0)
    assert rr.order("k", [S1, S3], 1.0) == [S3]
    weighted = [S3, S3, S2]
    firsts = [rr.order("w", weighted, 1.0)[0] for _ in range(6)]
    assert firsts.count(S3) == 4 and firsts.count(S2) == 2
    assert rr.order("w", weighted, 1.0) in ([S3, S2], [S2, S3])  # never the same twice


def test_fixed_order_when_not_rotating() -> None:
    rr = SourceRotation()
    for _ in range(3):
        assert rr.order("k", [S1, S2, S3], 0.0, rotate=False) == [S1, S2, S3]


def test_per_message_split_is_even_with_two_sources() -> None:
    rr = SourceRotation()
    a = Source("127.0.0.2", "a.test", "a", P1)
    b = Source("127.0.0.3", "b.test", "b", P1)
    firsts = [rr.order("k", [a, b], 0.0)[0] for _ in range(1000)]
    assert firsts.count(a) == 500 and firsts.count(b) == 500


def test_suspended_pair_is_skipped_but_its_proxy_keeps_sending() -> None:
    rr = SourceRotation()
    a = Source("127.0.0.2", "a.test", "a", P1)
    b = Source("127.0.0.3", "b.test", "b", P1)
    for _ in range(2):  # bind threshold: 2 in 60 s
        rr.health.failure(a, "bind", "EOF before banner", 5.0)
    assert {rr.order("k", [a, b], 6.0)[0] for _ in range(10)} == {b}
    assert rr.health.state(str(P1), None, 6.0) == "up"


# -- transport choice and jobs -----------------------------------------------------------------


def envelope(transport: str | None = None, server: str = "in") -> Envelope:
    return Envelope(sender="s@x.test", recipients=("a@Special.TEST", "b@other.test"),
                    client_ip="127.0.0.1", client_port=1, helo="h", server_id=server,
                    transport=transport, received_at=0.0)


def record(address: str, transport: str | None = None, state=RecipientState.QUEUED,
           next_attempt: float = 0.0) -> RecipientRecord:
    return RecipientRecord(address, state, 0, next_attempt, "", transport)


def test_recipient_domain() -> None:
    assert recipient_domain("User@Example.COM.") == "example.com"
    assert recipient_domain("postmaster") == ""
    assert recipient_domain('"a@b"@c.test') == "c.test"


def test_transport_precedence_record_then_envelope_then_routing() -> None:
    env = envelope()
    assert transport_id_for(record("a@special.test"), env, CFG) == "t-proxy"
    assert transport_id_for(record("b@other.test"), env, CFG) == "plain"
    assert transport_id_for(record("b@other.test"), envelope("direct"), CFG) == "direct"
    assert transport_id_for(record("b@other.test", "v4only"), envelope("direct"), CFG) == "v4only"
    with pytest.raises(KeyError):
        transport_id_for(record("b@other.test"), envelope(server="gone"), CFG)


def test_split_jobs_per_destination_only_due_pending() -> None:
    recs = (
        record("a@special.test"),
        record("b@other.test"),
        record("c@other.test"),
        record("d@other.test", next_attempt=50.0),  # not due yet
        record("e@other.test", state=RecipientState.DELIVERED),
        record("f@other.test", state=RecipientState.DEFERRED),
    )
    msg = QueuedMessage("0000000000000001", envelope(), recs)
    jobs = {j.destination: [r.address for r in j.recipients] for j in split_jobs(msg, CFG, 10.0)}
    assert jobs == {
        Destination("t-proxy", "special.test"): ["a@special.test"],
        Destination("plain", "other.test"): ["b@other.test", "c@other.test", "f@other.test"],
    }
    gone = QueuedMessage("0000000000000002", envelope(server="gone"), recs[1:2])
    (job,) = split_jobs(gone, CFG, 10.0)
    assert job.destination == Destination("", "other.test")  # the engine reports it


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=5), st.sets(st.sampled_from(["a", "b", "c", "d"])))
def test_property_weighted_choice_per_message(names: list[str], turns: int,
                                              down: set[str]) -> None:
    """Over whole turns every usable entry is chosen exactly as often as it is listed; a
    source whose proxy is suspended is never chosen while another is usable."""
    proxies = {n: ProxyRoute(f"127.0.0.{10 + i}", 2525) for i, n in enumerate("abcd")}
    srcs = {n: Source(f"127.0.1.{i}", f"{n}.test", n, proxies[n]) for i, n in enumerate("abcd")}
    rr = SourceRotation()
    for n in down:
        rr.health.failure(srcs[n], "connect", "refused", 0.0)
    listed = [srcs[n] for n in names]
    usable = [s for s in listed if s.address_id not in down]
    picks = [rr.order("k", listed, 1.0)[0] for _ in range(turns * len(listed))]
    if not usable:
        assert set(picks) <= set(listed)  # all down: still tried
        return
    assert all(p.address_id not in down for p in picks)
    if len(usable) == len(listed):
        for s in set(listed):
            assert picks.count(s) == turns * listed.count(s)
