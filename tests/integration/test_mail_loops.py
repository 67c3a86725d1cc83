"""Mail loops (issue 7 item 15): two real ferrymail instances forwarding to each other stop
at ``hop_limit`` with 5.4.6 and exactly one DSN; a next hop that is our own listener is
refused before connecting."""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.integration.conftest import listener, server, startup_yaml
from tests.integration.outbound_harness import _DNSProtocol
from tests.realpeers import free_port, smtp_sink

HOP_LIMIT = 6
MESSAGE = "From: s@sender.test\r\nTo: u@loop.test\r\nSubject: round and round\r\n\r\nhi\r\n"


def running(next_port: int, sink_port: int, hop_limit: int = HOP_LIMIT) -> str:
    """Accept loop.test and relay it to 127.0.0.1:next_port; DSNs go to the sink."""
    return f"""
servers:
  - {{id: in, transport: loop, domains: [loop.test], relay_networks: [127.0.0.0/8]}}
hop_limit: {hop_limit}
transportgroups:
  - id: g
    transports:
      - id: loop
        connection: {{server: 127.0.0.1, port: {next_port}, tls: {{mode: disabled}}}}
        dsn: {{transport: bounce}}
      - id: bounce
        connection: {{server: 127.0.0.1, port: {sink_port}, tls: {{mode: disabled}}}}
"""


