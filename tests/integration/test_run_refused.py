"""A start that is refused says so without first claiming to listen."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import listener, run_cli, running_yaml, server, startup_yaml
from tests.realpeers import free_port

HOST = "127.0.0.1"


@pytest.mark.parametrize("taken", ["second listener", "second server"])
def test_a_port_in_use_refuses_the_start_without_a_listening_line(tmp_path: Path, taken):
    """With one process, ``smtp.listening`` came for each listener as it was bound, so a
    start refused at a later listener (its port held by another socket) logged the first as
    listening just before ``app.start_failed``."""
    free, busy = free_port(), free_port()
    if taken == "second listener":
        servers = [server("s", [listener(free), listener(busy)])]
    else:
        servers = [server("a", [listener(free)]), server("b", [listener(busy)])]
    with socket.create_server((HOST, busy)) as holder:
        assert holder.getsockname()[1] == busy
        out = run_cli("run", "--workers", "1",
                      "--startup", str(_write(tmp_path / "startup.yaml",
                                              startup_yaml(tmp_path, servers))),
                      "--running", str(_write(tmp_path / "running.yaml",
                                              running_yaml([s["id"] for s in servers]))),
                      cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "event=smtp.listening" not in out.stderr, out.stderr
    failed = [ln for ln in out.stderr.splitlines() if "event=app.start_failed" in ln]
    assert len(failed) == 1 and f"cannot listen on {HOST}:{busy}" in failed[0], out.stderr
    assert not (tmp_path / "ferrymail.pid").exists()
    with socket.create_server((HOST, free)):  # nothing kept the free one
        pass


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_spool_in_use_refuses_the_start_without_a_listening_line(tmp_path: Path):
    """The same for a spool directory another process holds (its flock): the listeners
    were bound and said so before the spool was opened and refused."""
    import fcntl
    import os

    port = free_port()
    spool = tmp_path / "spool"
    spool.mkdir()
    fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running spool holds it
        out = run_cli("run", "--workers", "1",
                      "--startup", str(_write(tmp_path / "startup.yaml", startup_yaml(
                          tmp_path, [server("s", [listener(port)])]))),
                      "--running", str(_write(tmp_path / "running.yaml", running_yaml(["s"]))),
                      cwd=tmp_path)
    finally:
        os.close(fd)
    assert out.returncode == 1, out.stderr
    assert "event=smtp.listening" not in out.stderr, out.stderr
    failed = [ln for ln in out.stderr.splitlines() if "event=app.start_failed" in ln]
    assert len(failed) == 1 and f"spool directory {spool} is in use by another process" \
        in failed[0], out.stderr
    assert not (tmp_path / "ferrymail.pid").exists()


def test_an_admin_port_in_use_refuses_the_start_without_a_listening_line(tmp_path: Path):
    """The same for ``admin.listen`` on a port another socket holds: the SMTP listeners
    were bound (and said so) before the admin API's, whose error did not name the key."""

    port, busy = free_port(), free_port()
    doc = yaml.safe_load(startup_yaml(tmp_path, [server("s", [listener(port)])]))
    doc["admin"] = {"listen": f"{HOST}:{busy}", "token": "t" * 24}
    with socket.create_server((HOST, busy)):
        out = run_cli("run", "--workers", "1",
                      "--startup", str(_write(tmp_path / "startup.yaml", yaml.safe_dump(doc))),
                      "--running", str(_write(tmp_path / "running.yaml", running_yaml(["s"]))),
                      cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "event=smtp.listening" not in out.stderr, out.stderr
    failed = [ln for ln in out.stderr.splitlines() if "event=app.start_failed" in ln]
    assert len(failed) == 1 and f"admin.listen: cannot listen on {HOST}:{busy}" in failed[0], \
        out.stderr
    with socket.create_server((HOST, port)):  # nothing kept the SMTP port
        pass
