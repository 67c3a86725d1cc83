"""The ``ferrymail`` command around the inbound side: run, config check, reload, queue list,
pidfile, graceful stop, dual-stack listeners."""

from __future__ import annotations

import re
import smtplib
import socket
import time
from pathlib import Path

import pytest

from ferrymail.proxy import encode_v1
from tests.integration.conftest import (
    listener,
    run_cli,
    running_yaml,
    server,
    spool_messages,
    startup_yaml,
)
from tests.realpeers import free_port

HOST = "127.0.0.1"


def rcpt_reply(port: int, rcpt: str, header: bytes = b"") -> int:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(header)
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"HELO t\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<" + rcpt.encode() + b">\r\n")
        f.readline()
        f.readline()
        return int(f.readline()[:3])


def test_config_check_ok_and_errors(tmp_path: Path):
    good_s = tmp_path / "startup.yaml"
    good_r = tmp_path / "running.yaml"
    good_s.write_text(startup_yaml(tmp_path, [server("s", [listener(2600)])]))
    good_r.write_text(running_yaml(["s"]))
    out = run_cli("config", "check", str(good_s), str(good_r))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [f"{good_s}: OK", f"{good_r}: OK"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("servers:\n  - id: s\n    listeners:\n      - port: 99999\n")
    out = run_cli("config", "check", str(bad), str(good_r))
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"{bad}:4: servers[0].listeners[0].port: ")
    assert f"{good_r}: OK" in lines


def test_run_with_bad_config_exits_2_naming_file_and_line(tmp_path: Path):
    bad = tmp_path / "startup.yaml"
    bad.write_text("servers:\n  - id: s\n    listeners:\n      - port: 25\n"
                   "        proxyprotocol: maybe\n")
    out = run_cli("run", "--startup", str(bad), cwd=tmp_path)
    assert out.returncode == 2
    assert f"{bad}:5: servers[0].listeners[0].proxyprotocol:" in out.stderr


def test_reload_swaps_running_config_and_keeps_it_on_error(ferrymail_proc, tmp_path: Path):
    port = free_port()
    startup = startup_yaml(tmp_path, [server("s", [listener(port)])])
    proc = ferrymail_proc(startup, running_yaml(["s"], relay_networks=[]), wait=[(HOST, port)])
    pidfile = tmp_path / "ferrymail.pid"
    assert int(pidfile.read_text()) == proc.pid
    assert rcpt_reply(port, "u@other.test") == 554

    # a session open across the reload sees the new config at its next RCPT
    live = smtplib.SMTP(HOST, port, timeout=5)
    live.ehlo("t")
    live.mail("a@x.test")
    assert live.rcpt("u@other.test")[0] == 554

    assert proc.running_path is not None
    proc.running_path.write_text(
        running_yaml(["s"], domains=["example.com", "other.test"], relay_networks=[]))
    out = run_cli("reload", "--startup", str(proc.startup_path))
    assert out.returncode == 0, out.stderr
    assert f"pid {proc.pid}" in out.stdout
    proc.wait_log("event=config.reloaded")
    assert rcpt_reply(port, "u@other.test") == 250
    assert live.rcpt("u@other.test")[0] == 250
    live.quit()

    # a broken file: logged with file and line, the last good config stays
    proc.running_path.write_text(
        "servers:\n  - id: s\n    transport: nowhere\ntransportgroups:\n  - id: g\n")
    proc.reload()
    line = proc.wait_log("event=config.reload_failed")[0]
    assert "level=error" in line and f"file={proc.running_path}" in line and "line=3" in line
    assert "nowhere" in line
    assert rcpt_reply(port, "u@other.test") == 250
    assert proc.proc.poll() is None

    assert proc.stop() == 0
    assert not pidfile.exists()


def test_reload_without_running_instance(tmp_path: Path):
    startup = tmp_path / "startup.yaml"
    startup.write_text(startup_yaml(tmp_path, [server("s", [listener(2600)])]))
    out = run_cli("reload", "--startup", str(startup))
    assert out.returncode == 1
    assert "cannot read pidfile" in out.stderr


