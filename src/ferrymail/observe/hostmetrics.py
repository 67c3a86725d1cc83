"""The host's metrics and readiness with ``ferrymail run --workers N`` (N >= 2).

Worker 0 serves ``metrics.listen``; workers 1..N-1 serve their own metrics only on their
admin API (``GET /v1/metrics``, and ``GET /v1/ready``), on ``NAME.wK.sock`` (or on their
admin TCP port + K with the bearer token when the socket is off). For each scrape worker 0
asks every other worker at once, each within ``metrics.worker_timeout`` seconds, and merges
the answers with its own samples (`observe.aggregate`). A worker that does not answer in
time (or whose answer does not parse) is ``ferrymail_worker_up{worker="K"} 0``, counted in
``ferrymail_worker_scrape_failures_total{worker="K"}`` and logged once per change
(``metrics.worker_down`` / ``metrics.worker_up``); the scrape still answers 200.

Why scraping rather than prometheus-client's multiprocess mode: most ferrymail gauges are
computed at scrape time by a custom collector (queue, sessions, proxy health), which the
multiprocess mode does not aggregate (it only merges the values of its own metric objects,
kept in mmap files, and needs its directory set before import); asking the workers keeps
one code path for 1 and N processes and the workers' live values exact.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest

from ferrymail.config.operations import (
    admin_socket_path,
    for_worker,
    parse_listen,
    worker_socket_path,
)
from ferrymail.observe import aggregate
from ferrymail.observe.log import log_event

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ferrymail.config.models import StartupConfig

MAX_RESPONSE = 16 * 1024 * 1024  # bytes of one worker's answer
WORKER_UP = "ferrymail_worker_up"
SCRAPE_FAILURES = "ferrymail_worker_scrape_failures"


class WorkerUnanswered(Exception):
    """A worker did not answer (connect refused, timeout, bad status or text)."""


@dataclass(frozen=True)
class WorkerPeer:
    """How worker ``index`` is reached: its admin socket, else its admin TCP port."""

    index: int
    socket_path: str | None = None
    tcp: tuple[str, int] | None = None
    token: str | None = None

    def describe(self) -> str:
        if self.socket_path is not None:
            return self.socket_path
        return "no admin API" if self.tcp is None else f"{self.tcp[0]}:{self.tcp[1]}"


def worker_peers(startup: StartupConfig, count: int) -> list[WorkerPeer]:
    """Workers 1..count-1 as worker 0 (configured ``startup``) reaches them; see
    ``supervisor.per_worker`` for where each one listens."""
    path = admin_socket_path(startup.admin, startup.environment.pidfile)
    token = None
    if path is None and startup.admin.listen is not None:
        token = startup.admin.bearer_token()
    peers = []
    for k in range(1, count):
        if path is not None:
            peers.append(WorkerPeer(k, socket_path=worker_socket_path(path, k)))
        elif startup.admin.listen is not None:
            listen = for_worker(startup.admin.listen, k)
            assert listen is not None
            peers.append(WorkerPeer(k, tcp=parse_listen(listen), token=token))
        else:
            peers.append(WorkerPeer(k))
    return peers


async def fetch(peer: WorkerPeer, path: str, timeout: float) -> bytes:
    """``GET path`` on ``peer``'s admin API; the body of a 200 answer. WorkerUnanswered
    otherwise (including after ``timeout`` seconds, connect included)."""
    if peer.socket_path is None and peer.tcp is None:
        raise WorkerUnanswered("no admin API to reach it (admin.socket: false, no "
                               "admin.listen)")
    writer = None
    try:
        async with asyncio.timeout(timeout):
            if peer.socket_path is not None:
                reader, writer = await asyncio.open_unix_connection(peer.socket_path)
            else:
                assert peer.tcp is not None
                reader, writer = await asyncio.open_connection(*peer.tcp)
            auth = f"Authorization: Bearer {peer.token}\r\n" if peer.token else ""
            writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                         f"{auth}\r\n".encode("latin-1"))
            raw = await reader.read(MAX_RESPONSE + 1)
            while raw and len(raw) <= MAX_RESPONSE:
                more = await reader.read(MAX_RESPONSE + 1 - len(raw))
                if not more:
                    break
                raw += more
    except TimeoutError:
        raise WorkerUnanswered(f"no answer within {timeout:g}s") from None
    except OSError as exc:
        raise WorkerUnanswered(exc.strerror or str(exc)) from None
    finally:
        if writer is not None:
            writer.close()
    if len(raw) > MAX_RESPONSE:
        raise WorkerUnanswered(f"answer longer than {MAX_RESPONSE} bytes")
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    if not sep or len(status_line) < 2 or status_line[1] != b"200":
        raise WorkerUnanswered(f"answered {head[:60]!r}")
    return body


@dataclass
class HostMetrics:
    """Worker 0's view of the host: ``scrape()`` for ``/metrics``, ``readiness()`` for
    ``/ready``. ``registry`` holds worker 0's own metrics; ``own_ready()`` its readiness.

    ``state_path`` (a file in worker 0's spool directory) keeps the counters' carry
    (`aggregate.HostCounters`) across a restart of worker 0 itself: written after each
    scrape, read at start if the same supervisor (``os.getppid()``) wrote it. So host
    counters continue through any worker's restart; they start again only with a new
    ``ferrymail run``."""

    registry: CollectorRegistry
    peers: list[WorkerPeer]
    timeout: float
    own_ready: Any  # () -> bool
    state_path: Path | None = None
    counters: aggregate.HostCounters = field(default_factory=aggregate.HostCounters)
    failures: dict[int, int] = field(default_factory=dict)
    down: set[int] = field(default_factory=set)
    # One scrape at a time: answers of two overlapping scrapes could reach `counters` out
    # of order, and an older value after a newer one looks like a restart (counted twice).
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        if self.state_path is None:
            return
        try:
            doc = json.loads(self.state_path.read_text())
            if doc.get("supervisor") != os.getppid():
                return  # an earlier `ferrymail run`'s: its counters are not ours
            self.counters = aggregate.HostCounters.from_json(doc["counters"])
            self.failures = {int(k): int(v) for k, v in doc["failures"].items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log_event("metrics.state_unreadable", "warning", file=str(self.state_path),
                      error=f"{type(exc).__name__}: {exc}",
                      effect="host counters start from the workers' current values")
            return
        log_event("metrics.state_restored", file=str(self.state_path),
                  workers=len(self.counters.last))

    def _save(self) -> None:
        if self.state_path is None:
            return
        doc = {"supervisor": os.getppid(), "counters": self.counters.to_json(),
               "failures": {str(k): v for k, v in self.failures.items()}}
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc, separators=(",", ":")))
            os.replace(tmp, self.state_path)
        except OSError as exc:  # a full disk: the next scrape tries again
            log_event("metrics.state_unwritable", "debug", file=str(self.state_path),
                      error=exc.strerror or str(exc))

    async def _worker_families(self, peer: WorkerPeer) -> aggregate.Families | None:
        try:
            body = await fetch(peer, "/v1/metrics", self.timeout)
            try:
                fams = aggregate.parse(body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise WorkerUnanswered(f"unreadable metrics: {exc}") from None
        except WorkerUnanswered as exc:
            self.failures[peer.index] = self.failures.get(peer.index, 0) + 1
            if peer.index not in self.down:
                self.down.add(peer.index)
                log_event("metrics.worker_down", "warning", worker=peer.index,
                          via=peer.describe(), error=str(exc),
                          effect="reported as ferrymail_worker_up 0; its last counters kept")
            return None
        if peer.index in self.down:
            self.down.discard(peer.index)
            log_event("metrics.worker_up", worker=peer.index)
        return fams

    async def scrape(self) -> bytes:
        """The host's exposition: every worker's families merged, worker_up per worker.
        Overlapping scrapes (two Prometheus servers) take turns."""
        async with self._lock:
            return await self._scrape()

    async def _scrape(self) -> bytes:
        answers = await asyncio.gather(*(self._worker_families(p) for p in self.peers))
        own = aggregate.parse(generate_latest(self.registry).decode("utf-8"))
        parts = [aggregate.with_worker_label(self.counters.contribution(0, own), 0)]
        up = [({"worker": "0"}, 1.0)]
        for peer, fams in zip(self.peers, answers, strict=True):
            parts.append(aggregate.with_worker_label(
                self.counters.contribution(peer.index, fams), peer.index))
            up.append(({"worker": str(peer.index)}, 0.0 if fams is None else 1.0))
        host = aggregate.merge(*parts)
        host[WORKER_UP] = aggregate.gauge(
            WORKER_UP, "1 if the worker answered this scrape (worker 0 serves it)", up)
        host[SCRAPE_FAILURES] = aggregate.Family(
            SCRAPE_FAILURES, "counter", "Scrapes a worker did not answer in time",
            {(SCRAPE_FAILURES + "_total", (("worker", str(p.index)),)):
             float(self.failures.get(p.index, 0)) for p in self.peers})
        self._save()
        return aggregate.render(host)

    async def readiness(self) -> list[tuple[int, str]]:
        """(worker, ``ready`` | ``not ready`` | ``not answering: WHY``) for every worker."""

        async def one(peer: WorkerPeer) -> tuple[int, str]:
            try:
                doc = json.loads(await fetch(peer, "/v1/ready", self.timeout))
            except WorkerUnanswered as exc:
                return peer.index, f"not answering: {exc}"
            except ValueError:
                return peer.index, "not answering: unreadable answer"
            return peer.index, "ready" if doc.get("ready") is True else "not ready"

        own = (0, "ready" if self.own_ready() else "not ready")
        return [own, *await asyncio.gather(*(one(p) for p in self.peers))]


__all__ = ["HostMetrics", "WorkerPeer", "WorkerUnanswered", "fetch", "worker_peers"]
