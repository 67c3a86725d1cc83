"""`queue summary` reasons for policy waits, suspensions and the cluster fallback, and the
metrics that count them: real limiter refusals (fake clock), views as the daemon builds them."""

from __future__ import annotations

import asyncio
import time

from ferrymail.admin.queue import WAITING, summarize
from ferrymail.config.policies import Cluster as ClusterConfig
from ferrymail.observe import metrics
from ferrymail.orchestrator.limiter import Lease
from ferrymail.orchestrator.local import LocalLimiter
from ferrymail.orchestrator.policy import Attempt, Limit, Rate
from ferrymail.orchestrator.redis import RedisLimiter
from ferrymail.orchestrator.suspensions import new_suspension
from tests.realpeers import free_port


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


ATTEMPT = Attempt(localip="192.0.2.1", remoteip="203.0.113.5", remotemx="mx.example.net",
                  recipientdomain="example.net", transportid="mx")


def _view(qid: str, domain: str, state: str, last_reply: str, next_attempt: str,
          transport: str = "mx") -> dict:
    return {"id": qid, "age_s": 5.0, "recipients": [{
        "address": f"u@{domain}", "state": state, "attempts": 0, "next_attempt": next_attempt,
        "last_reply": last_reply, "transport": transport, "domain": domain}]}


def _refusals() -> tuple[str, str]:
    """The reasons a real LocalLimiter gives for a full concurrency and an early rate."""
    lim = LocalLimiter(clock=FakeClock())
    conc = Limit("localip=192.0.2.1", "localip=192.0.2.1", concurrency=1)
    assert isinstance(lim.connect_now(ATTEMPT, (conc,)), Lease)
    full = lim.connect_now(ATTEMPT, (conc,))
    rate = Limit("grouping=example.net", "grouping=example.net", rate=Rate(2, 1.0))
    assert lim.message_now(ATTEMPT, (rate,), None) is None
    late = lim.message_now(ATTEMPT, (rate,), None)
    assert full.kind == "concurrency" and late.kind == "rate"  # type: ignore[union-attr]
    return full.reason, late.reason  # type: ignore[union-attr]


def test_policy_waits_are_named_per_group_latest_first():
    concurrency, rate = _refusals()
    assert concurrency == "concurrency 1/1 for localip=192.0.2.1"
    assert rate.startswith("rate 2/1 for grouping=example.net: next slot in ")
    views = [
        _view("a" * 16, "a.test", "deferred", WAITING + concurrency, "2026-01-01T00:00:01Z"),
        _view("b" * 16, "a.test", "deferred", WAITING + rate, "2026-01-01T00:00:02Z"),
        _view("c" * 16, "b.test", "deferred", "451 4.7.1 greylisted", "2026-01-01T00:00:03Z"),
    ]
    rows = {r["domain"]: r for r in summarize(views, now=time.time())}
    # The later-due wait is the one in force: one reason per group, not one per recipient.
    assert rate in rows["a.test"]["why"] and concurrency not in rows["a.test"]["why"]
    assert "retry at 2026-01-01T00:00:01Z" in rows["a.test"]["why"]
    assert rows["b.test"]["why"] == ["retry at 2026-01-01T00:00:03Z"]  # not a policy wait


def test_suspensions_and_notes_name_the_groups_they_hold():
    now = time.time()
    lim = LocalLimiter()
    by_domain = new_suspension({"recipientdomain": "*.test"}, 600, "abuse desk", now=now)
    by_ip = new_suspension({"localip": "192.0.2.0/24"}, 600, "blocklisted", now=now)
    expired = new_suspension({"transportid": "mx"}, 1, "old", now=now - 10)
    lim.dynamic = [by_domain, by_ip, expired]
    active = lim.active_suspensions(now)
    assert active == [by_domain, by_ip]
    # A suspension met by a job is its waiting reason, as the engine parks it.
    denied = lim.suspended(ATTEMPT)
    assert denied is not None and denied.kind == "suspended"
    assert denied.reason.startswith("suspended until ") and "(blocklisted; " in denied.reason
    views = [_view("a" * 16, "a.test", "queued", "", "2026-01-01T00:00:00Z"),
             _view("b" * 16, "example.net", "deferred", WAITING + denied.reason,
                   "2026-01-01T00:00:09Z", transport="other")]
    rows = {r["domain"]: r for r in summarize(
        views, now=now, notes=["redis unreachable: split 1/3"], suspensions=active)}
    a_why = rows["a.test"]["why"]
    assert by_domain.describe() in a_why  # matches the group's domain
    assert by_ip.describe() not in a_why  # depends on the source chosen at delivery
    assert "redis unreachable: split 1/3" in a_why
    assert denied.reason in rows["example.net"]["why"]
    assert by_domain.describe() not in rows["example.net"]["why"]


def _sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def test_policy_wait_counter_has_bounded_kinds():
    before = {k: _sample("ferrymail_policy_waits_total", kind=k)
              for k in metrics.POLICY_WAIT_KINDS}
    for kind in ("concurrency", "rate", "rate", "connectinterval", "suspended", "closed",
                 "lost", "anything"):
        metrics.policy_wait(kind)
    after = {k: _sample("ferrymail_policy_waits_total", kind=k)
             for k in metrics.POLICY_WAIT_KINDS}
    assert {k: after[k] - before[k] for k in after} == {
        "concurrency": 1, "rate": 2, "connectinterval": 1, "suspension": 1, "closed": 1,
        "other": 2}


def test_unreachable_redis_reports_the_fallback_mode_and_counts_the_transition():
    async def run() -> None:
        cfg = ClusterConfig(redis=f"redis://127.0.0.1:{free_port()}/0", fallback="split",
                            timeout=0.2)
        lim = RedisLimiter(cfg, default_instance="t")
        before = _sample("ferrymail_cluster_transitions_total", state="split")
        await lim.start()
        try:
            assert lim.mode() == "split"
            assert lim.fallback_note() == "redis unreachable: split 1/1"
            assert lim.active_suspensions(time.time()) == []
        finally:
            await lim.stop()
        assert _sample("ferrymail_cluster_transitions_total", state="split") == before + 1

    asyncio.run(run())
