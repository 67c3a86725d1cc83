"""Issue 7 inbound items against a real ``ferrymail run``: a pipelined bad number after DATA,
the slow client (item 10), connection limits (item 9), HELO and Received: (item 5), and the
start/`config check` warnings (items 14, 18)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from ferrymail.proxy import encode_v1, encode_v2
from ferrymail.smtp.protocol import Reply, ReplyParser
from tests.integration.conftest import (
    listener,
    run_cli,
    running_yaml,
    server,
    spool_count,
    spool_get,
    spool_messages,
    startup_yaml,
)
from tests.realpeers import free_port


class Client:
    """A blocking SMTP client that sends exactly the bytes it is given."""

    def __init__(self, port: int, *, source: str | None = None, prefix: bytes = b"",
                 host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        if prefix:
            self.sock.sendall(prefix)
        self.parser = ReplyParser()
        self.pending: list[Reply] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Reply:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.pending += self.parser.feed(data)
        return self.pending.pop(0)

    def replies(self, n: int) -> list[Reply]:
        return [self.reply() for _ in range(n)]

    def closed_without_reply(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _start(ferrymail_proc, tmp_path: Path, port: int, *, proxy: bool = False,
           **extra) -> object:
    cfg = startup_yaml(tmp_path, [server("in", [listener(port, proxy=proxy)], **extra)])
    return ferrymail_proc(cfg, running_yaml(["in"], relay_networks=["127.0.0.0/8"]),
                          wait=[("127.0.0.1", port)])


def test_pipelined_non_ascii_size_after_end_of_data_gets_the_250_of_the_stored_message(
        ferrymail_proc, tmp_path):
    port = free_port()
    fm = _start(ferrymail_proc, tmp_path, port)
    c = Client(port)
    try:
        assert c.reply().code == 220
        c.send(b"EHLO client.test\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<r@example.com>\r\n"
               b"DATA\r\n")
        assert [r.code for r in c.replies(4)] == [250, 250, 250, 354]
        c.send("Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<a@b.example> SIZE=\u00b2\r\n"
               "BDAT \u0665 LAST\r\nQUIT\r\n".encode())
        got = c.replies(4)
        assert [r.code for r in got] == [250, 501, 501, 221]
        assert "queued as" in got[0].text
    finally:
        c.close()
    assert spool_count(tmp_path / "spool") == 1
    assert not [ln for ln in fm.logs() if " level=error " in ln]


def _trickle(port: int, setup: bytes, setup_replies: int, drip: bytes, interval: float,
             limit: float, out: dict) -> None:
    c = Client(port, timeout=limit + 5)
    try:
        c.reply()
        c.send(setup)
        c.replies(setup_replies)
        start = time.monotonic()
        for i in range(int(limit / interval)):
            try:
                c.send(drip[i % len(drip): i % len(drip) + 1])
            except OSError:
                break
            time.sleep(interval)
            c.sock.setblocking(False)
            try:
                data = c.sock.recv(4096)
            except BlockingIOError:
                data = None
            finally:
                c.sock.setblocking(True)
            if data is not None:
                out["reply"] = data
                break
        out["after"] = time.monotonic() - start
    finally:
        c.close()


def test_slow_client_meets_a_deadline_in_data_and_in_a_command(ferrymail_proc, tmp_path):
    # Issue 7 item 10: one byte every 1.5 s kept DATA alive for ever with timeouts.data: 2.
    # That input in DATA, and a byte every 0.5 s within one command line (both inside the
    # 2 s idle timers), must end in 421 at the deadline: 2 s plus 1/500 s per byte.
    port = free_port()
    fm = _start(ferrymail_proc, tmp_path, port,
                timeouts={"command": 2, "data": 2, "min_data_rate": 500})
    data: dict = {}
    command: dict = {}
    threads = [
        threading.Thread(target=_trickle, args=(
            port, b"EHLO c.test\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<r@example.com>\r\n"
                  b"DATA\r\n", 4, b"slow body line ", 1.5, 9.0, data)),
        threading.Thread(target=_trickle, args=(
            port, b"EHLO c.test\r\n", 1, b"NOOP" + b"o" * 100, 0.5, 9.0, command)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for got in (data, command):
        assert got.get("reply", b"").startswith(b"421 4.4.2"), got
        assert 1.5 <= got["after"] <= 5.0, got
    lines = fm.wait_log(r"event=smtp\.timeout .*kind=deadline", count=2)
    assert any("phase=data" in ln for ln in lines) and any("phase=command" in ln for ln in lines)
    assert spool_count(tmp_path / "spool") == 0


def test_idle_timeout_without_deadline_keeps_trickling_clients(ferrymail_proc, tmp_path):
    # timeouts.deadline: false restores pure idle timers (the old behaviour, now a choice).
    port = free_port()
    _start(ferrymail_proc, tmp_path, port, timeouts={"command": 1.5, "deadline": False})
    out: dict = {}
    _trickle(port, b"EHLO c.test\r\n", 1, b"NOOP" + b"o" * 100, 0.4, 3.0, out)
    assert "reply" not in out and out["after"] >= 2.5  # past the 1.5 s timeout


def test_connection_limits_per_client_and_per_server(ferrymail_proc, tmp_path):
    # Issue 7 item 9: 3,000 idle connections from one client were all accepted. Small
    # limits here: 3 per client, 5 in all; the refused get 421 and a rate-limited log line.
    port = free_port()
    fm = _start(ferrymail_proc, tmp_path, port,
                limits={"connections": 5, "connections_per_client": 3})
    clients: list[Client] = []
    try:
        for _ in range(3):
            clients.append(Client(port, source="127.0.0.1"))
            assert clients[-1].reply().code == 220
        extra = Client(port, source="127.0.0.1")
        r = extra.reply()
        assert (r.code, r.enhanced) == (421, (4, 7, 0)) and "your address" in r.text
        assert extra.closed_without_reply()
        extra.close()
        for _ in range(2):
            clients.append(Client(port, source="127.0.0.2"))
            assert clients[-1].reply().code == 220
        for _ in range(4):  # the server is full: everyone gets 421, one log line for all
            full = Client(port, source="127.0.0.3")
            r = full.reply()
            assert r.code == 421 and "too many connections" in r.text
            full.close()
        clients.pop(0).close()  # a slot frees up
        deadline = time.monotonic() + 10
        while True:
            again = Client(port, source="127.0.0.1")
            r = again.reply()
            if r.code == 220 or time.monotonic() > deadline:
                break
            again.close()
            time.sleep(0.05)
        assert r.code == 220
        clients.append(again)
        again.send(b"QUIT\r\n")
        assert again.reply().code == 221
    finally:
        for c in clients:
            c.close()
    per_client = fm.wait_log(r"event=smtp\.limits\.connections .*limit=connections_per_client")
    per_server = fm.wait_log(r"event=smtp\.limits\.connections .*limit=connections ")
    assert len(per_client) == 1 and "refused=1" in per_client[0]
    assert len(per_server) == 1 and "refused=1" in per_server[0]  # the other 3: next line


def test_proxied_listener_limits_the_proxy_reported_client(ferrymail_proc, tmp_path):
    port = free_port()
    fm = _start(ferrymail_proc, tmp_path, port, proxy=True,
                trusted_proxies=["127.0.0.0/8"],
                limits={"connections": 4, "connections_per_client": 2})
    dst = ("127.0.0.1", port)
    clients: list[Client] = []
    try:
        for header in (encode_v1(("192.0.2.1", 1000), dst),
                       encode_v2(("192.0.2.1", 1001), dst)):
            clients.append(Client(port, prefix=header))
            assert clients[-1].reply().code == 220
        third = Client(port, prefix=encode_v1(("192.0.2.1", 1002), dst))
        r = third.reply()
        assert r.code == 421 and "your address" in r.text
        third.close()
        for i in range(2):  # another client behind the same proxy is not affected
            clients.append(Client(port, prefix=encode_v1(("198.51.100.7", 2000 + i), dst)))
            assert clients[-1].reply().code == 220
        # the server is full: nothing may be said before a PROXY header, so a silent close
        full = Client(port)
        assert full.closed_without_reply()
        full.close()
    finally:
        for c in clients:
            c.close()
    fm.wait_log(r"event=smtp\.limits\.connections .*client=192\.0\.2\.1:1002")
    fm.wait_log(r"event=smtp\.limits\.connections .*limit=connections ")


def test_helo_is_validated_and_an_accepted_one_cannot_forge_received(ferrymail_proc,
                                                                      tmp_path):
    forged = ("a.example (b.example [192.0.2.7]) by trusted.example; "
              "Mon, 1 Jan 2024 00:00:00 +0000")
    port, port2 = free_port(), free_port()
    cfg = startup_yaml(tmp_path, [server("strict", [listener(port)]),
                                  server("lenient", [listener(port2)],
                                         policy={"helo": "accept"})])
    ferrymail_proc(cfg, running_yaml(["strict", "lenient"]),
                   wait=[("127.0.0.1", port), ("127.0.0.1", port2)])
    c = Client(port)
    try:
        c.reply()
        c.send(f"HELO {forged}\r\n".encode())
        assert c.reply().code == 501
    finally:
        c.close()
    c = Client(port2)
    try:
        c.reply()
        c.send(f"HELO {forged}\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<r@example.com>\r\n"
               f"DATA\r\n".encode())
        assert [r.code for r in c.replies(4)] == [250, 250, 250, 354]
        c.send(b"Subject: t\r\n\r\nx\r\n.\r\n")
        assert c.reply().code == 250
    finally:
        c.close()
    (msg,) = spool_messages(tmp_path / "spool")
    _, data = spool_get(tmp_path / "spool", msg.queue_id)
    received = data.split(b"\r\n\r\n", 1)[0].split(b"\r\nSubject:")[0].decode()
    assert received.startswith("Received: from [127.0.0.1] (port ")
    assert received.count(";") == 1 and "by trusted.example" not in received
    assert "helo=a.example%20%28b.example%20[192.0.2.7]%29%20by%20trusted.example%3B" in received


def test_config_check_warns_about_default_trusted_proxies_and_short_hostnames(tmp_path):
    port = free_port()
    body = startup_yaml(tmp_path, [server("in", [listener(port, proxy=True)])])
    plain = tmp_path / "startup.yaml"
    plain.write_text(body.replace("mx.ferrymail.test", "localhost"))
    res = run_cli("config", "check", str(plain))
    assert res.returncode == 0, res.stdout + res.stderr
    warnings = [ln for ln in res.stdout.splitlines() if ": warning: " in ln]
    assert len(warnings) == 2, res.stdout
    text = plain.read_text().splitlines()
    proxied = next(w for w in warnings if "trusted_proxies" in w)
    line = int(proxied.split(":")[1])
    assert proxied.startswith(f"{plain}:{line}: servers[0].listeners[0].proxyprotocol: ")
    assert text[line - 1].strip().startswith("proxyprotocol:")
    host = next(w for w in warnings if "environment.hostname" in w)
    assert "localhost" in host and "fully qualified" in host
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text(startup_yaml(tmp_path, [server("in", [listener(port, proxy=True)],
                                                      trusted_proxies=["10.1.0.0/16"])]))
    res = run_cli("config", "check", str(trusted))
    assert res.returncode == 0 and ": warning: " not in res.stdout, res.stdout


def test_a_non_fqdn_hostname_is_a_startup_warning(ferrymail_proc, tmp_path):
    port = free_port()
    cfg = startup_yaml(tmp_path, [server("in", [listener(port)])]).replace(
        "mx.ferrymail.test", "localhost")
    fm = ferrymail_proc(cfg, running_yaml(["in"]), wait=[("127.0.0.1", port)])
    (line,) = fm.wait_log(r"event=config\.hostname")
    assert "level=warning" in line and "hostname=localhost" in line


@pytest.mark.parametrize("name", ["mx.example.com", "mx.ferrymail.test"])
def test_an_fqdn_hostname_gives_no_warning(name):
    from ferrymail.app import is_fqdn

    assert is_fqdn(name)
    assert not any(is_fqdn(n) for n in ("localhost", "localhost.localdomain", "vm",
                                        "127.0.0.1", "::1", "host.localdomain"))


def test_grammar_items_through_a_proxied_listener(ferrymail_proc, tmp_path):
    # Items 2, 3, 4, 6, 7 end to end; the client is the PROXY-reported address, so the
    # routed-address rule is judged on it (127.0.0.0/8 may relay, 203.0.113.5 may not).
    port = free_port()
    _start(ferrymail_proc, tmp_path, port, proxy=True, trusted_proxies=["127.0.0.0/8"],
           limits={"recipients": 2, "errors": 4})
    dst = ("127.0.0.1", port)

    def run(client: str, data: bytes, n: int) -> list[int]:
        c = Client(port, prefix=encode_v1((client, 5000), dst))
        try:
            assert c.reply().code == 220
            c.send(data)
            out = []
            for _ in range(n):
                try:
                    out.append(c.reply().code)
                except EOFError:
                    break
            return out
        finally:
            c.close()

    head = b"EHLO c.test\r\nMAIL FROM:<a@b.example> SMTPUTF8\r\n"
    routed = (b"RCPT TO:<user%other.net@example.com>\r\nRCPT TO:<other.net!user@example.com>\r\n"
              b'RCPT TO:<"user@other.net"@example.com>\r\nQUIT\r\n')
    assert run("203.0.113.5", head + routed, 6) == [250, 250, 550, 550, 550, 221]
    assert run("127.0.0.1", head + routed, 6) == [250, 250, 250, 250, 452, 221]
    assert run("127.0.0.1", head + b"RCPT TO:<postmaster@[IPV6:::1]>\r\n"
               b"RCPT TO:<x@[ipv6:2001:db8::9]>\r\nQUIT\r\n", 5) == [250, 250, 250, 250, 221]
    assert run("203.0.113.5", head + "RCPT TO:<user@example.com\u00a0>\r\n"
               "RCPT TO:<user@example.com\u3000>\r\nQUIT\r\n".encode(), 5) == [
        250, 250, 501, 501, 221]
    assert run("203.0.113.5", b"EHLO x\nMAIL FROM:<a@b.example>\n", 3) == [521]
    many = b"".join(f"RCPT TO:<r{i}@example.com>\r\n".encode() for i in range(10))
    assert run("203.0.113.5", head + many, 12) == [250, 250, 250, 250, 452, 452, 452, 452, 421]


def test_a_flood_of_idle_connections_from_one_client_is_bounded(ferrymail_proc, tmp_path):
    # The 3,000 idle connections, scaled down: 200 from one address with a limit of
    # 20. Exactly 20 get a banner, 180 a 421, and the log gets one line, not 180.
    port = free_port()
    fm = _start(ferrymail_proc, tmp_path, port, limits={"connections_per_client": 20})
    socks = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
        banners = [ReplyParser().feed(s.recv(512))[0].code for s in socks]
    finally:
        for s in socks:
            s.close()
    assert banners.count(220) == 20 and banners.count(421) == 180
    time.sleep(0.3)
    lines = [ln for ln in fm.logs() if "event=smtp.limits.connections " in ln]
    assert len(lines) == 1 and "refused=1 " in lines[0]