def test_queue_list_shows_proxied_client(ferrymail_proc, tmp_path: Path):
    port = free_port()
    startup = startup_yaml(tmp_path, [server("p", [listener(port, proxy=True)],
                                             trusted_proxies=["127.0.0.0/8"])])
    proc = ferrymail_proc(startup, running_yaml(["p"]), wait=[(HOST, port)])
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(encode_v1(("45.33.68.55", 54321), ("1.1.1.1", 25)))
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO t\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<u1@example.com>\r\n"
                  b"RCPT TO:<u2@example.com>\r\nDATA\r\n")
        while not (last := f.readline()).startswith(b"354"):
            assert last.startswith(b"250"), last
        s.sendall(b"Subject: q\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        queued = f.readline()
        assert queued.startswith(b"250 2.0.0 OK queued as ")
        qid = queued.split()[-1].decode()
    assert proc.stop() == 0
    out = run_cli("queue", "list", "--startup", str(proc.startup_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head = next(x for x in lines if x.startswith(qid))
    assert "<s@x.test>" in head and "client=45.33.68.55" in head
    for rcpt in ("u1@example.com", "u2@example.com"):  # held by the test's hook: deferred
        assert any(re.match(rf"    <{rcpt}>  (queued|deferred)", x) for x in lines), lines
    assert lines[-1] == "1 message(s)"


def test_graceful_stop_lets_a_transaction_finish(ferrymail_proc, tmp_path: Path):
    port = free_port()
    proc = ferrymail_proc(startup_yaml(tmp_path, [server("s", [listener(port)])]),
                          running_yaml(["s"]), wait=[(HOST, port)])
    busy = socket.create_connection((HOST, port), timeout=5)
    idle = socket.create_connection((HOST, port), timeout=5)
    fb, fi = busy.makefile("rb"), idle.makefile("rb")
    assert fb.readline().startswith(b"220") and fi.readline().startswith(b"220")
    busy.sendall(b"HELO t\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                 b"Subject: in flight\r\n\r\n")
    for _ in range(4):
        fb.readline()
    proc.proc.terminate()
    proc.wait_log("event=app.stopping")
    assert fi.readline().startswith(b"421 4.3.2")  # idle sessions are told at once
    time.sleep(0.2)
    busy.sendall(b"the rest\r\n.\r\n")
    assert fb.readline().startswith(b"250 2.0.0 OK queued as ")
    assert fb.readline().startswith(b"421 4.3.2")
    assert proc.proc.wait(10) == 0
    assert len(spool_messages(tmp_path / "spool")) == 1


def test_listener_without_address_is_dual_stack(ferrymail_proc, tmp_path: Path):
    port = free_port()
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", port))
        except OSError:
            pytest.skip("no usable ::1 here (or the port is taken there)")
    proc = ferrymail_proc(startup_yaml(tmp_path, [server("s", [listener(port, address=None)])]),
                          running_yaml(["s"]), wait=[(HOST, port)])
    for host in ("127.0.0.1", "::1"):
        with smtplib.SMTP(host, port, timeout=5) as smtp:
            smtp.sendmail("a@x.test", ["b@example.com"], b"Subject: dual\r\n\r\nhi\r\n")
    assert proc.stop() == 0
    clients = sorted(m.envelope.client_ip for m in spool_messages(tmp_path / "spool"))
    assert clients == ["127.0.0.1", "::1"]


def test_run_without_options_uses_embedded_defaults(ferrymail_proc, tmp_path: Path):
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind((HOST, 2525))
        except OSError:
            pytest.skip("127.0.0.1:2525 is in use")
    proc = ferrymail_proc(None, None, wait=[(HOST, 2525)])
    with smtplib.SMTP(HOST, 2525, timeout=5) as smtp:  # loopback may relay by default
        smtp.sendmail("a@x.test", ["b@anywhere.test"], b"Subject: default\r\n\r\nhi\r\n")
    line = proc.wait_log("event=smtp.transaction ")[0]
    assert "server=default" in line and "rcpts=<b@anywhere.test>" in line
    assert 'reply="250 2.0.0 OK queued as ' in line
    assert proc.stop() == 0
    # (the embedded running config delivers it at once, so the spool is not inspected here)
    assert (tmp_path / "var" / "spool" / "spool.db").exists()


def test_second_instance_fails_clearly(ferrymail_proc, tmp_path: Path):
    port = free_port()
    startup = startup_yaml(tmp_path, [server("s", [listener(port)])])
    first = ferrymail_proc(startup, running_yaml(["s"]), wait=[(HOST, port)])
    args = ["run", "--startup", str(first.startup_path), "--running", str(first.running_path)]
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 1
    assert "level=error event=app.start_failed" in out.stderr
    assert f"already running (pid {first.pid}" in out.stderr
    # another pidfile and port, same spool: the spool is locked (listeners are bound first,
    # before privileges are dropped and the spool opened, so the port must differ here)
    other = tmp_path / "other.yaml"
    other.write_text(startup.replace(str(tmp_path / "ferrymail.pid"), str(tmp_path / "2.pid"))
                     .replace(f"port: {port}", f"port: {free_port()}"))
    out = run_cli("run", "--startup", str(other), "--running", str(first.running_path),
                  cwd=tmp_path)
    assert out.returncode == 1
    assert "event=app.start_failed" in out.stderr and "in use by another process" in out.stderr
    assert not (tmp_path / "2.pid").exists()
    # another spool too: the port is taken
    other.write_text(startup.replace(str(tmp_path / "ferrymail.pid"), str(tmp_path / "2.pid"))
                     .replace(str(tmp_path / "spool"), str(tmp_path / "spool2")))
    out = run_cli("run", "--startup", str(other), "--running", str(first.running_path),
                  cwd=tmp_path)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert int((tmp_path / "ferrymail.pid").read_text()) == first.pid  # not clobbered
    assert first.proc.poll() is None
