"""Host metrics from worker metrics: merge Prometheus sample sets, sans-IO.

``ferrymail run --workers N`` runs N processes, each with its own prometheus-client registry.
The worker serving ``metrics.listen`` reads the others' text exposition (``GET /v1/metrics``
on their admin sockets, see `observe.hostmetrics`), parses it with prometheus-client's own
parser (``text_string_to_metric_families``) and merges the families here into one host view.

Shapes: a `Families` maps a family name (as the parser names it: counters without
``_total``) to a `Family`, whose ``samples`` map a `SampleKey` (sample name, sorted label
pairs) to a float.

How samples of the same name and labels combine (`rule_for`), decided per family:

- counters, histograms, summaries: **sum** (messages, attempts, seconds all add up);
- gauges: **sum** where they count things (queue sizes, open connections, pooled connections);
- ``ferrymail_queue_oldest_seconds``, ``ferrymail_queue_snapshot_age_seconds``: **max**
  (the oldest message on the host; the stalest snapshot);
- ``ferrymail_suspensions_active``: **max** (suspensions are shared by all workers: summing
  would count one suspension N times);
- ``ferrymail_cluster_state``, ``ferrymail_build_info`` and every ``*_created`` gauge:
  **max** (a state is 1 if any worker is in it; the latest creation time, i.e. the last
  restart a sum may have seen);
- ``ferrymail_proxy_up``: **min** (a proxy is up for the host only while no worker has
  marked it down);
- `PER_WORKER` families are not merged but labelled ``worker="K"`` (`with_worker_label`).

Every rule is commutative and associative, so the order in which workers answer does not
matter (tests/unit/test_metrics_aggregate.py checks this with hypothesis).

Restarts: a restarted worker's counters start again at 0, and a *sum* that drops is not
something ``rate()`` can undo (it would count the other workers' whole totals again as new).
`HostCounters` therefore carries a worker's last counter values across its restarts and
while it does not answer, so host counters do not go down when a worker restarts;
`HostCounters.to_json` lets the serving worker keep that state across its own restart
(observe/hostmetrics.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

SampleKey = tuple[str, tuple[tuple[str, str], ...]]

SUM, MAX, MIN = "sum", "max", "min"
RULES = {
    "ferrymail_queue_oldest_seconds": MAX,
    "ferrymail_queue_snapshot_age_seconds": MAX,
    "ferrymail_suspensions_active": MAX,
    "ferrymail_cluster_state": MAX,
    "ferrymail_build_info": MAX,
    "ferrymail_proxy_up": MIN,
}
CUMULATIVE_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
# Families kept apart per worker (label worker="K") rather than merged.
START_TIME = "ferrymail_worker_start_time_seconds"
PER_WORKER = frozenset({START_TIME})
WORKER_LABEL = "worker"


def rule_for(name: str, typ: str) -> str:
    """How two samples of family ``name`` (type ``typ``) with the same labels combine."""
    if name in RULES:
        return RULES[name]
    if typ in ("gauge", "untyped", "unknown") and name.endswith("_created"):
        return MAX
    if typ in ("info", "stateset"):
        return MAX
    return SUM


def _combine(rule: str, a: float, b: float) -> float:
    if rule == MAX:
        return max(a, b)
    if rule == MIN:
        return min(a, b)
    return a + b


@dataclass(frozen=True)
class Family:
    name: str
    type: str
    help: str
    samples: dict[SampleKey, float] = field(default_factory=dict, compare=True)


Families = dict[str, Family]


def parse(text: str) -> Families:
    """Prometheus text exposition -> `Families`; ValueError on text the parser refuses."""
    out: Families = {}
    for metric in text_string_to_metric_families(text):
        samples: dict[SampleKey, float] = {}
        for s in metric.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            samples[key] = samples.get(key, 0.0) + s.value  # repeated lines: kept additive
        fam = out.get(metric.name)
        if fam is not None:  # a family split in the text: join it
            samples = merge_samples(rule_for(metric.name, metric.type), fam.samples, samples)
        out[metric.name] = Family(metric.name, metric.type, metric.documentation, samples)
    return out


def merge_samples(rule: str, a: dict[SampleKey, float], b: dict[SampleKey, float]
                  ) -> dict[SampleKey, float]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _combine(rule, out[key], value) if key in out else value
    return out


def merge(*sets: Families) -> Families:
    """One host view from several workers' families (see the module docstring for the
    rules). Label sets are kept as they are; a family present in one set only is copied."""
    out: Families = {}
    for fams in sets:
        for name, fam in fams.items():
            have = out.get(name)
            if have is None:
                out[name] = fam
                continue
            # Workers run the same code, so types and help agree; if not, pick one
            # deterministically so that the merge stays commutative.
            typ = min(have.type, fam.type)
            out[name] = Family(name, typ, min(have.help, fam.help),
                               merge_samples(rule_for(name, typ), have.samples, fam.samples))
    return out


def with_worker_label(fams: Families, worker: int) -> Families:
    """``fams`` with ``worker="K"`` added to the samples of `PER_WORKER` families and every
    other family left as it is."""
    out = dict(fams)
    for name in PER_WORKER & fams.keys():
        fam = fams[name]
        out[name] = Family(name, fam.type, fam.help, {
            (sname, tuple(sorted((*labels, (WORKER_LABEL, str(worker)))))): value
            for (sname, labels), value in fam.samples.items()})
    return out


def cumulative(fams: Families) -> Families:
    """Only the families whose samples only ever grow (counters, histograms)."""
    return {n: f for n, f in fams.items() if f.type in CUMULATIVE_TYPES}


def start_time(fams: Families) -> float | None:
    fam = fams.get(START_TIME)
    if fam is None or not fam.samples:
        return None
    return max(fam.samples.values())


@dataclass
class HostCounters:
    """Keeps each worker's counters continuous across its restarts and silences.

    ``contribution(k, fams)`` is what worker ``k`` adds to the host view: ``fams`` (None if
    it did not answer) plus a carry of the counters it had reached before its last restart.
    A restart is seen as a new `START_TIME` value or any cumulative sample going down. A
    worker that does not answer contributes its last counters (not its gauges: its
    sessions and queue are unknown), so the host sum does not drop meanwhile."""

    last: dict[int, Families] = field(default_factory=dict)
    carry: dict[int, Families] = field(default_factory=dict)

    def contribution(self, worker: int, fams: Families | None) -> Families:
        carried = self.carry.get(worker, {})
        if fams is None:
            return merge(cumulative(self.last.get(worker, {})), carried)
        before = self.last.get(worker)
        if before is not None and _restarted(before, fams):
            carried = self.carry[worker] = merge(carried, cumulative(before))
        self.last[worker] = fams
        return merge(fams, carried)


    def to_json(self) -> dict[str, Any]:
        """The state as JSON-able data (`from_json` reads it back)."""
        return {"last": {str(k): _families_json(v) for k, v in self.last.items()},
                "carry": {str(k): _families_json(v) for k, v in self.carry.items()}}

    @classmethod
    def from_json(cls, doc: Any) -> HostCounters:
        """`to_json`'s data back; ValueError (or KeyError/TypeError) if it is not that."""
        return cls({int(k): _families_from_json(v) for k, v in doc["last"].items()},
                   {int(k): _families_from_json(v) for k, v in doc["carry"].items()})


