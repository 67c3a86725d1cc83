"""``/metrics`` scraped during a load against a real daemon: every counter moves as the spool
and the sinks say it should; a busy metrics port never stops the daemon; ``false`` turns the
listener off."""

from __future__ import annotations

import http.client
import json
import re
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    ferrymail_command,
    listener,
    server,
    spool_count,
    startup_yaml,
)
from tests.realpeers import free_port, require, smtp_sink

HOST = "127.0.0.1"
N_OK, N_DEAD, N_REJECT = 40, 3, 2


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(values: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in values.items() if n == name and want <= set(lab))


def running(ok: int, reject: int, dead: int) -> str:
    return f"""
servers:
  - {{id: in, transport: ok, domains: [ok.test, reject.test, dead.test],
      relay_networks: [127.0.0.0/8]}}
routing:
  - {{recipientdomain: reject.test, transport: reject}}
  - {{recipientdomain: dead.test, transport: dead}}
transportgroups:
  - id: g
    retry: {{count: 30, intervals: [3600]}}
    dsn: {{transport: ok}}
    transports:
      - {{id: ok, connection: {{server: {HOST}, port: {ok}}}}}
      - {{id: reject, connection: {{server: {HOST}, port: {reject}}}}}
      - {{id: dead, connection: {{server: {HOST}, port: {dead}, timeout: {{connect: 2}}}}}}
"""


def test_metrics_follow_the_spool_and_the_sinks(ferrymail_proc, tmp_path: Path):
    source = require("smtp-source")
    port, mport, dead = free_port(), free_port(), free_port()
    with smtp_sink() as ok, smtp_sink(extra=["-f", "."]) as reject:
        proc = ferrymail_proc(
            startup_yaml(tmp_path, [server("in", [listener(port)])],
                         metrics=f"{HOST}:{mport}"),
            running(ok.port, reject.port, dead), wait=[(HOST, port), (HOST, mport)])
        assert scrape(mport, "/healthy")[0] == 200
        assert scrape(mport, "/ready")[0] == 200
        during: list[dict] = []
        stop = threading.Event()

        def scraper() -> None:
            while not stop.is_set() and len(during) < 50:
                during.append(samples(scrape(mport)[1]))
                time.sleep(0.05)

        t = threading.Thread(target=scraper)
        t.start()
        load = subprocess.run(
            [source, "-c", "-m", str(N_OK), "-s", "4", "-f", "s@x.test", "-t", "u@ok.test",
             f"{HOST}:{port}"], capture_output=True, timeout=60)
        assert load.returncode == 0, load.stderr
        with smtplib.SMTP(HOST, port, timeout=10) as smtp:
            for i in range(N_DEAD):
                smtp.sendmail("s@x.test", [f"d{i}@dead.test"], b"Subject: dead\r\n\r\nx\r\n")
            for i in range(N_REJECT):
                smtp.sendmail("s@x.test", [f"r{i}@reject.test"], b"Subject: rej\r\n\r\nx\r\n")
        # delivered: the load plus one DSN per rejected message, all at the accepting sink
        sunk = len(ok.wait_dumps(N_OK + N_REJECT, timeout=60))
        proc.wait_log("event=delivery.error .*result=deferred", count=N_DEAD)
        stop.set()
        t.join(30)
        deadline = time.monotonic() + 15
        while True:  # the queue gauges are refreshed from the spool every 5 s
            final_text = scrape(mport)[1]
            final = samples(final_text)
            if total(final, "ferrymail_queue_messages", state="deferred") == N_DEAD or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.2)

    assert len(during) >= 2
    received = "ferrymail_messages_received_total"
    rcpts = "ferrymail_delivery_recipients_total"
    # counters only grow, and moved while the load ran
    for name in (received, rcpts):
        series = [total(s, name) for s in during] + [total(final, name)]
        assert series == sorted(series), (name, series)
    assert total(during[-1], received) > total(during[0], received) or \
        total(during[0], received) > 0
    assert total(final, received, server="in") == N_OK + N_DEAD + N_REJECT
    assert total(final, rcpts, result="delivered", transport="ok") == sunk == N_OK + N_REJECT
    assert total(final, rcpts, result="failed", transport="reject", kind="smtp") == N_REJECT
    assert total(final, "ferrymail_dsn_total", action="failed") == N_REJECT
    assert total(final, rcpts, result="deferred", transport="dead", kind="network") == N_DEAD
    assert total(final, "ferrymail_delivery_attempts_total") == N_OK + N_DEAD + 2 * N_REJECT
    # the gauges agree with the spool: only the dead-MX mail is left
    assert spool_count(tmp_path / "spool") == N_DEAD
    assert total(final, "ferrymail_queue_messages", state="deferred") == N_DEAD
    assert total(final, "ferrymail_queue_messages", state="queued") == 0
    assert total(final, "ferrymail_queue_oldest_seconds", state="deferred") > 0
    assert total(final, "ferrymail_spool_commit_seconds_count") >= N_OK + N_DEAD + N_REJECT
    assert total(final, "ferrymail_connections_open", direction="inbound") == 0
    # idle in the pool after the load: every open outbound connection is a pooled one
    pooled = total(final, "ferrymail_outbound_pooled_connections")
    assert pooled >= 1
    assert total(final, "ferrymail_outbound_connections_open", source="os",
                 proxy="direct") == pooled
    # sessions opened: every pooled one, at most one per attempt that reached a server
    opened = total(final, "ferrymail_outbound_connections_opened_total", source="os",
                   proxy="direct")
    assert pooled <= opened <= N_OK + 2 * N_REJECT, opened
    assert proc.stop() == 0
    exposed = {name for name, _ in final}  # with samples, plus families declared but empty
    for family in text_string_to_metric_families(final_text):
        exposed |= {family.name, f"{family.name}_total"}
    check_dashboard(exposed)


