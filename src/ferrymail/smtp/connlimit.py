"""Simultaneous-connection limits of one inbound server, sans-IO.

``ConnectionLimiter`` counts live connections in total and per client address (on a
proxied listener the PROXY-reported one), answers whether one more may be admitted, and
keeps ``ConnectionCounters`` that other code (logs, metrics) reads. ``LimitLog`` turns a
flood of refusals into at most one log line per interval, naming how many were refused.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ConnectionCounters:
    """Running totals since start (monotonic, never reset): read them, do not write."""

    accepted: int = 0  # connections admitted by the server-wide limit
    refused_server: int = 0  # refused: the server had `connections` open
    refused_client: int = 0  # refused: that client had `connections_per_client` open
    timeouts_idle: int = 0  # closed: no input for the whole timeout
    timeouts_deadline: int = 0  # closed: a request took longer than its deadline


class ConnectionLimiter:
    """Live connections in total and per client; ``0`` as a limit means unlimited.

    A connection is ``open``ed when accepted (server-wide limit) and ``claim``s its client
    address once that is known (at once on a plain listener, after the PROXY header on a
    proxied one); ``release`` undoes both. Per-client entries are dropped at zero, so the
    table holds at most as many keys as there are live connections.
    """

    __slots__ = ("counters", "max_per_client", "max_total", "per_client", "total")

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.counters = ConnectionCounters()

    def open(self) -> bool:
        """Admit one more connection to the server, or count the refusal."""
        if self.max_total and self.total >= self.max_total:
            self.counters.refused_server += 1
            return False
        self.total += 1
        self.counters.accepted += 1
        return True

    def claim(self, client: str) -> bool:
        """Admit one more connection from ``client``, or count the refusal."""
        n = self.per_client.get(client, 0)
        if self.max_per_client and n >= self.max_per_client:
            self.counters.refused_client += 1
            return False
        self.per_client[client] = n + 1
        return True

    def release(self, client: str | None) -> None:
        """An ``open``ed connection ended; ``client`` if it had ``claim``ed one."""
        self.total -= 1
        if client is not None:
            n = self.per_client[client] - 1
            if n:
                self.per_client[client] = n
            else:
                del self.per_client[client]


class LimitLog:
    """At most one line per ``interval`` seconds: ``hit(now)`` says whether to log now and
    how many hits (this one included) the line covers."""

    __slots__ = ("_last", "_pending", "interval")

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: float | None = None
        self._pending = 0

    def hit(self, now: float) -> int:
        """0: stay quiet; n > 0: log now, covering n refusals."""
        self._pending += 1
        if self._last is not None and now - self._last < self.interval:
            return 0
        self._last = now
        n, self._pending = self._pending, 0
        return n