def _families_json(fams: Families) -> list[Any]:
    return [[f.name, f.type, f.help, [[s, [list(kv) for kv in labels], v]
                                      for (s, labels), v in f.samples.items()]]
            for f in fams.values()]


def _families_from_json(doc: Any) -> Families:
    out: Families = {}
    for name, typ, help_text, samples in doc:
        out[str(name)] = Family(str(name), str(typ), str(help_text), {
            (str(s), tuple((str(k), str(v)) for k, v in labels)): float(value)
            for s, labels, value in samples})
    return out


def _restarted(before: Families, now: Families) -> bool:
    if start_time(before) != start_time(now):
        return True
    for name, fam in cumulative(before).items():
        new = now.get(name)
        if new is None:
            return True
        if any(key in new.samples and new.samples[key] < value
               for key, value in fam.samples.items()):
            return True
    return False


class _Static:
    def __init__(self, fams: Families) -> None:
        self.fams = fams

    def collect(self) -> Iterator[Metric]:
        for name in sorted(self.fams):
            fam = self.fams[name]
            metric = Metric(fam.name, fam.help, fam.type)
            for (sname, labels), value in fam.samples.items():  # buckets stay in order
                metric.add_sample(sname, dict(labels), value)
            yield metric


def render(fams: Families) -> bytes:
    """`Families` -> Prometheus text exposition (version 0.0.4), by prometheus-client."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static(fams))  # type: ignore[arg-type]
    return generate_latest(registry)


def gauge(name: str, help_text: str, values: Iterable[tuple[dict[str, str], float]]) -> Family:
    """A gauge family from (labels, value) pairs, e.g. ``ferrymail_worker_up``."""
    return Family(name, "gauge", help_text,
                  {(name, tuple(sorted(labels.items()))): value for labels, value in values})


__all__ = ["Families", "Family", "HostCounters", "cumulative", "gauge", "merge", "parse",
           "render", "rule_for", "with_worker_label"]
