"""``ferrymail proxy status`` on a single instance (no ``cluster.redis``): the health lives in
the daemon and is read through the admin API (``GET /v1/proxies``). A proxy nobody listens
on, with an active check, is suspended before any mail goes to it; a live one stays up."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.integration.conftest import listener, run_cli, server, startup_yaml
from tests.realpeers import free_port


def running(dead: int, live: int) -> str:
    return f"""
servers:
  - {{id: in, transport: t, domains: [dest.test], relay_networks: [127.0.0.0/8]}}
addresses:
  - {{id: a1, address: 127.0.0.21,
      proxyprotocol: {{server: 127.0.0.1, port: {dead}, check: {{interval: 0.5, timeout: 0.5}}}}}}
  - {{id: b1, address: 127.0.0.31,
      proxyprotocol: {{server: 127.0.0.1, port: {live}, check: {{interval: 0.5, timeout: 0.5}}}}}}
transportgroups:
  - id: g
    transports:
      - id: t
        connection: {{server: 127.0.0.1, port: 25, sourceip: {{ipv4: [a1, b1]}}}}
queues: {{hold: true}}
"""


def test_single_instance_status_through_the_admin_api(ferrymail_proc, tmp_path: Path) -> None:
    port, dead, live = free_port(), free_port(), free_port()
    proxy = socket.create_server(("127.0.0.1", live))  # accepts: the TCP check passes
    try:
        proc = ferrymail_proc(startup_yaml(tmp_path, [server("in", [listener(port)])]),
                              running(dead, live), wait=[("127.0.0.1", port)])
        deadline = time.monotonic() + 15
        while True:
            status = run_cli("proxy", "status", "--startup", str(proc.startup_path),
                             "--running", str(proc.running_path))
            assert status.returncode == 0, status.stderr
            rows = {tuple(line.split()[:3]) for line in status.stdout.splitlines()[1:]}
            if (f"127.0.0.1:{dead}", "*", "suspended") in rows:
                break
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.3)
        assert status.stdout.startswith("PROXY")
        assert (f"127.0.0.1:{live}", "*", "up") in rows, status.stdout
        assert (f"127.0.0.1:{live}", "127.0.0.31", "up") in rows, status.stdout
        assert proc.stop() == 0
        # no daemon: says where the health lives, exits non-zero
        gone = run_cli("proxy", "status", "--startup", str(proc.startup_path),
                       "--running", str(proc.running_path))
        assert gone.returncode == 1 and "lives in the running daemon" in gone.stderr
    finally:
        proxy.close()
