"""``ferrymail top``: a live terminal view of a running daemon (``rich``), refreshed each second.

Reads ``GET /v1/stats`` every ``interval`` seconds (rates are the difference of two readings)
and ``GET /v1/queue/summary`` every SUMMARY_EVERY seconds (it scans the queue). Shows: rates
in and out, queue by state, top destinations with why they wait, per transport x source x proxy
attempts per second and results, proxy health, and the errors of the last minute.

With ``ferrymail run --workers N`` it asks every worker (each counts its own mail and holds
its own spool shard) and shows host totals (`merge_stats`, `admin.queue.merge_summaries`);
the head says how many workers answered (``workers 2/2``). Worker 0 must answer; a worker
that does not is left out of that frame.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ferrymail.admin.client import AdminClient, AdminError, AdminUnavailable
from ferrymail.admin.queue import merge_summaries

SUMMARY_EVERY = 5.0
TOP_DESTINATIONS = 10


def _rate(now: dict[str, Any], before: dict[str, Any] | None, key: str) -> float:
    if before is None:
        return 0.0
    dt = now["time"] - before["time"]
    return max(0.0, (now[key] - before[key]) / dt) if dt > 0 else 0.0


RESULTS = ("delivered", "deferred", "failed", "deleted")


def merge_stats(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Host totals from several workers' ``/v1/stats``: counts and connections added up,
    per-source rows and queue states added up per key, a proxy up only if every worker
    sees it up, the latest errors of all; ``time`` the latest reading."""
    if len(answers) == 1:
        return answers[0]
    out = dict(answers[0])
    out["time"] = max(a["time"] for a in answers)
    for key in ("received", *RESULTS, "connections_in", "connections_out"):
        out[key] = sum(a.get(key, 0) for a in answers)
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    queue: dict[str, int] = {}
    proxies: dict[str, bool] = {}
    for a in answers:
        for r in a["by_source"]:
            k = (r["transport"], r["source"], r["proxy"])
            row = rows.setdefault(k, {**r, **dict.fromkeys(RESULTS, 0.0)})
            for result in RESULTS:
                row[result] += r.get(result, 0.0)
        for state, n in a["queue"].items():
            queue[state] = queue.get(state, 0) + n
        for p in a["proxies"]:
            proxies[p["proxy"]] = proxies.get(p["proxy"], True) and p["up"]
    out["by_source"] = sorted(rows.values(), key=lambda r: (r["transport"], r["source"]))
    out["queue"] = queue
    out["queue_at"] = min(a["queue_at"] for a in answers)
    out["proxies"] = [{"proxy": p, "up": up} for p, up in proxies.items()]
    out["errors"] = sorted((e for a in answers for e in a["errors"]),
                           key=lambda e: e["at"])[-20:]
    return out


