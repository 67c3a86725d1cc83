"""HAProxy 2.6 in front of a proxied ferrymail listener, as in the seed's inbound section:
``server … check send-proxy`` (v1) and ``send-proxy-v2``. Mail through the frontend keeps the
real client address; a few seconds of health checks leave no warning in ferrymail's log."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import listener, running_yaml, server, spool_get, startup_yaml
from tests.realpeers import free_port, haproxy, require

HOST = "127.0.0.1"


def haproxy_config(frontend_port: int, backend_port: int, send_proxy: str) -> str:
    return f"""
global
    log stderr format raw local0 info
defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend smtp-inbound-frontend
    bind {HOST}:{frontend_port}
    mode tcp
    option tcplog
    default_backend smtp-inbound-backend
backend smtp-inbound-backend
    mode tcp
    server f1 {HOST}:{backend_port} check inter 300ms {send_proxy}
"""


@pytest.mark.parametrize("send_proxy, version", [("send-proxy", 1), ("send-proxy-v2", 2)])
def test_haproxy_frontend_with_health_checks(ferrymail_proc, tmp_path: Path, send_proxy: str,
                                             version: int):
    swaks = require("swaks")
    backend, frontend = free_port(), free_port()
    startup = startup_yaml(tmp_path, [server("viaproxy", [listener(backend, proxy=True)],
                                             trusted_proxies=["127.0.0.1/32"])], level="debug")
    proc = ferrymail_proc(startup, running_yaml(["viaproxy"], relay_networks=[]),
                          wait=[(HOST, backend)])
    with haproxy(haproxy_config(frontend, backend, send_proxy), [(HOST, frontend)]):
        started = time.monotonic()
        out = subprocess.run(
            [swaks, "--server", f"{HOST}:{frontend}", "--from", "<>", "--to",
             "user@example.com", "--helo", "swaks.test"],
            capture_output=True, timeout=30,
        )
        assert out.returncode == 0, out.stdout.decode()
        m = re.search(rb"250 2\.0\.0 OK queued as ([0-9a-f]{16})", out.stdout)
        assert m, out.stdout.decode()
        time.sleep(max(0.0, 2.2 - (time.monotonic() - started)))  # >= 2 s of health checks
    assert proc.stop() == 0
    env, data = spool_get(tmp_path / "spool", m.group(1).decode())
    assert env.client_ip == "127.0.0.1"  # swaks's address, as HAProxy reported it
    assert env.proxy is not None and env.proxy.version == version
    assert env.proxy.proxy_ip == "127.0.0.1"
    assert env.proxy.dest_port == frontend
    assert f"(via PROXY v{version} from 127.0.0.1)".encode() in data
    logs = proc.logs()
    assert proc.problems() == [], "\n".join(logs)
    # the checks did happen (debug lines, one per check connection), quietly
    checks = [x for x in logs if "event=smtp.disconnect" in x and "messages=0" in x]
    assert len(checks) >= 4, "\n".join(logs)
