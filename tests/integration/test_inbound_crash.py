"""Crash safety: every "250 queued as X" given out before a SIGKILL is in the spool after it."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

from tests.integration.conftest import (
    listener,
    running_yaml,
    server,
    spool_messages,
    startup_yaml,
)
from tests.realpeers import free_port

HOST = "127.0.0.1"
CLIENTS = 8
MAX_MESSAGES = 2000
MAX_SECONDS = 2.0
KILL_AFTER = 0.8
QUEUED = re.compile(rb"250 2\.0\.0 OK queued as ([0-9a-f]{16})\r\n")
BODY = b"Subject: crash test\r\n\r\n" + (b"z" * 76 + b"\r\n") * 26  # about 2 KB


def client(port: int, acked: list[str], lock: threading.Lock, stop: threading.Event) -> None:
    """Send messages (pipelined MAIL/RCPT/DATA) until told to stop or the server dies."""
    try:
        sock = socket.create_connection((HOST, port), timeout=5)
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220")
        sock.sendall(b"EHLO crash.test\r\n")
        while (line := f.readline()).startswith(b"250-"):
            pass
        while not stop.is_set():
            with lock:
                if len(acked) >= MAX_MESSAGES:
                    return
            sock.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            for expect in (b"250", b"250", b"354"):
                line = f.readline()
                if not line.startswith(expect):
                    return
            sock.sendall(BODY + b".\r\n")
            line = f.readline()
            m = QUEUED.match(line)
            if m is None:
                return
            with lock:
                acked.append(m.group(1).decode())
    except OSError:
        return  # the server was killed under us


def test_every_acknowledged_message_survives_sigkill(ferrymail_proc, tmp_path: Path):
    port = free_port()
    proc = ferrymail_proc(startup_yaml(tmp_path, [server("s", [listener(port)])]),
                          running_yaml(["s"]), wait=[(HOST, port)])
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(port, acked, lock, stop), daemon=True)
               for _ in range(CLIENTS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    while time.monotonic() - started < KILL_AFTER:
        time.sleep(0.05)
        with lock:
            if len(acked) >= MAX_MESSAGES // 2:
                break
    proc.kill()  # SIGKILL, mid-load
    stop.set()
    for t in threads:
        t.join(MAX_SECONDS + 5)
    with lock:
        recorded = list(acked)
    assert recorded, "no message was acknowledged before the kill"
    stored = {m.queue_id for m in spool_messages(tmp_path / "spool")}
    missing = [q for q in recorded if q not in stored]
    assert not missing, f"{len(missing)} of {len(recorded)} acknowledged messages lost"
