"""What ``ferrymail proxy status`` shows: every proxy of the running config and each of its
sources, with the health entry known for it (``up`` when none), as rows and as a table."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace

from ferrymail.config.models import RunningConfig
from ferrymail.delivery.health import HealthEntry
from ferrymail.proxytier.haproxy import proxies

HEADER = ("PROXY", "SOURCE", "STATE", "CLASS", "SINCE", "UNTIL", "LAST FAILURE", "BY", "REASON")


def status_rows(running: RunningConfig, entries: Iterable[HealthEntry],
                now: float) -> list[HealthEntry]:
    """One entry per proxy (source None) and per (proxy, source) of the config, in config
    order, then entries the store knows that the config no longer names. A suspension that
    ran out shows as ``probing``."""
    known = {e.key: e for e in entries}
    rows = []
    for host in proxies(running):
        for source in (None, *host.sources):
            rows.append(known.pop((str(host), source), None) or HealthEntry(str(host), source,
                                                                            "up"))
    rows += sorted(known.values(), key=lambda e: (e.proxy, e.source or ""))
    out = []
    for e in rows:
        if e.state == "suspended" and e.until is not None and e.until <= now:
            e = replace(e, state="probing")
        out.append(e)
    return out


def _when(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    ago = now - ts
    rel = f"in {-ago:.0f}s" if ago < 0 else f"{ago:.0f}s ago"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) + f" ({rel})"


def status_table(rows: Iterable[HealthEntry], now: float | None = None) -> str:
    """The rows as an aligned text table (REASON last, unpadded)."""
    now = time.time() if now is None else now
    table = [HEADER]
    for e in rows:
        table.append((e.proxy, e.source or "*", e.state, e.failure_class or "-",
                      _when(e.since, now), _when(e.until, now), _when(e.last_failure, now),
                      e.origin or "-", e.reason or "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER) - 1)]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  "
                   + r[-1] + "\n" for r in table)
