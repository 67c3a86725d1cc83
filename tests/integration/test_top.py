"""``ferrymail top`` under tmux (a private tmux server: send-keys, capture-pane) against a
running daemon with delivered and deferred mail: the pane shows the live figures."""

from __future__ import annotations

import re
import shlex
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ferrymail_command, listener, server, startup_yaml
from tests.realpeers import free_port, smtp_sink

HOST = "127.0.0.1"


def running(ok: int, dead: int) -> str:
    return f"""
servers:
  - {{id: in, transport: ok, domains: [ok.test, dead.test], relay_networks: [127.0.0.0/8]}}
routing: [{{recipientdomain: dead.test, transport: dead}}]
transportgroups:
  - id: g
    retry: {{count: 30, intervals: [3600]}}
    transports:
      - {{id: ok, connection: {{server: {HOST}, port: {ok}}}}}
      - {{id: dead, connection: {{server: {HOST}, port: {dead}, timeout: {{connect: 2}}}}}}
"""


def test_top_shows_live_figures_in_tmux(ferrymail_proc, tmp_path: Path):
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed")
    port, dead, mport = free_port(), free_port(), free_port()
    sock = f"fm-top-{port}"  # a tmux server of our own: never touches anyone else's

    def tm(*args: str) -> str:
        return subprocess.run([tmux, "-L", sock, *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout

    with smtp_sink() as ok:
        proc = ferrymail_proc(startup_yaml(tmp_path, [server("in", [listener(port)])],
                                           metrics=f"{HOST}:{mport}"),
                              running(ok.port, dead), wait=[(HOST, port)])
        assert proc.startup_path is not None
        cmd = " ".join(shlex.quote(a) for a in ferrymail_command(
            "top", "--startup", str(proc.startup_path)))
        tm("new-session", "-d", "-s", "top", "-x", "160", "-y", "60", f"cd {tmp_path} && {cmd}")
        try:
            with smtplib.SMTP(HOST, port, timeout=10) as smtp:
                for i in range(3):
                    smtp.sendmail("s@x.test", [f"u{i}@ok.test"], b"Subject: t\r\n\r\nx\r\n")
                smtp.sendmail("s@x.test", ["d@dead.test"], b"Subject: d\r\n\r\nx\r\n")
            ok.wait_dumps(3)
            proc.wait_log("event=delivery.error .*result=deferred")
            deadline = time.monotonic() + 20
            pane = ""
            while time.monotonic() < deadline:
                pane = tm("capture-pane", "-p", "-t", "top")
                if (re.search(r"received 4\b", pane) and re.search(r"delivered 3\b", pane)
                        and "dead.test" in pane and "connect" in pane.lower()):
                    break
                time.sleep(0.5)
            assert re.search(r"received 4\b", pane), pane
            assert re.search(r"delivered 3\b", pane) and re.search(r"deferred 1\b", pane), pane
            assert "top destinations" in pane and "retry at" in pane, pane
            assert re.search(r"dead\s.*dead\.test", pane), pane
            assert "errors (last minute)" in pane and "network" in pane, pane
            tm("send-keys", "-t", "top", "C-c")
            time.sleep(0.5)
        finally:
            subprocess.run([tmux, "-L", sock, "kill-server"], capture_output=True, timeout=10)
