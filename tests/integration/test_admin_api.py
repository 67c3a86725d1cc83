"""The admin API's access rules against a running daemon: the Unix socket's mode and peer
credentials (a real second user), and the TCP listener's bearer token."""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import yaml

from ferrymail.admin.client import AdminClient, AdminError
from tests.integration.conftest import listener, run_cli, running_yaml, server, startup_yaml
from tests.realpeers import free_port

HOST = "127.0.0.1"
TOKEN = "s3cret-token-0123456789"

def probe_as(uid: int, sock: Path) -> dict:
    """Connect to ``sock`` from a forked child running as ``uid``; what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec (the other user may not read this interpreter)
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            try:
                s.connect(str(sock))
            except OSError as e:
                result = {"connect": type(e).__name__}
            else:
                s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
                result = {"reply": s.recv(65536).decode().split("\r\n")[0]}
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def tcp_get(port: int, path: str, token: str | None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    return resp.status, body


def test_admin_socket_and_token(ferrymail_proc, tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a probe as another user")
    nobody = pwd.getpwnam("nobody").pw_uid
    port, admin_port = free_port(), free_port()
    startup = yaml.safe_load(startup_yaml(tmp_path, [server("s", [listener(port)])]))
    # a folder every user may enter (pytest's tmp_path is under a 0700 folder), so that only
    # the socket's own mode and the peer check stand between the other user and the API
    shared = Path(tempfile.mkdtemp(prefix="fm-admin-"))
    os.chmod(shared, 0o755)
    sock = shared / "admin.sock"
    startup["admin"] = {"socket": str(sock), "listen": f"{HOST}:{admin_port}", "token": TOKEN}
    proc = ferrymail_proc(yaml.safe_dump(startup), running_yaml(["s"]),
                          wait=[(HOST, port), (HOST, admin_port)])
    assert sock.stat().st_mode & 0o777 == 0o600

    # the daemon's own user (root here) is served
    status = AdminClient(socket_path=str(sock)).get("/v1/status")
    assert status["pid"] == proc.pid and status["servers"] == ["s"]
    # another user: refused by the socket's mode ...
    assert probe_as(nobody, sock) == {"connect": "PermissionError"}
    # ... and by its peer credentials if the mode is widened
    os.chmod(sock, 0o666)
    assert probe_as(nobody, sock) == {"reply": "HTTP/1.1 403 Forbidden"}
    proc.wait_log(rf"event=admin.refused .*peer_uid={nobody} ")

    # TCP: the bearer token is required and checked
    assert tcp_get(admin_port, "/v1/status", None)[0] == 401
    assert tcp_get(admin_port, "/v1/status", "wrong-token-wrong-token")[0] == 401
    code, body = tcp_get(admin_port, "/v1/status", TOKEN)
    assert code == 200 and body["pid"] == proc.pid
    client = AdminClient(tcp=(HOST, admin_port), token=TOKEN)
    routes = client.get("/v1/routes")
    assert "GET /v1/queue/summary" in routes and "POST /v1/queue/bounce" in routes
    with pytest.raises(AdminError) as err:
        client.get("/v1/nothing")
    assert err.value.status == 404
    with pytest.raises(AdminError) as err:
        client.request("DELETE", "/v1/status")
    assert err.value.status == 405
    with pytest.raises(AdminError) as err:
        client.get("/v1/queue", [("state", "lost")])
    assert err.value.status == 400 and "unknown state" in err.value.message
    with pytest.raises(AdminError) as err:
        client.post("/v1/queue/delete", {})
    assert err.value.status == 400 and "needs a filter" in err.value.message
    assert proc.stop() == 0
    assert not sock.exists()
    shared.rmdir()


def test_admin_socket_made_before_the_privilege_drop(ferrymail_proc):
    """With ``environment.user`` the socket is made while still root (its folder, the
    pidfile's, may be root's) and handed to the user; the CLI reaches the daemon through it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    nobody = pwd.getpwnam("nobody")
    shared = Path(tempfile.mkdtemp(prefix="fm-admin-user-"))
    try:
        os.chmod(shared, 0o755)  # root's: the user could not create the socket here itself
        port = free_port()
        doc = yaml.safe_load(startup_yaml(shared, [server("s", [listener(port)])]))
        doc["environment"]["user"] = "nobody"
        proc = ferrymail_proc(yaml.safe_dump(doc), running_yaml(["s"]), wait=[(HOST, port)],
                              workdir=shared)
        sock = shared / "ferrymail.sock"
        st = sock.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (nobody.pw_uid, 0o600)
        assert proc.startup_path is not None
        out = run_cli("queue", "list", "--json", "--startup", str(proc.startup_path))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"messages": [], "source": "daemon"}
        assert AdminClient(socket_path=str(sock)).get("/v1/status")["pid"] == proc.pid
        assert proc.stop() == 0
        # the user may not remove it from root's folder: the next start replaces it as stale
        again = ferrymail_proc(yaml.safe_dump(doc), running_yaml(["s"]), wait=[(HOST, port)],
                               workdir=shared)
        assert AdminClient(socket_path=str(sock)).get("/v1/status")["pid"] == again.pid
        assert again.stop() == 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)