def submit(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.sendmail("s@sender.test", ["u@loop.test"], MESSAGE)


def delivered(text: str) -> int:
    return len(re.findall(r"event=delivery\.attempt .*transport=loop .*result=delivered", text))


def test_two_instances_forwarding_to_each_other_stop_at_hop_limit(tmp_path: Path,
                                                                   ferrymail_proc):
    port_a, port_b = free_port(), free_port()
    with smtp_sink() as sink:
        a = ferrymail_proc(startup_yaml(tmp_path / "a", [server("in", [listener(port_a)])]),
                           running(port_b, sink.port), workdir=tmp_path / "a",
                           wait=[("127.0.0.1", port_a)])
        b = ferrymail_proc(startup_yaml(tmp_path / "b", [server("in", [listener(port_b)])]),
                           running(port_a, sink.port), workdir=tmp_path / "b",
                           wait=[("127.0.0.1", port_b)])
        submit(port_a)
        (dsn,) = sink.wait_dumps(1, timeout=30)
        time.sleep(1.0)  # anything still circulating would reach the sink or a log by now
        assert len(sink.dumps()) == 1
        logs = a.log_text() + "\n" + b.log_text()
    failed = [line for line in logs.splitlines()
              if "event=delivery.error" in line and "kind=loop" in line]
    assert len(failed) == 1, logs
    assert "result=failed" in failed[0] and f"hop_limit {HOP_LIMIT}" in failed[0]
    # Received by A (1 hop), then each relay adds one: failed when the count reaches the limit.
    assert delivered(logs) == HOP_LIMIT - 1, logs
    assert dsn.mail_from == "<>" and dsn.rcpts == ["<s@sender.test>"]
    assert b"5.4.6" in dsn.raw and b"mail loop" in dsn.raw
    assert dsn.raw.count(b"round and round") >= 1  # the original is attached


def test_next_hop_that_is_our_own_listener_fails_before_connecting(tmp_path: Path,
                                                                    ferrymail_proc):
    port = free_port()
    with smtp_sink() as sink:
        p = ferrymail_proc(startup_yaml(tmp_path, [server("in", [listener(port)])]),
                           running(port, sink.port, hop_limit=50),
                           wait=[("127.0.0.1", port)])
        submit(port)
        (dsn,) = sink.wait_dumps(1, timeout=20)
        p.wait_log(r"event=delivery\.error .*kind=loop", timeout=10)
        logs = p.log_text()
    assert re.search(rf"event=delivery\.loop .*mx_ip=127\.0\.0\.1 port={port} "
                     rf"listener=127\.0\.0\.1:{port}", logs), logs
    assert "loops back to myself" in logs
    # Only the submission reached the listener: the engine never connected to itself.
    assert len(re.findall(r"event=smtp\.transaction ", logs)) == 1, logs
    assert b"5.4.6" in dsn.raw and b"loops back to myself" in dsn.raw


def test_wildcard_listener_matches_any_local_address(tmp_path: Path, ferrymail_proc):
    port = free_port()
    with smtp_sink() as sink:
        running_yaml = running(port, sink.port).replace("server: 127.0.0.1, port: " + str(port),
                                                         f"server: 127.0.0.9, port: {port}")
        p = ferrymail_proc(startup_yaml(tmp_path, [server("in", [listener(port, address=None)])]),
                           running_yaml, wait=[("0.0.0.0", port)])
        submit(port)
        (dsn,) = sink.wait_dumps(1, timeout=20)
        logs = p.log_text()
    assert re.search(rf"event=delivery\.loop .*mx_ip=127\.0\.0\.9 .*listener=\"?\*:{port}", logs)
    assert b"5.4.6" in dsn.raw


@contextlib.contextmanager
def dns_thread(zone: dict[tuple[str, str], list[str]]) -> Iterator[int]:
    """The harness's tiny authoritative DNS server, answered from a thread (the ferrymail
    process under test asks it while this test blocks)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    proto = _DNSProtocol(zone)
    proto.transport = sock  # type: ignore[assignment]  # only sendto() is used
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(4096)
            except TimeoutError:
                continue
            proto.datagram_received(data, addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_mx_that_resolves_to_our_own_listener(tmp_path: Path, ferrymail_proc):
    """MX 10 is us, MX 20 a backup: neither is better than us, so the message fails with
    5.4.6 before any connection (Postfix: "mail for loop.test loops back to myself")."""
    port = free_port()
    zone = {("loop.test.", "MX"): ["10 mx.loop.test.", "20 backup.loop.test."],
            ("mx.loop.test.", "A"): ["127.0.0.1"],
            ("backup.loop.test.", "A"): ["127.0.0.7"]}
    with smtp_sink() as sink, dns_thread(zone) as dns_port:
        running_yaml = running(port, sink.port).replace(
            "server: 127.0.0.1, port: " + str(port), f"port: {port}") + (
            f"resolver: {{nameservers: [127.0.0.1], port: {dns_port}, timeout: 2}}\n")
        p = ferrymail_proc(startup_yaml(tmp_path, [server("in", [listener(port)])]),
                           running_yaml, wait=[("127.0.0.1", port)])
        submit(port)
        (dsn,) = sink.wait_dumps(1, timeout=20)
        logs = p.log_text()
    assert re.search(rf"event=delivery\.loop .*mx=mx\.loop\.test mx_ip=127\.0\.0\.1 port={port} "
                     r".*preference=10 then=\"fail \(5\.4\.6\)\"", logs), logs
    assert len(re.findall(r"event=smtp\.transaction ", logs)) == 1, logs
    assert b"5.4.6" in dsn.raw and b"loops back to myself" in dsn.raw


def test_a_better_mx_than_ourselves_is_still_used(tmp_path: Path, ferrymail_proc):
    """MX 5 is another host, MX 10 is us: the message goes to MX 5 (only it is better)."""
    port = free_port()
    zone = {("loop.test.", "MX"): ["10 mx.loop.test.", "5 better.loop.test."],
            ("mx.loop.test.", "A"): ["127.0.0.1"],
            ("better.loop.test.", "A"): ["127.0.0.8"]}
    with smtp_sink() as bounces, smtp_sink("127.0.0.8", port) as better, \
            dns_thread(zone) as dns_port:
        running_yaml = running(port, bounces.port).replace(
            "server: 127.0.0.1, port: " + str(port), f"port: {port}") + (
            f"resolver: {{nameservers: [127.0.0.1], port: {dns_port}, timeout: 2}}\n")
        p = ferrymail_proc(startup_yaml(tmp_path, [server("in", [listener(port)])]),
                           running_yaml, wait=[("127.0.0.1", port)])
        submit(port)
        (dump,) = better.wait_dumps(1, timeout=20)
        p.wait_log(r"event=delivery\.attempt .*result=delivered", timeout=10)
        logs = p.log_text()
        assert bounces.dumps() == []
    assert dump.rcpts == ["<u@loop.test>"]
    assert re.search(r"event=delivery\.loop .*then=\"1 better MX host\(s\)\"", logs), logs
