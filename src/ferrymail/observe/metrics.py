"""Prometheus metrics (``prometheus-client``): counters at the existing log points, live
gauges read at scrape time, and the ``metrics.listen`` HTTP listener (``/metrics``,
``/healthy``, ``/ready``).

Names (all ``ferrymail_`` prefixed; the full list with meanings is in docs/operations.md):

- ``messages_received_total{server}``; ``spool_commit_seconds`` (store latency histogram)
- ``delivery_attempts_total{transport,result}``; ``delivery_seconds{transport}`` (histogram)
- ``delivery_recipients_total{transport,source,proxy,result,kind}``: one per recipient and
  attempt; result ``delivered|deferred|failed|deleted``, kind the failure's class (``smtp``,
  ``network``, ``dns``, ``proxy``, ``tls``, ``config``, ``protocol``, ``hook``, ``none``)
- ``dsn_total{action}``; ``proxy_header_errors_total{server,kind}``
- ``queue_messages{state}``, ``queue_recipients{state}``, ``queue_oldest_seconds{state}``
  (states queued, deferred, held, in-flight; refreshed from the spool every QUEUE_REFRESH s)
- ``connections_open{direction,server}``; ``outbound_connections_open{source,proxy}``;
  ``outbound_pooled_connections``; ``outbound_connections_opened_total{source,proxy}``
- ``proxy_up{proxy}`` (1 up, 0 marked down by passive health); ``build_info{version}``
- ``policy_waits_total{kind}``: delivery jobs that waited for a shaping slot (in memory or
  parked in the spool), by the kind of the last refusal: ``concurrency``, ``rate``,
  ``connectinterval``, ``suspension``, ``closed`` (cluster fallback ``closed``), ``other``
- ``suspensions_active``: suspensions in force now (manual and from replies)
- ``cluster_state{state}`` (1 for the current one of ``shared``, ``split``, ``local``,
  ``closed``; all 0 without a ``cluster`` section) and ``cluster_transitions_total{state}``
- ``worker_start_time_seconds``: when this process started serving (with ``--workers N``:
  one per worker, ``{worker}``; a change is a restart); with N workers also
  ``worker_up{worker}`` and ``worker_scrape_failures_total{worker}`` (observe/hostmetrics.py)

Label values are bounded: servers, transports, sources and proxies come from the config;
results and kinds are fixed sets; domains are never labels.

With ``ferrymail run --workers N`` worker 0 serves the whole host at ``metrics.listen``
(observe/hostmetrics.py merges the other workers' samples, read from ``GET /v1/metrics`` on
their admin sockets); the other workers bind no metrics port unless
``metrics.worker_listen`` is set.

With ``metrics.listen: false`` nothing is counted (the received and delivery counters are
skipped, so the listener's absence costs nothing; ``ferrymail top`` then shows zeros for
rates). A busy ``metrics.listen`` port never stops the daemon: it is logged
(``metrics.unavailable``, warning) and the daemon runs without the listener (still counting).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from ferrymail import __version__
from ferrymail.admin.http import HTTPServer, Request, Response, RouteTable
from ferrymail.config.operations import parse_listen
from ferrymail.observe.hostmetrics import HostMetrics, worker_peers
from ferrymail.observe.log import log_event
from ferrymail.smtp.client import LIVE_CLIENTS

if TYPE_CHECKING:
    from ferrymail.app import App

QUEUE_REFRESH = 5.0
HOST_STATE_FILE = "metrics-host.json"  # worker 0's carry of the host counters
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REGISTRY = CollectorRegistry(auto_describe=True)

RECEIVED = Counter("ferrymail_messages_received_total", "Messages stored by inbound SMTP",
                   ["server"], registry=REGISTRY)
SPOOL_COMMIT = Histogram("ferrymail_spool_commit_seconds",
                         "Time from store() to the message being durable (group commit)",
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                         registry=REGISTRY)
ATTEMPTS = Counter("ferrymail_delivery_attempts_total", "Delivery attempts (one per job)",
                   ["transport", "result"], registry=REGISTRY)
DELIVERY_SECONDS = Histogram("ferrymail_delivery_seconds", "Duration of one delivery attempt",
                             ["transport"],
                             buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120),
                             registry=REGISTRY)
RECIPIENTS = Counter("ferrymail_delivery_recipients_total",
                     "Recipient results of delivery attempts",
                     ["transport", "source", "proxy", "result", "kind"], registry=REGISTRY)
DSN = Counter("ferrymail_dsn_total", "Delivery status notifications queued", ["action"],
              registry=REGISTRY)
POLICY_WAIT_KINDS = ("concurrency", "rate", "connectinterval", "suspension", "closed", "other")
POLICY_WAITS = Counter("ferrymail_policy_waits_total",
                       "Delivery jobs that waited for a shaping slot, by refusal kind",
                       ["kind"], registry=REGISTRY)
CLUSTER_STATES = ("shared", "split", "local", "closed")
CLUSTER_TRANSITIONS = Counter("ferrymail_cluster_transitions_total",
                              "Changes of the cluster state, by the state entered", ["state"],
                              registry=REGISTRY)
for _kind in POLICY_WAIT_KINDS:  # exposed at 0 from the start, so rate() sees the first one
    POLICY_WAITS.labels(_kind)
for _state in CLUSTER_STATES:
    CLUSTER_TRANSITIONS.labels(_state)
OUTBOUND_CONNECTIONS = Counter("ferrymail_outbound_connections_opened_total",
                               "Outbound SMTP connections opened (sessions; a reuse is not one)",
                               ["source", "proxy"], registry=REGISTRY)
PROXY_HEADER_ERRORS = Counter("ferrymail_proxy_header_errors_total",
                              "Inbound connections refused over their PROXY header",
                              ["server", "kind"], registry=REGISTRY)


# -- hooks called at the log points --------------------------------------------------------------


RECENT_ERRORS: deque[dict[str, Any]] = deque(maxlen=200)  # for `ferrymail top` (/v1/stats)
ENABLED = True  # False (``metrics.listen: false``): delivery counters are not kept


def set_enabled(flag: bool) -> None:
    global ENABLED
    ENABLED = flag


def outbound_connection_opened(source: str, proxy: str) -> None:
    """A new outbound SMTP session stands (labels as ``outbound_connections_open``)."""
    if ENABLED:
        OUTBOUND_CONNECTIONS.labels(source, proxy).inc()


def delivery_attempt(transport: str, source: str, proxy: str, result: str, kind: str,
                     recipients: list[str], seconds: float, error: str | None = None) -> None:
    """One attempt ended; ``recipients`` holds each recipient's result (``delivered``,
    ``deferred``, ``failed`` or ``deleted``); ``error`` the reply or error of a failure."""
    if result != "delivered" and error:
        RECENT_ERRORS.append({"at": time.time(), "transport": transport, "source": source,
                              "proxy": proxy, "kind": kind, "result": result,
                              "error": error[:300]})
    if not ENABLED:
        return
    ATTEMPTS.labels(transport, result).inc()
    DELIVERY_SECONDS.labels(transport).observe(seconds)
    for rcpt_result in recipients:
        RECIPIENTS.labels(transport, source, proxy, rcpt_result,
                          "none" if rcpt_result == "delivered" else kind).inc()


def policy_wait(kind: str) -> None:
    """A job waited for a shaping slot; ``kind`` a `Denied` kind (``suspended`` is counted as
    ``suspension``; kinds outside POLICY_WAIT_KINDS as ``other``, so labels stay bounded)."""
    if not ENABLED:
        return
    label = "suspension" if kind == "suspended" else kind
    POLICY_WAITS.labels(label if label in POLICY_WAIT_KINDS else "other").inc()


def cluster_transition(state: str) -> None:
    """The cluster entered ``state`` (one of CLUSTER_STATES); counted even without a
    listener, as transitions are rare."""
    CLUSTER_TRANSITIONS.labels(state if state in CLUSTER_STATES else "local").inc()


class CountingSpool:
    """A spool whose ``store`` counts received messages and times the commit."""

    def __init__(self, spool: Any) -> None:
        self._spool = spool

    async def store(self, envelope: Any, data: Any, queue_id: str | None = None) -> str:
        started = time.perf_counter()
        qid = await self._spool.store(envelope, data, queue_id)
        SPOOL_COMMIT.observe(time.perf_counter() - started)
        RECEIVED.labels(envelope.server_id).inc()
        return qid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spool, name)


# -- live values, read at scrape time ------------------------------------------------------------


class QueueSnapshot:
    """Counts per state, refreshed from the spool in the background (a full scan of the
    recipients table is too costly to run on every scrape of a large queue)."""

    def __init__(self) -> None:
        self.at = 0.0
        self.rows: dict[str, tuple[int, int, float | None]] = {}  # state -> msgs, rcpts, oldest

    def update(self, rows: dict[str, tuple[int, int, float | None]]) -> None:
        self.rows = rows
        self.at = time.time()


class _LiveCollector(Collector):
    def __init__(self, app: App, snapshot: QueueSnapshot) -> None:
        self.app = app
        self.snapshot = snapshot
        self.started_at = time.time()  # per App, not per import: the supervisor forks

    def collect(self) -> Iterator[Any]:
        app = self.app
        now = time.time()
        info = InfoMetricFamily("ferrymail_build", "ferrymail version")
        info.add_metric([], {"version": __version__})
        yield info
        yield GaugeMetricFamily("ferrymail_worker_start_time_seconds",
                                "Unix time this worker (process) started",
                                value=self.started_at)
        conns = GaugeMetricFamily("ferrymail_connections_open", "Open SMTP connections",
                                  labels=["direction", "server"])
        for srv in app.servers:
            conns.add_metric(["inbound", srv.id], len(srv.connections))
        conns.add_metric(["outbound", "-"], app.delivery.scheduler.running)
        yield conns
        out = GaugeMetricFamily("ferrymail_outbound_connections_open",
                                "Open outbound SMTP connections (in use or pooled)",
                                labels=["source", "proxy"])
        counts: dict[tuple[str, str], int] = {}
        for client in list(LIVE_CLIENTS):
            if client.is_open:
                src = client.source
                key = (src.address_id or src.address or "os",
                       str(src.proxy) if src.proxy else "direct")
                counts[key] = counts.get(key, 0) + 1
        for (source, proxy), n in sorted(counts.items()):
            out.add_metric([source, proxy], n)
        yield out
        yield GaugeMetricFamily("ferrymail_outbound_pooled_connections",
                                "Idle outbound connections kept for reuse",
                                value=len(app.delivery.pool))
        msgs = GaugeMetricFamily("ferrymail_queue_messages", "Messages in the queue by state",
                                 labels=["state"])
        rcpts = GaugeMetricFamily("ferrymail_queue_recipients",
                                  "Pending recipients by state", labels=["state"])
        oldest = GaugeMetricFamily("ferrymail_queue_oldest_seconds",
                                   "Age of the oldest message by state", labels=["state"])
        flying = len(app.delivery.scheduler.in_flight())
        for state in ("queued", "deferred", "held"):
            m, r, first = self.snapshot.rows.get(state, (0, 0, None))
            msgs.add_metric([state], m)
            rcpts.add_metric([state], r)
            oldest.add_metric([state], 0.0 if first is None else max(0.0, now - first))
        msgs.add_metric(["in-flight"], flying)
        yield msgs
        yield rcpts
        yield oldest
        yield GaugeMetricFamily("ferrymail_queue_snapshot_age_seconds",
                                "Seconds since the queue gauges were read from the spool",
                                value=(now - self.snapshot.at) if self.snapshot.at else -1.0)
        up = GaugeMetricFamily("ferrymail_proxy_up", "Outbound proxy health (passive)",
                               labels=["proxy"])
        for server, port, _left in app.delivery.rotation.health.down(now):
            up.add_metric([f"{server}:{port}"], 0)
        for proxy in _configured_proxies(app):
            if app.delivery.rotation.health.is_up(proxy, now):
                up.add_metric([f"{proxy.server}:{proxy.port}"], 1)
        yield up
        limiter = app.delivery.limiter
        yield GaugeMetricFamily("ferrymail_suspensions_active",
                                "Suspensions in force now (manual and from replies)",
                                value=len(limiter.active_suspensions(now)))
        mode = getattr(limiter, "mode", None)
        current = mode() if mode is not None else None  # None: no cluster section, all 0
        state = GaugeMetricFamily("ferrymail_cluster_state",
                                  "Cluster state: 1 for the current one", labels=["state"])
        for name in CLUSTER_STATES:
            state.add_metric([name], 1 if name == current else 0)
        yield state


def _configured_proxies(app: App) -> list[Any]:
    from ferrymail.delivery.routing import transport_sources

    seen: dict[tuple[str, int], Any] = {}
    cfg = app.running
    for group in cfg.transportgroups:
        for t in group.transports:
            try:
                plan = transport_sources(cfg.transport(t.id), app.startup.environment.hostname)
            except Exception:  # a transport that cannot be planned has no proxy to show
                continue
            for src in (*plan.ipv4, *plan.ipv6):
                if src.proxy is not None:
                    seen.setdefault((src.proxy.server, src.proxy.port), src.proxy)
    return list(seen.values())


def stats(app: App, error_window: float = 60.0) -> dict[str, Any]:
    """Totals since start for `ferrymail top` (``GET /v1/stats``): received, recipient results
    per transport x source x proxy, queue by state, proxy health, recent errors."""
    now = time.time()
    received = sum(s.value for m in RECEIVED.collect() for s in m.samples
                   if s.name.endswith("_total"))
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    totals = {"delivered": 0.0, "deferred": 0.0, "failed": 0.0, "deleted": 0.0}
    for metric in RECIPIENTS.collect():
        for s in metric.samples:
            if not s.name.endswith("_total"):
                continue
            lab = s.labels
            key = (lab["transport"], lab["source"], lab["proxy"])
            row = rows.setdefault(key, {"transport": key[0], "source": key[1], "proxy": key[2],
                                        "delivered": 0.0, "deferred": 0.0, "failed": 0.0,
                                        "deleted": 0.0})
            row[lab["result"]] = row.get(lab["result"], 0.0) + s.value
            totals[lab["result"]] = totals.get(lab["result"], 0.0) + s.value
    queue = {st: v[0] for st, v in app.metrics.snapshot.rows.items()}
    queue["in-flight"] = len(app.delivery.scheduler.in_flight())
    health = app.delivery.rotation.health
    proxies = [{"proxy": f"{p.server}:{p.port}", "up": health.is_up(p, now)}
               for p in _configured_proxies(app)]
    return {
        "time": now, "received": received, **totals,
        "by_source": sorted(rows.values(), key=lambda r: (r["transport"], r["source"])),
        "queue": queue, "queue_at": app.metrics.snapshot.at, "proxies": proxies,
        "connections_in": sum(len(s.connections) for s in app.servers),
        "connections_out": app.delivery.scheduler.running,
        "errors": [e for e in RECENT_ERRORS if e["at"] >= now - error_window][-20:],
    }


# -- the listener ----------------------------------------------------------------------------


class MetricsServer:
    """App component: ``/metrics`` (Prometheus text format), ``/healthy`` (the event loop
    answers), ``/ready`` (started, spool open, not stopping: 200, else 503).

    With N workers, worker 0 answers for the host (`HostMetrics`): ``/metrics`` merges every
    worker, ``/ready`` is 200 only when every worker is ready and names each one (``worker 1
    ready``); ``/healthy`` stays worker 0's own (the supervisor restarts any other worker; a
    liveness probe failing for one worker would restart the whole host). Every worker also
    answers ``GET /v1/metrics`` and ``GET /v1/ready`` on its admin API, for itself."""

    name = "metrics"

    def __init__(self, app: App) -> None:
        self.app = app
        cfg = app.startup.metrics
        self.address = cfg.address()
        self.host: HostMetrics | None = None
        worker = app.worker
        if worker is not None and worker.count > 1 and worker.index == 0:
            self.host = HostMetrics(REGISTRY, worker_peers(app.startup, worker.count),
                                    cfg.worker_timeout, lambda: self.app.ready,
                                    worker.spool_path / HOST_STATE_FILE)
        elif worker is not None and worker.index > 0 and not cfg.worker_listen:
            self.address = None  # worker 0 serves the host's metrics
        self.snapshot = QueueSnapshot()
        self.routes = RouteTable()
        self.routes.add("GET", "/metrics", self._metrics)
        self.routes.add("GET", "/healthy", self._healthy)
        self.routes.add("GET", "/ready", self._ready)
        app.admin.routes.add("GET", "/v1/metrics", self._own_metrics)
        app.admin.routes.add("GET", "/v1/ready", self._own_ready)
        self._http = HTTPServer(self.routes, name="metrics")
        self._collector = _LiveCollector(app, self.snapshot)
        self._refresher: asyncio.Task[None] | None = None
        self.listening = False

    async def start(self) -> None:
        with contextlib.suppress(ValueError):
            REGISTRY.register(self._collector)
        self._refresher = asyncio.create_task(self._refresh_loop(), name="metrics-queue")
        if self.address is None:
            return
        host, port = self.address
        try:
            await self._http.start_tcp(host, port)
        except OSError as exc:
            log_event("metrics.unavailable", "warning", listen=f"{host}:{port}",
                      error=exc.strerror or str(exc),
                      effect="running without the metrics listener")
            return
        self.listening = True
        log_event("metrics.listening", listen=f"{host}:{port}")

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self._http.stop()
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(self._collector)

    async def refresh(self) -> None:
        self.snapshot.update(await self.app.spool.queue_stats())

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # the spool closing under us, a read error
                log_event("metrics.queue_refresh_failed", "debug", error=str(exc))
            await asyncio.sleep(QUEUE_REFRESH)

    async def _own_metrics(self, req: Request) -> Response:
        return Response(200, generate_latest(REGISTRY), CONTENT_TYPE)

    async def _own_ready(self, req: Request) -> dict[str, Any]:
        worker = self.app.worker
        return {"ready": self.app.ready, "worker": 0 if worker is None else worker.index}

    async def _metrics(self, req: Request) -> Response:
        if self.host is not None:
            return Response(200, await self.host.scrape(), CONTENT_TYPE)
        return Response(200, generate_latest(REGISTRY), CONTENT_TYPE)

    async def _healthy(self, req: Request) -> Response:
        return Response(200, b"ok\n", "text/plain")

    async def _ready(self, req: Request) -> Response:
        if self.host is not None:
            states = await self.host.readiness()
            ready = all(state == "ready" for _, state in states)
            lines = "".join(f"worker {k} {state}\n" for k, state in states)
            return Response(200 if ready else 503,
                            (("ready\n" if ready else "not ready\n") + lines).encode(),
                            "text/plain")
        if self.app.ready:
            return Response(200, b"ready\n", "text/plain")
        return Response(503, b"not ready\n", "text/plain")


__all__ = ["REGISTRY", "CountingSpool", "MetricsServer", "delivery_attempt", "parse_listen"]