DASHBOARD = Path(__file__).parents[2] / "contrib" / "grafana-dashboard.json"


def check_dashboard(scraped: set[str]) -> None:
    """The Grafana dashboard's structure (the fields Grafana needs to import it) and that
    every metric its queries use is one the daemon exposes."""
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["title"], str) and isinstance(dash["uid"], str)
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 30
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    used: set[str] = set()
    for p in dash["panels"]:
        assert p["type"] in ("timeseries", "stat", "state-timeline", "table", "gauge")
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("x", "y", "w", "h"))
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["refId"] and t["expr"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), var
            used |= set(re.findall(r"\bferrymail_[a-z_]+", t["expr"]))
    assert used, "the dashboard queries no ferrymail metric"
    assert used <= scraped, f"not exposed: {sorted(used - scraped)}"


def test_busy_metrics_port_does_not_stop_the_daemon(ferrymail_proc, tmp_path: Path):
    mport = free_port()
    docs = []
    for i in range(2):
        port = free_port()
        doc = yaml.safe_load(startup_yaml(tmp_path / str(i), [server("in", [listener(port)])],
                                          metrics=f"{HOST}:{mport}"))
        docs.append((port, doc))
    running_doc = ("servers: [{id: in, transport: t, domains: [a.test]}]\n"
                   "transportgroups: [{id: g, transports: [{id: t}]}]\nqueues: {hold: true}\n")
    first = ferrymail_proc(yaml.safe_dump(docs[0][1]), running_doc, wait=[(HOST, docs[0][0])],
                           workdir=tmp_path / "0")
    first.wait_log("event=metrics.listening")
    second = ferrymail_proc(yaml.safe_dump(docs[1][1]), running_doc,
                            wait=[(HOST, docs[1][0])], workdir=tmp_path / "1")
    line = second.wait_log("event=metrics.unavailable")[0]
    assert "level=warning" in line and f"listen={HOST}:{mport}" in line
    with smtplib.SMTP(HOST, docs[1][0], timeout=10) as smtp:
        smtp.sendmail("s@x.test", ["u@a.test"], b"Subject: t\r\n\r\nx\r\n")
    assert spool_count(tmp_path / "1" / "spool") == 1
    assert scrape(mport)[0] == 200  # the first one still serves
    # metrics.listen: false: no listener at all
    off_port = free_port()
    third = ferrymail_proc(startup_yaml(tmp_path / "2", [server("in", [listener(off_port)])]),
                           running_doc, wait=[(HOST, off_port)], workdir=tmp_path / "2")
    assert "event=metrics.listening" not in third.log_text()
    for p in (first, second, third):
        assert p.stop() == 0


def test_proxy_down_in_metrics_and_queue_summary(ferrymail_proc, tmp_path: Path):
    port, mport, dead = free_port(), free_port(), free_port()
    running_doc = f"""
servers: [{{id: in, transport: px, domains: [px.test], relay_networks: [127.0.0.0/8]}}]
addresses:
  - {{id: p, address: 127.0.0.41, proxyprotocol: {{server: {HOST}, port: {dead}}}}}
transportgroups:
  - id: g
    retry: {{count: 30, intervals: [3600]}}
    transports:
      - {{id: px, connection: {{server: {HOST}, port: 25, sourceip: {{ipv4: [p]}},
                               timeout: {{connect: 2}}}}}}
"""
    proc = ferrymail_proc(startup_yaml(tmp_path, [server("in", [listener(port)])],
                                       metrics=f"{HOST}:{mport}"),
                          running_doc, wait=[(HOST, port), (HOST, mport)])
    values = samples(scrape(mport)[1])
    assert total(values, "ferrymail_proxy_up", proxy=f"{HOST}:{dead}") == 1
    with smtplib.SMTP(HOST, port, timeout=10) as smtp:
        smtp.sendmail("s@x.test", ["u@px.test"], b"Subject: p\r\n\r\nx\r\n")
    proc.wait_log(r"event=delivery.error .*kind=proxy .*result=deferred")
    values = samples(scrape(mport)[1])
    assert total(values, "ferrymail_proxy_up", proxy=f"{HOST}:{dead}") == 0
    assert total(values, "ferrymail_delivery_recipients_total", transport="px", source="p",
                 proxy=f"{HOST}:{dead}", result="deferred", kind="proxy") == 1
    assert proc.startup_path is not None
    out = subprocess.run(
        [*ferrymail_command("queue", "summary", "--json", "--startup", str(proc.startup_path))],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)["queues"]
    assert (row["transport"], row["domain"], row["source"]) == ("px", "px.test", "p")
    assert f"proxy down ({HOST}:{dead})" in row["why"], row
    assert any(w.startswith("retry at ") for w in row["why"]) and "proxy" in row["last_error"]
    assert proc.stop() == 0
