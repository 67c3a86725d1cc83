"""The merge of worker metrics into host metrics (observe/aggregate.py): rules per family,
label sets kept, order of workers irrelevant, counters continued across restarts."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ferrymail.observe import aggregate
from ferrymail.observe.aggregate import Families, Family, HostCounters, merge

# Families named like ferrymail's, with each rule represented.
SHAPES = [
    ("ferrymail_messages_received", "counter", "ferrymail_messages_received_total"),
    ("ferrymail_delivery_seconds", "histogram", "ferrymail_delivery_seconds_bucket"),
    ("ferrymail_queue_messages", "gauge", "ferrymail_queue_messages"),
    ("ferrymail_queue_oldest_seconds", "gauge", "ferrymail_queue_oldest_seconds"),
    ("ferrymail_proxy_up", "gauge", "ferrymail_proxy_up"),
    ("ferrymail_cluster_state", "gauge", "ferrymail_cluster_state"),
    ("ferrymail_messages_received_created", "gauge", "ferrymail_messages_received_created"),
]
label_sets = st.lists(st.tuples(st.sampled_from(["server", "state", "le"]),
                                st.sampled_from(["a", "b", "+Inf"])),
                      max_size=2, unique_by=lambda kv: kv[0]).map(lambda kv: tuple(sorted(kv)))
# integers: float addition of arbitrary reals is not associative, counts are whole numbers
values = st.integers(min_value=0, max_value=10**9).map(float)


@st.composite
def families(draw: st.DrawFn) -> Families:
    out: Families = {}
    for name, typ, sample in draw(st.lists(st.sampled_from(SHAPES), unique=True, max_size=5)):
        samples = draw(st.dictionaries(label_sets, values, max_size=4))
        out[name] = Family(name, typ, "help", {(sample, k): v for k, v in samples.items()})
    return out


@settings(max_examples=200, deadline=None)
@given(families(), families(), families())
def test_merge_is_commutative_and_associative(a: Families, b: Families, c: Families):
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c)) == merge(a, b, c)
    assert merge(a) == a


@settings(max_examples=200, deadline=None)
@given(st.lists(families(), min_size=1, max_size=4))
def test_merge_keeps_every_label_set_and_applies_the_family_rule(workers: list[Families]):
    host = merge(*workers)
    for name, typ, _ in SHAPES:
        present = [w[name] for w in workers if name in w]
        if not present:
            assert name not in host
            continue
        keys = {k for fam in present for k in fam.samples}
        assert set(host[name].samples) == keys  # no label set lost, none invented
        for key in keys:
            seen = [fam.samples[key] for fam in present if key in fam.samples]
            rule = aggregate.rule_for(name, typ)
            want = {"sum": sum(seen), "max": max(seen), "min": min(seen)}[rule]
            assert host[name].samples[key] == want


def test_rules_per_family():
    rule = aggregate.rule_for
    assert rule("ferrymail_messages_received", "counter") == "sum"
    assert rule("ferrymail_delivery_seconds", "histogram") == "sum"
    assert rule("ferrymail_queue_messages", "gauge") == "sum"
    assert rule("ferrymail_connections_open", "gauge") == "sum"
    assert rule("ferrymail_queue_oldest_seconds", "gauge") == "max"
    assert rule("ferrymail_suspensions_active", "gauge") == "max"
    assert rule("ferrymail_cluster_state", "gauge") == "max"
    assert rule("ferrymail_build_info", "gauge") == "max"
    assert rule("ferrymail_dsn_created", "gauge") == "max"
    assert rule("ferrymail_proxy_up", "gauge") == "min"


def _worker_text(received: int, seconds: list[float], queued: int, oldest: float,
                 started: float) -> str:
    reg = CollectorRegistry()
    c = Counter("ferrymail_messages_received_total", "Messages", ["server"], registry=reg)
    c.labels("in").inc(received)
    h = Histogram("ferrymail_delivery_seconds", "Attempts", ["transport"],
                  buckets=(0.1, 1.0), registry=reg)
    for s in seconds:
        h.labels("mx").observe(s)
    g = Gauge("ferrymail_queue_messages", "Queue", ["state"], registry=reg)
    g.labels("queued").set(queued)
    Gauge("ferrymail_queue_oldest_seconds", "Oldest", ["state"],
          registry=reg).labels("queued").set(oldest)
    Gauge(aggregate.START_TIME, "Start", registry=reg).set(started)
    return generate_latest(reg).decode()


def _value(text: str, name: str, **labels: str) -> float:
    fams = aggregate.parse(text)
    want = set(labels.items())
    return sum(v for fam in fams.values() for (n, lab), v in fam.samples.items()
               if n == name and want <= set(lab))


def test_prometheus_text_round_trip_and_host_values():
    w0 = aggregate.parse(_worker_text(3, [0.05, 0.5], queued=4, oldest=10, started=100))
    w1 = aggregate.parse(_worker_text(5, [2.0], queued=1, oldest=30, started=200))
    host = merge(aggregate.with_worker_label(w0, 0), aggregate.with_worker_label(w1, 1))
    text = aggregate.render(host).decode()
    assert aggregate.parse(text) == host  # what prometheus-client renders, it parses back
    assert _value(text, "ferrymail_messages_received_total", server="in") == 8
    assert _value(text, "ferrymail_delivery_seconds_count", transport="mx") == 3
    assert _value(text, "ferrymail_delivery_seconds_bucket", le="0.1") == 1
    assert _value(text, "ferrymail_delivery_seconds_bucket", le="1.0") == 2
    assert _value(text, "ferrymail_delivery_seconds_bucket", le="+Inf") == 3
    assert math.isclose(_value(text, "ferrymail_delivery_seconds_sum"), 2.55)
    assert _value(text, "ferrymail_queue_messages", state="queued") == 5
    assert _value(text, "ferrymail_queue_oldest_seconds", state="queued") == 30
    # per-worker series keep their worker apart
    assert _value(text, aggregate.START_TIME, worker="0") == 100
    assert _value(text, aggregate.START_TIME, worker="1") == 200
    lines = [ln for ln in text.splitlines() if ln.startswith("ferrymail_delivery_seconds_bucket")]
    assert [ln.split('le="')[1].split('"')[0] for ln in lines] == ["0.1", "1.0", "+Inf"]


def test_counters_continue_across_a_restart_and_a_silence():
    counters = HostCounters()

    def received(fams: Families) -> float:
        return sum(fams["ferrymail_messages_received"].samples.values())

    def worker(n: int, started: float) -> Families:
        return aggregate.parse(_worker_text(n, [], queued=n, oldest=0, started=started))

    assert received(counters.contribution(1, worker(7, started=100))) == 7
    assert received(counters.contribution(1, worker(9, started=100))) == 9
    silent = counters.contribution(1, None)  # not answering: last counters, no gauges
    assert received(silent) == 9 and "ferrymail_queue_messages" not in silent
    # restarted (new start time): its own count starts again, the host's continues
    after = counters.contribution(1, worker(2, started=300))
    assert received(after) == 11
    assert sum(after["ferrymail_queue_messages"].samples.values()) == 2  # gauges: as now
    assert received(counters.contribution(1, worker(4, started=300))) == 13
    # a counter going down is a restart too, even if the start time did not change
    assert received(counters.contribution(1, worker(1, started=300))) == 14


def test_unparseable_text_is_an_error():
    try:
        aggregate.parse("ferrymail_x{a=\"1\" 2\n")
    except ValueError:
        return
    raise AssertionError("bad exposition text was accepted")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), families()), max_size=6))
def test_counter_state_survives_a_json_round_trip(answers: list[tuple[int, Families]]):
    import json

    counters = HostCounters()
    for worker, fams in answers:
        counters.contribution(worker, fams)
    again = HostCounters.from_json(json.loads(json.dumps(counters.to_json())))
    assert again == counters
    for worker in range(4):  # and it goes on exactly as the original would
        assert again.contribution(worker, None) == counters.contribution(worker, None)