def render(stats: dict[str, Any], before: dict[str, Any] | None,
           summary: list[dict[str, Any]]) -> Group:
    """One frame from a /v1/stats reading, the previous one (for rates) and a summary."""
    head = Table.grid(padding=(0, 3))
    for _ in range(6):
        head.add_column()
    head.add_row(
        Text.assemble(("in ", "bold"), f"{_rate(stats, before, 'received'):.1f}/s"),
        Text.assemble(("delivered ", "bold green"), f"{_rate(stats, before, 'delivered'):.1f}/s"),
        Text.assemble(("deferred ", "bold yellow"), f"{_rate(stats, before, 'deferred'):.1f}/s"),
        Text.assemble(("bounced ", "bold red"), f"{_rate(stats, before, 'failed'):.1f}/s"),
        f"conns in {stats['connections_in']} out {stats['connections_out']}",
        time.strftime("%H:%M:%S", time.localtime(stats["time"]))
        + (f"  workers {stats['workers']}" if "workers" in stats else ""),
    )
    head.add_row(f"received {stats['received']:.0f}", f"delivered {stats['delivered']:.0f}",
                 f"deferred {stats['deferred']:.0f}", f"bounced {stats['failed']:.0f}", "", "")
    parts: list[Any] = [head]
    if stats.get("silent"):
        parts.append(Text(f"not answering: worker(s) {', '.join(map(str, stats['silent']))} "
                          "(left out of these figures)", style="bold red"))

    queue = Table(title="queue", title_justify="left", expand=False)
    for state in ("queued", "deferred", "held", "in-flight"):
        queue.add_column(state, justify="right")
    queue.add_row(*(str(stats["queue"].get(s, 0)) for s in ("queued", "deferred", "held",
                                                            "in-flight")))

    dest = Table(title="top destinations", title_justify="left")
    for col in ("transport", "domain", "source", "rcpts", "oldest", "why"):
        dest.add_column(col, justify="right" if col in ("rcpts", "oldest") else "left")
    for g in summary[:TOP_DESTINATIONS]:
        dest.add_row(g["transport"], g["domain"], g["source"], str(g["recipients"]),
                     f"{g['oldest_s']:.0f}s", "; ".join(g["why"]) or "-")

    src = Table(title="sources", title_justify="left")
    for col in ("transport", "source", "proxy", "out/s", "delivered", "deferred", "bounced"):
        src.add_column(col, justify="left" if col in ("transport", "source", "proxy")
                       else "right")
    up = {p["proxy"]: p["up"] for p in stats["proxies"]}
    earlier = {(r["transport"], r["source"], r["proxy"]): r
               for r in (before or {}).get("by_source", [])}
    dt = stats["time"] - before["time"] if before else 0.0
    for r in stats["by_source"]:
        proxy = r["proxy"]
        if proxy in up:
            proxy = f"{proxy} [{'green]up' if up[proxy] else 'red]down'}[/]"
        prev = earlier.get((r["transport"], r["source"], r["proxy"]))
        done = sum(r[k] for k in ("delivered", "deferred", "failed"))
        rate = 0.0
        if prev is not None and dt > 0:
            rate = max(0.0, done - sum(prev[k] for k in ("delivered", "deferred", "failed")))
            rate /= dt
        src.add_row(r["transport"], r["source"], proxy, f"{rate:.1f}", f"{r['delivered']:.0f}",
                    f"{r['deferred']:.0f}", f"{r['failed']:.0f}")

    errors = Table(title="errors (last minute)", title_justify="left")
    for col in ("time", "transport", "kind", "error"):
        errors.add_column(col, overflow="fold")
    for e in stats["errors"][-8:]:
        errors.add_row(time.strftime("%H:%M:%S", time.localtime(e["at"])), e["transport"],
                       e["kind"], e["error"])
    return Group(*parts, queue, dest, errors, src)


def _ask(clients: Sequence[AdminClient], path: str) -> tuple[list[Any], list[int]]:
    """``GET path`` from every worker at once: (the answers, the indexes of the workers that
    did not answer). Worker 0 (the first) must answer: its error is raised. A stopped or
    restarting worker costs one client timeout per frame, not one per worker."""
    if len(clients) == 1:
        return [clients[0].get(path)], []
    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(c.get, path) for c in clients]
    out = [futures[0].result()]
    silent = []
    for i, f in enumerate(futures[1:], 1):
        try:
            out.append(f.result())
        except (AdminUnavailable, AdminError, OSError):
            silent.append(i)  # left out of this frame, the head says so
    return out, silent


def run(clients: AdminClient | Sequence[AdminClient], *, interval: float = 1.0,
        once: bool = False, console: Console | None = None,
        iterations: int | None = None) -> None:
    """Show the view until Ctrl-C (``once``: print one frame; ``iterations``: stop after).
    ``clients``: worker 0's admin client first, then the other workers' (host totals)."""
    console = console or Console()
    workers = [clients] if isinstance(clients, AdminClient) else list(clients)
    before = None
    summary: list[dict[str, Any]] = []
    summary_at = 0.0

    def frame() -> Group:
        nonlocal before, summary, summary_at
        answers, silent = _ask(workers, "/v1/stats")
        stats = merge_stats(answers)
        if len(workers) > 1:
            stats = {**stats, "workers": f"{len(answers)}/{len(workers)}", "silent": silent}
        if time.monotonic() - summary_at >= SUMMARY_EVERY:
            # only those that just answered: a silent worker is not waited for twice
            alive = [w for i, w in enumerate(workers) if i not in silent]
            summary = merge_summaries(*(a["queues"] for a in _ask(alive,
                                                                  "/v1/queue/summary")[0]))
            summary_at = time.monotonic()
        out = render(stats, before, summary)
        before = stats
        return out

    if once:
        console.print(frame())
        return
    count = 0
    with Live(frame(), console=console, refresh_per_second=4, screen=False,
              vertical_overflow="visible") as live:
        while iterations is None or count < iterations:
            time.sleep(interval)
            live.update(frame())
            count += 1
