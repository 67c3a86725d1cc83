"""Host totals of the operator's views with several workers: ``ferrymail top``'s stats
(observe/top.py: merge_stats) and ``ferrymail queue summary`` (admin/queue.py:
merge_summaries)."""

from __future__ import annotations

from rich.console import Console

from ferrymail.admin.queue import merge_summaries
from ferrymail.observe.top import merge_stats, render


def _group(domain: str, msgs: int, rcpts: int, oldest: float, why: list[str],
           retry: str | None = None, last: str = "", **states: int) -> dict:
    return {"transport": "mx", "domain": domain, "source": "a1", "messages": msgs,
            "recipients": rcpts, "oldest_s": oldest, "states": states, "last_error": last,
            "next_retry": retry, "why": why}


def test_summary_groups_of_the_same_destination_become_one():
    w0 = [_group("a.test", 2, 3, 10.0, ["ready (waiting for a delivery slot)"], queued=3),
          _group("b.test", 1, 1, 5.0, ["retry at 2026-12-01T02:00:00Z"],
                 retry="2026-12-01T02:00:00Z", deferred=1)]
    w1 = [_group("b.test", 4, 6, 50.0, ["retry at 2026-12-01T01:30:00Z"],
                 retry="2026-12-01T01:30:00Z", last="451 try later", deferred=5, held=1)]
    host = merge_summaries(w0, w1)
    assert [(g["domain"], g["messages"], g["recipients"]) for g in host] == [
        ("b.test", 5, 7), ("a.test", 2, 3)]  # most recipients first, as summarize sorts
    b = host[0]
    assert b["oldest_s"] == 50.0 and b["states"] == {"deferred": 6, "held": 1}
    assert b["next_retry"] == "2026-12-01T01:30:00Z"
    assert b["why"] == ["retry at 2026-12-01T01:30:00Z"]  # the earliest retry only
    assert b["last_error"] == "451 try later"
    assert merge_summaries(w1, w0) == host
    assert w0[1]["messages"] == 1 and w0[1]["states"] == {"deferred": 1}  # inputs untouched
    assert merge_summaries(w0) == sorted(w0, key=lambda g: -g["recipients"])


def _stats(t: float, received: int, delivered: int, up: bool, queued: int, err_at: float
           ) -> dict:
    row = {"transport": "mx", "source": "a1", "proxy": "127.0.0.1:9", "delivered": delivered,
           "deferred": 1.0, "failed": 0.0, "deleted": 0.0}
    return {"time": t, "received": received, "delivered": delivered, "deferred": 1.0,
            "failed": 0.0, "deleted": 0.0, "by_source": [row],
            "queue": {"queued": queued, "in-flight": 1}, "queue_at": t - 1,
            "proxies": [{"proxy": "127.0.0.1:9", "up": up}], "connections_in": 2,
            "connections_out": 1,
            "errors": [{"at": err_at, "transport": "mx", "kind": "smtp", "error": f"e{err_at}"}]}


def test_top_shows_host_totals():
    host = merge_stats([_stats(10.0, 5, 4, True, 3, 9.0), _stats(10.5, 7, 6, False, 2, 8.0)])
    assert host["time"] == 10.5 and host["queue_at"] == 9.0
    assert (host["received"], host["delivered"], host["deferred"]) == (12, 10, 2.0)
    assert host["connections_in"] == 4 and host["connections_out"] == 2
    assert host["queue"] == {"queued": 5, "in-flight": 2}
    assert host["by_source"] == [{"transport": "mx", "source": "a1", "proxy": "127.0.0.1:9",
                                  "delivered": 10.0, "deferred": 2.0, "failed": 0.0,
                                  "deleted": 0.0}]
    assert host["proxies"] == [{"proxy": "127.0.0.1:9", "up": False}]  # down on one worker
    assert [e["at"] for e in host["errors"]] == [8.0, 9.0]
    console = Console(width=140, record=True)
    console.print(render({**host, "workers": "2/2"}, None, []))
    text = console.export_text()
    assert "received 12" in text and "delivered 10" in text and "workers 2/2" in text
