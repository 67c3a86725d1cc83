"""Service integration against a real daemon: sd_notify over a real NOTIFY_SOCKET datagram
socket (READY, RELOADING, STOPPING), and log lines as JSON to a file reopened on SIGUSR1, or
to syslog (a datagram socket standing in for /dev/log)."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import (
    ferrymail_command,
    listener,
    run_cli,
    running_yaml,
    server,
    startup_yaml,
)
from tests.realpeers import free_port

HOST = "127.0.0.1"


def dgram_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(15)
    return sock


def receive_until(sock: socket.socket, pred: Callable[[str], bool]) -> list[str]:
    got = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        got.append(sock.recv(65536).decode())
        if pred(got[-1]):
            return got
    raise AssertionError(f"no matching datagram in {got}")


def test_sd_notify_ready_reloading_stopping(ferrymail_proc, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch):
    notify = dgram_socket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    port = free_port()
    proc = ferrymail_proc(startup_yaml(tmp_path, [server("s", [listener(port)])]),
                          running_yaml(["s"]), wait=[(HOST, port)])
    first = receive_until(notify, lambda m: "READY=1" in m)[-1]
    assert first.splitlines() == ["READY=1", "STATUS=running"]
    assert proc.startup_path is not None and proc.running_path is not None
    assert run_cli("reload", "--startup", str(proc.startup_path)).returncode == 0
    reload_msgs = receive_until(notify, lambda m: "READY=1" in m)
    lines = reload_msgs[0].splitlines()
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert "STATUS=running; configuration reloaded" in reload_msgs[-1]
    proc.running_path.write_text("servers: [{id: s, transport: nowhere}]\n")
    assert run_cli("reload", "--startup", str(proc.startup_path)).returncode == 2
    refused = receive_until(notify, lambda m: "READY=1" in m)
    assert refused[0].startswith("RELOADING=1") and "reload refused" in refused[-1]
    proc.proc.send_signal(signal.SIGTERM)
    assert receive_until(notify, lambda m: "STOPPING=1" in m)[-1] == "STOPPING=1"
    assert proc.proc.wait(15) == 0
    notify.close()


def _start(tmp_path: Path, logging: dict, port: int) -> subprocess.Popen:
    doc = yaml.safe_load(startup_yaml(tmp_path, [server("s", [listener(port)])]))
    doc["environment"]["logging"].update(logging)
    (tmp_path / "startup.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "running.yaml").write_text(running_yaml(["s"]))
    return subprocess.Popen(
        ferrymail_command("run", "--startup", str(tmp_path / "startup.yaml"), "--running",
                          str(tmp_path / "running.yaml")),
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_file(path: Path, text: str, proc: subprocess.Popen) -> list[str]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text().splitlines()
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}")


def test_json_log_file_reopened_on_sigusr1(tmp_path: Path):
    port = free_port()
    log_file = tmp_path / "ferrymail.log"
    proc = _start(tmp_path, {"format": "json", "destination": "file", "file": str(log_file)},
                  port)
    try:
        lines = _wait_file(log_file, '"event": "app.started"', proc)
        for line in lines:
            doc = json.loads(line)
            assert {"ts", "level", "event"} <= set(doc)
        with smtplib.SMTP(HOST, port, timeout=10) as smtp:
            smtp.sendmail("a@x.test", ["b@example.com"], b"Subject: j\r\n\r\nx\r\n")
        lines = _wait_file(log_file, '"event": "smtp.transaction"', proc)
        tx = next(json.loads(x) for x in lines if '"smtp.transaction"' in x)
        assert tx["rcpts"] == "<b@example.com>" and tx["reply"].startswith("250 2.0.0 OK")
        # logrotate: move the file away, SIGUSR1, new lines go to a new file
        rotated = tmp_path / "ferrymail.log.1"
        log_file.rename(rotated)
        proc.send_signal(signal.SIGUSR1)
        _wait_file(log_file, '"event": "log.reopened"', proc)
        assert '"log.reopened"' not in rotated.read_text()
        assert proc.stderr is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert '"event": "app.stopped"' in log_file.read_text()
    assert proc.stderr.read() == b""  # nothing went to stderr


def _parent(pid: int) -> int:
    """The parent pid of ``pid`` (from /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_syslog_destination(tmp_path: Path):
    port = free_port()
    sock = dgram_socket(tmp_path / "log.sock")
    proc = _start(tmp_path, {"destination": "syslog", "syslog_socket": str(tmp_path / "log.sock"),
                             "syslog_facility": "local3"}, port)
    try:
        got = receive_until(sock, lambda m: "event=app.started" in m)
        # local3 = 19, info = 6: PRI 19 * 8 + 6; the tag names the process that logged
        # (with several workers, by default, a worker: a child of `run`)
        m = re.match(r"<158>ferrymail\[(\d+)\]: ts=", got[-1])
        assert m, got[-1]
        pid = int(m.group(1))
        assert pid == proc.pid or _parent(pid) == proc.pid, (pid, proc.pid)
        proc.send_signal(signal.SIGTERM)
        receive_until(sock, lambda m: "event=app.stopped" in m)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
