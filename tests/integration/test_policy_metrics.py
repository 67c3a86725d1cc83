"""Policy waits, suspensions and the cluster state as an operator sees them: ``/metrics`` of a
real ``ferrymail run`` and ``ferrymail queue summary``, with a binding rate, a suspension
added by ``ferrymail suspend add``, and a real ``redis-server`` stopped under a cluster."""

from __future__ import annotations

import re
import smtplib
import time
from pathlib import Path

import yaml

from tests.integration.conftest import listener, run_cli, server, startup_yaml
from tests.integration.test_metrics import DASHBOARD, samples, scrape, total
from tests.realpeers import free_port, redis_server, require, smtp_sink

HOST = "127.0.0.1"
N_FAST = 6  # messages to fast.test, rate 2/1: the later ones wait in memory for a slot


def running(sink: int, dead: int) -> str:
    doc = {
        "servers": [{"id": "in", "transport": "t",
                     "domains": ["fast.test", "slow.test", "susp.test", "dead.test"],
                     "relay_networks": ["127.0.0.0/8"]}],
        "routing": [{"recipientdomain": d, "transport": d.split(".")[0]}
                    for d in ("dead.test", "slow.test", "susp.test")],
        "transportgroups": [{
            "id": "g", "retry": {"count": 30, "intervals": [3600]},
            "transports": [
                {"id": "t", "connection": {"server": HOST, "port": sink}},
                {"id": "slow", "connection": {"server": HOST, "port": sink}},
                {"id": "susp", "connection": {"server": HOST, "port": sink}},
                {"id": "dead", "connection": {"server": HOST, "port": dead,
                                              "timeout": {"connect": 2}}}],
        }],
        # Keyed on the transport: a smarthost route's attempt has no recipient domain.
        "policies": [{"fields": ["transportid"],
                      "conditions": [{"if": {"transportid": "slow"},
                                      "then": {"rate": "1/120"}}],
                      "default": {"rate": "2/1"}}],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def send(port: int, rcpt: str, n: int = 1) -> None:
    with smtplib.SMTP(HOST, port, timeout=10) as smtp:
        for i in range(n):
            smtp.sendmail("s@x.test", [rcpt], f"Subject: m{i}\r\n\r\nx\r\n".encode())


def summary(startup: Path) -> str:
    out = run_cli("queue", "summary", "--startup", str(startup))
    assert out.returncode == 0, out.stderr
    return out.stdout


def wait_for(check, what: str, timeout: float = 20.0, detail=None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}"
                                 + (f":\n{detail()}" if detail else ""))
        time.sleep(0.2)


def test_waits_and_suspensions_in_metrics_and_summary(ferrymail_proc, tmp_path: Path):
    port, mport = free_port(), free_port()
    with smtp_sink() as sink:
        start_yaml = startup_yaml(tmp_path, [server("in", [listener(port)])],
                                  metrics=f"{HOST}:{mport}")
        proc = ferrymail_proc(start_yaml, running(sink.port, free_port()),
                              wait=[(HOST, port), (HOST, mport)])
        startup = proc.startup_path
        assert startup is not None
        before = samples(scrape(mport)[1])
        assert total(before, "ferrymail_suspensions_active") == 0
        assert total(before, "ferrymail_cluster_state") == 0  # no cluster section: all 0
        assert ("ferrymail_policy_waits_total", (("kind", "suspension"),)) in before

        # A binding rate: 6 messages at 2/s, the later ones wait in memory, all delivered.
        send(port, "u@fast.test", N_FAST)
        assert len(sink.wait_dumps(N_FAST, timeout=30)) == N_FAST
        # One per 120 s: the second message is parked in the spool with the rate's reason.
        send(port, "u@slow.test", 2)

        add = run_cli("suspend", "add", "--startup", str(startup),
                      "--field", "transportid=susp", "--duration", "10m",
                      "--reason", "abuse desk")
        assert add.returncode == 0, add.stderr
        send(port, "u@susp.test")

        def rows() -> dict[str, str] | None:
            text = summary(startup)
            lines = {d: line for line in text.splitlines()
                     for d in ("slow.test", "susp.test") if f" {d} " in line}
            ok = ("rate 1/120 for transportid=slow: next slot in"
                  in lines.get("slow.test", "") and "suspended until" in lines.get("susp.test", ""))
            return lines if ok else None

        lines = wait_for(rows, "queue summary to name the rate and the suspension",
                         detail=lambda: summary(startup))
        assert re.search(r"suspended until \S+ \(abuse desk; transportid=susp\)",
                         lines["susp.test"]), lines
        final = samples(scrape(mport)[1])
        assert total(final, "ferrymail_suspensions_active") == 1
        waits = {k: total(final, "ferrymail_policy_waits_total", kind=k) -
                 total(before, "ferrymail_policy_waits_total", kind=k)
                 for k in ("rate", "suspension", "concurrency")}
        assert waits["rate"] >= 2 and waits["suspension"] >= 1, waits
        assert waits["concurrency"] == 0, waits
        # Labels stay bounded: no domain or key in any policy-wait sample.
        assert all(dict(lab).keys() == {"kind"} for (n, lab) in final
                   if n == "ferrymail_policy_waits_total")
        assert proc.proc.poll() is None


def test_cluster_state_gauge_follows_a_stopped_redis(ferrymail_proc, tmp_path: Path):
    require("redis-server")
    port, mport = free_port(), free_port()
    with redis_server() as r, smtp_sink() as sink:
        doc = yaml.safe_load(startup_yaml(tmp_path, [server("in", [listener(port)])],
                                          metrics=f"{HOST}:{mport}"))
        doc["cluster"] = {"redis": r.url, "instance": "m1", "heartbeat": 0.1, "timeout": 0.3}
        proc = ferrymail_proc(yaml.safe_dump(doc), running(sink.port, free_port()),
                              wait=[(HOST, port), (HOST, mport)])
        startup = proc.startup_path
        assert startup is not None

        def state() -> dict[str, float]:
            values = samples(scrape(mport)[1])
            return {s: total(values, "ferrymail_cluster_state", state=s)
                    for s in ("shared", "split", "local", "closed")}

        def moved(name: str) -> float:
            return total(samples(scrape(mport)[1]), "ferrymail_cluster_transitions_total",
                         state=name)

        wait_for(lambda: state() == {"shared": 1, "split": 0, "local": 0, "closed": 0},
                 "the shared state")
        shared_before = moved("shared")
        # The dashboard's shaping panels query names this daemon exposes (test_metrics checks
        # the whole dashboard against a daemon without a cluster).
        exposed = {n for n, _ in samples(scrape(mport)[1])}
        dashboard = DASHBOARD.read_text()
        for name in ("ferrymail_policy_waits_total", "ferrymail_suspensions_active",
                     "ferrymail_cluster_state", "ferrymail_cluster_transitions_total"):
            assert name in dashboard and name in exposed, name
        send(port, "u@dead.test")  # stays deferred: a group for the summary to explain
        proc.wait_log(r"event=delivery\.\S+ .*result=deferred", timeout=20)

        r.stop()
        wait_for(lambda: state()["split"] == 1, "the split state")
        assert state()["shared"] == 0
        assert moved("split") >= 1
        line = wait_for(lambda: next((x for x in summary(startup).splitlines()
                                      if " dead.test " in x), None), "the dead.test group")
        assert "redis unreachable: split 1/1" in line, line

        r.restart()
        wait_for(lambda: state()["shared"] == 1, "the shared state again")
        assert moved("shared") >= shared_before + 1
        assert "redis unreachable" not in summary(startup)
        assert proc.proc.poll() is None

