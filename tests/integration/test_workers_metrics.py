"""``ferrymail run --workers 2``: one scrape of ``metrics.listen`` shows the whole host, and
``ferrymail top`` / ``ferrymail queue summary`` show host totals (observe/hostmetrics.py).

Real processes throughout: the supervisor and its two workers, smtp-source and smtplib as
clients (the kernel spreads connections over the workers through SO_REUSEPORT, so the test
sends until both workers have mail, bounded in count), Postfix's smtp-sink as the next hop.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from ferrymail.observe.hostmetrics import WorkerPeer, fetch
from tests.integration.conftest import (
    ferrymail_command,
    listener,
    run_cli,
    server,
    sink_running_yaml,
    spool_count,
    startup_yaml,
)
from tests.realpeers import free_port, require, smtp_sink

HOST = "127.0.0.1"
RECEIVED = "ferrymail_messages_received_total"
DELIVERED = "ferrymail_delivery_recipients_total"


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(HOST, port, timeout=20)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def value(text: str, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and want <= set(s.labels.items()))


def scrape(port: int) -> str:
    status, text = get(port, "/metrics")
    assert status == 200, text
    return text


def own_metrics(sock: Path) -> str:
    """What one worker reports alone (GET /v1/metrics on its admin socket)."""
    return asyncio.run(fetch(WorkerPeer(1, socket_path=str(sock)), "/v1/metrics", 10)).decode()


def send_one(port: int, i: int) -> None:
    with smtplib.SMTP(HOST, port, timeout=10) as c:
        c.sendmail("s@client.test", [f"u{i}@example.com"], b"Subject: m\r\n\r\nbody\r\n")


def worker_pid(proc, index: int, nth: int = -1) -> int:
    return [int(m.group(1)) for line in proc.logs()
            if (m := re.search(rf"event=worker\.started worker={index} pid=(\d+)", line))][nth]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def test_one_scrape_shows_the_host_across_a_pause_and_a_crash(ferrymail_proc, tmp_path: Path):
    source = require("smtp-source")
    port, mport = free_port(), free_port()
    spool = tmp_path / "spool"
    w0_sock, w1_sock = tmp_path / "ferrymail.sock", tmp_path / "ferrymail.w1.sock"
    with smtp_sink() as sink:
        startup = yaml.safe_load(startup_yaml(tmp_path, [server("in", [listener(port)])],
                                              metrics=f"{HOST}:{mport}"))
        startup["metrics"]["worker_timeout"] = "500ms"
        deliver = sink_running_yaml(sink.port)
        held = yaml.safe_load(deliver)
        held["queues"] = {"hold": True}
        proc = ferrymail_proc(yaml.safe_dump(startup), yaml.safe_dump(held),
                              wait=[(HOST, port), (HOST, mport)], workers=2)
        proc.wait_log("event=supervisor.started", timeout=30)
        # only worker 0 binds the metrics port
        assert len([ln for ln in proc.logs() if "event=metrics.listening" in ln]) == 1

        load = subprocess.run([source, "-c", "-m", "40", "-s", "4", "-f", "s@client.test",
                               "-t", "u@example.com", f"{HOST}:{port}"],
                              capture_output=True, timeout=60)
        assert load.returncode == 0, load.stderr
        sent = 40
        while not (spool_count(spool) and spool_count(spool / "shard-1")):
            assert sent < 300, "300 connections never reached both workers"
            send_one(port, sent)
            sent += 1

        # counters: the host's equal what was sent and the sum of what each worker says
        text = scrape(mport)
        alone = [value(own_metrics(s), RECEIVED) for s in (w0_sock, w1_sock)]
        assert value(text, RECEIVED, server="in") == sent == sum(alone)
        assert min(alone) > 0
        assert value(text, "ferrymail_worker_up", worker="0") == 1
        assert value(text, "ferrymail_worker_up", worker="1") == 1
        status, body = get(mport, "/ready")
        assert status == 200 and "worker 0 ready\nworker 1 ready\n" in body, body

        # gauges that count add up (the queue snapshot is refreshed every 5 s)
        deadline = time.monotonic() + 20
        while value(scrape(mport), "ferrymail_queue_messages") != sent:
            assert time.monotonic() < deadline, scrape(mport)
            time.sleep(0.3)

        # the operator's views: host totals, one summary row for the destination
        out = run_cli("queue", "summary", "--json", "--startup", str(proc.startup_path),
                      cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)["queues"]
        assert [(r["domain"], r["messages"]) for r in rows] == [("example.com", sent)], rows
        out = subprocess.run(ferrymail_command("top", "--once", "--startup",
                                               str(proc.startup_path)),
                             capture_output=True, text=True, timeout=30,
                             env=dict(os.environ, COLUMNS="160"))
        assert out.returncode == 0, out.stderr
        assert f"received {sent}" in out.stdout and "workers 2/2" in out.stdout, out.stdout

        # release: everything is delivered, counted once, also with scrapes overlapping
        # while the counters move (two Prometheus servers): every series only grows
        stop = threading.Event()
        seen: list[list[float]] = [[] for _ in range(4)]

        def scraper(out: list[float]) -> None:
            while not stop.is_set() and len(out) < 200:
                out.append(value(scrape(mport), DELIVERED, result="delivered"))

        threads = [threading.Thread(target=scraper, args=(out,)) for out in seen]
        for t in threads:
            t.start()
        assert proc.running_path is not None
        proc.running_path.write_text(deliver)
        proc.reload()
        proc.wait_log("event=config.reloaded", count=2, timeout=15)
        sink.wait_dumps(sent, timeout=60)
        stop.set()
        for t in threads:
            t.join(30)
        for out in seen:
            assert out == sorted(out) and out[-1] <= sent, out
        deadline = time.monotonic() + 15
        while value(text := scrape(mport), DELIVERED, result="delivered") != sent:
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert sum(value(own_metrics(s), DELIVERED, result="delivered")
                   for s in (w0_sock, w1_sock)) == sent

        # a worker that hangs: the scrape still answers, within the worker timeout
        w1 = worker_pid(proc, 1)
        os.kill(w1, signal.SIGSTOP)
        try:
            started = time.monotonic()
            text = scrape(mport)
            took = time.monotonic() - started
            assert value(text, "ferrymail_worker_up", worker="1") == 0
            assert value(text, RECEIVED) == sent  # its counters are kept meanwhile
            assert took < 5, took  # 0.5 s timeout, generous margin for a shared machine
            assert value(text, "ferrymail_worker_scrape_failures_total", worker="1") >= 1
            status, body = get(mport, "/ready")
            assert status == 503 and "worker 1 not answering" in body, body
        finally:
            os.kill(w1, signal.SIGCONT)
        proc.wait_log(r"event=metrics\.worker_down worker=1", timeout=5)
        deadline = time.monotonic() + 15
        while value(text := scrape(mport), "ferrymail_worker_up", worker="1") != 1:
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        started_1 = value(text, "ferrymail_worker_start_time_seconds", worker="1")

        # kill -9: the scrape answers at once, worker 1 down, host counters unchanged
        os.kill(w1, signal.SIGKILL)
        while not gone(w1):
            time.sleep(0.01)
        text = scrape(mport)  # the supervisor restarts it 0.5 s after its death at the soonest
        assert value(text, "ferrymail_worker_up", worker="1") == 0, text
        assert value(text, RECEIVED) == sent
        assert value(text, DELIVERED, result="delivered") == sent
        proc.wait_log(r"event=worker\.started worker=1 ", count=2, timeout=30)
        deadline = time.monotonic() + 30
        while value(text := scrape(mport), "ferrymail_worker_up", worker="1") != 1:
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        # restarted: its own counters start again at 0, the host's continue
        assert value(text, "ferrymail_worker_start_time_seconds", worker="1") > started_1
        assert value(own_metrics(w1_sock), RECEIVED) == 0
        assert value(text, RECEIVED) == sent
        more = 0
        while value(own_metrics(w1_sock), RECEIVED) == 0:
            assert more < 300, "300 connections never reached the restarted worker"
            send_one(port, sent + more)
            more += 1
        sink.wait_dumps(sent + more, timeout=60)
        deadline = time.monotonic() + 15
        while value(text := scrape(mport), DELIVERED, result="delivered") != sent + more:
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert value(text, RECEIVED) == sent + more
        assert value(text, "ferrymail_worker_up") == 2

        # kill -9 of worker 0, which serves the listener: scrapes fail until the supervisor
        # has started it again; then the host counters go on from where they were (its
        # carry is kept in the spool directory), its own start again at 0
        total = sent + more
        w0 = worker_pid(proc, 0)
        os.kill(w0, signal.SIGKILL)
        while not gone(w0):
            time.sleep(0.01)
        proc.wait_log(r"event=worker\.started worker=0 ", count=2, timeout=30)
        proc.wait_log(r"event=metrics\.state_restored", timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                text = scrape(mport)
                if value(text, "ferrymail_worker_up") == 2:
                    break
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "worker 0 did not serve metrics again"
            time.sleep(0.2)
        assert value(own_metrics(w0_sock), RECEIVED) == 0
        assert value(text, RECEIVED) == total
        assert value(text, DELIVERED, result="delivered") == total
        send_one(port, total)  # whichever worker takes it, the host counts it once more
        sink.wait_dumps(total + 1, timeout=60)
        deadline = time.monotonic() + 15
        while value(text := scrape(mport), DELIVERED, result="delivered") != total + 1:
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert value(text, RECEIVED) == total + 1


def _two_free_ports() -> int:
    """A port P with P + 1 free too (worker 1's own metrics port), tried a bounded number of
    times."""
    import socket

    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind((HOST, p + 1))
            except OSError:
                continue
        return p
    raise AssertionError("no two consecutive free ports in 50 tries")


def test_worker_listen_gives_each_worker_its_own_port_too(ferrymail_proc, tmp_path: Path):
    port, mport = free_port(), _two_free_ports()
    startup = yaml.safe_load(startup_yaml(tmp_path, [server("in", [listener(port)])],
                                          metrics=f"{HOST}:{mport}"))
    startup["metrics"]["worker_listen"] = True
    held = yaml.safe_load(sink_running_yaml(free_port()))
    held["queues"] = {"hold": True}
    proc = ferrymail_proc(yaml.safe_dump(startup), yaml.safe_dump(held),
                          wait=[(HOST, port), (HOST, mport), (HOST, mport + 1)], workers=2)
    proc.wait_log("event=supervisor.started", timeout=30)
    sent = 0
    while not spool_count(tmp_path / "spool" / "shard-1"):
        assert sent < 300, "300 connections never reached worker 1"
        send_one(port, sent)
        sent += 1
    host, alone = scrape(mport), scrape(mport + 1)
    assert value(host, RECEIVED) == sent
    assert 0 < value(alone, RECEIVED) == value(own_metrics(tmp_path / "ferrymail.w1.sock"),
                                               RECEIVED)
    assert "ferrymail_worker_up" in host and "ferrymail_worker_up" not in alone
