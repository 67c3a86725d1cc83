"""``ferrymail run --workers N``: real worker processes behind one supervisor.

Every test runs the real command with two workers on loopback and, where mail leaves,
Postfix's smtp-sink as the next hop. Which worker takes a connection is up to the kernel, so
tests send until both shards have mail (bounded in count) instead of assuming a spread.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import (
    listener,
    run_cli,
    running_yaml,
    server,
    spool_count,
    spool_messages,
    startup_yaml,
)
from tests.realpeers import free_port, smtp_sink

HOST = "127.0.0.1"


def relay_rcpt(port: int, rcpt: str = "u@other.test") -> int:
    """One transaction on a fresh connection; the RCPT reply code (message sent if 250)."""
    with smtplib.SMTP(HOST, port, timeout=10) as c:
        c.ehlo("client.test")
        c.mail("a@client.test")
        code, _ = c.rcpt(rcpt)
        if code == 250:
            code2, _ = c.data(b"Subject: w\r\n\r\nbody\r\n")
            assert code2 == 250
        return code


def worker_pids(proc, index: int) -> list[int]:
    """Pids the supervisor logged for worker ``index``, oldest first."""
    return [int(m.group(1)) for line in proc.logs()
            if (m := re.search(rf"event=worker\.started worker={index} pid=(\d+)", line))]


def test_reload_reaches_every_worker_and_queue_list_sees_every_shard(ferrymail_proc,
                                                                     tmp_path: Path):
    port = free_port()
    spool = tmp_path / "spool"
    startup = startup_yaml(tmp_path, [server("s", [listener(port)])])
    proc = ferrymail_proc(startup, running_yaml(["s"], relay_networks=[]),
                          wait=[(HOST, port)], workers=2)
    proc.wait_log("event=supervisor.started", timeout=30)
    assert int((tmp_path / "ferrymail.pid").read_text()) == proc.pid
    assert len(worker_pids(proc, 0)) == len(worker_pids(proc, 1)) == 1
    for _ in range(10):  # no relaying yet, whichever worker answers
        assert relay_rcpt(port) == 554

    assert proc.running_path is not None
    proc.running_path.write_text(running_yaml(["s"]))  # relay for loopback, hold the queue
    out = run_cli("reload", "--startup", str(proc.startup_path), cwd=tmp_path)
    assert out.returncode == 0 and f"(pid {proc.pid})" in out.stdout, out.stderr
    proc.wait_log("event=config.reloaded", count=2, timeout=15)
    for _ in range(300):
        assert relay_rcpt(port) == 250  # no worker kept the old configuration
        if spool_count(spool) and spool_count(spool / "shard-1") >= 2:
            break
    else:
        pytest.fail("300 connections never reached both workers")

    # one log for all workers: each worker's lines say which worker wrote them
    txn = [line for line in proc.logs() if "event=smtp.transaction " in line]
    assert txn and all(re.search(r" worker=[01]$", line) for line in txn), txn[:3]
    assert {line[-1] for line in txn} == {"0", "1"}

    ids0 = [m.queue_id for m in spool_messages(spool)]
    ids1 = [m.queue_id for m in spool_messages(spool / "shard-1")]
    # queue ids never collide across shards: shard k hands out ids = k modulo 2
    assert all(int(q, 16) % 2 == 0 for q in ids0)
    assert all(int(q, 16) % 2 == 1 for q in ids1)
    out = run_cli("queue", "list", "--startup", str(proc.startup_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"{len(ids0) + len(ids1)} message(s)" in out.stdout
    listed = re.findall(r"^([0-9a-f]{16}) ", out.stdout, re.M)
    assert sorted(listed) == sorted(ids0 + ids1)
    # an action reaches the worker that holds the message (each serves NAME.wK.sock)
    assert (tmp_path / "ferrymail.w1.sock").exists()
    gone = ids1[0]
    out = run_cli("queue", "delete", "--id", gone, "--startup", str(proc.startup_path),
                  cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("1 message(s) deleted"), out
    shown = run_cli("queue", "show", ids1[-1] if len(ids1) > 1 else ids0[0], "--startup",
                    str(proc.startup_path), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    ids1 = [m.queue_id for m in spool_messages(spool / "shard-1")]
    assert gone not in ids1
    assert proc.stop() == 0
    assert not (tmp_path / "ferrymail.pid").exists()
    # a stop is not a crash: no warning that promises a restart
    stopping = proc.logs()
    stopping = stopping[next(i for i, line in enumerate(stopping)
                             if "event=app.stopping" in line):]
    exits = [line for line in stopping if re.search(r"event=(worker|limiter)\.exited ", line)]
    assert len(exits) == 3, stopping  # two workers and the limiter service
    assert all("level=info" in line and "restart_in" not in line and "why=stopping" in line
               for line in exits), exits

    # one worker now: shard-1's mail is kept, listed, and its being left alone is said
    single = ferrymail_proc(startup, running_yaml(["s"]), wait=[(HOST, port)], workers=1)
    single.wait_log(r"level=warning event=spool\.shard_unserved .*shard-1", timeout=10)
    out = run_cli("queue", "list", "--startup", str(proc.startup_path), cwd=tmp_path)
    assert f"{len(ids0) + len(ids1)} message(s)" in out.stdout
    # ... and said there too: no worker retries them (their "retry at" would mislead)
    unserved = (f"{len(ids1)} message(s) in {spool / 'shard-1'}: no running worker serves "
                "this shard; they wait until ferrymail runs with at least 2 workers")
    assert unserved in out.stdout, out.stdout
    out = run_cli("queue", "summary", "--startup", str(proc.startup_path), cwd=tmp_path)
    assert out.returncode == 0 and unserved in out.stdout, out
    # a listed message can be shown (read from its shard)
    shown = run_cli("queue", "show", ids1[0], "--startup", str(proc.startup_path),
                    cwd=tmp_path)
    assert shown.returncode == 0 and f"queue id:  {ids1[0]}" in shown.stdout, shown


def relay_to(sink_port: int) -> str:
    doc = {
        "servers": [{"id": "s", "transport": "out", "domains": ["example.com"],
                     "relay_networks": ["127.0.0.0/8"]}],
        "transportgroups": [{"id": "g", "connection": {"server": HOST, "port": sink_port},
                             "transports": [{"id": "out"}]}],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def test_sigkill_of_a_worker_under_load_loses_nothing_and_restarts_it(ferrymail_proc,
                                                                      tmp_path: Path):
    """Four clients send while worker 1 is SIGKILLed: every message that got its 250 reaches
    the sink (a duplicate is allowed: at-least-once), and the supervisor starts worker 1
    again on its shard."""
    port = free_port()
    with smtp_sink() as sink:
        startup = startup_yaml(tmp_path, [server("s", [listener(port)])])
        proc = ferrymail_proc(startup, relay_to(sink.port), wait=[(HOST, port)], workers=2)
        proc.wait_log("event=supervisor.started", timeout=30)
        victim = worker_pids(proc, 1)[0]

        acked: list[str] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + 40

        def client(t: int) -> None:
            for i in range(60):  # bounded in count and time
                if time.monotonic() > stop_at:
                    return
                mid = f"<w{t}-{i}@client.test>"
                try:
                    with smtplib.SMTP(HOST, port, timeout=10) as c:
                        c.sendmail("a@client.test", ["b@example.com"],
                                   f"Message-ID: {mid}\r\nSubject: x\r\n\r\nbody {i}\r\n")
                except (smtplib.SMTPException, OSError):
                    continue  # not acknowledged: the sender would retry
                with lock:
                    acked.append(mid)

        threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 30
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        # startup is not reloadable: a restarted worker uses the supervisor's, whatever
        # the file says by now
        assert proc.startup_path is not None
        proc.startup_path.write_text("servers: [this is not a startup file]\n")
        os.kill(victim, signal.SIGKILL)
        for th in threads:
            th.join(60)
        assert len(acked) >= 100, f"only {len(acked)} messages acknowledged"

        proc.wait_log(r"event=worker\.exited .*worker=1 .*status=\"?signal SIGKILL", timeout=10)
        proc.wait_log(r"event=worker\.started worker=1 ", count=2, timeout=20)
        new = worker_pids(proc, 1)[-1]
        assert new != victim
        os.kill(new, 0)  # alive

        deadline = time.monotonic() + 60
        while True:
            got = {str(d.message.get("Message-ID", "")).strip() for d in sink.dumps()}
            missing = [m for m in acked if m not in got]
            if not missing:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{len(missing)} acknowledged messages never delivered, e.g. "
                            f"{missing[:3]}:\n" + "\n".join(proc.logs()[-20:]))
            time.sleep(0.2)
        assert proc.stop() == 0


def test_a_worker_that_cannot_start_fails_the_command(tmp_path: Path):
    """The first start is all or nothing: a shard another process holds fails `run` at once
    with the reason, and no pidfile is left behind."""
    import fcntl

    port = free_port()
    startup = tmp_path / "startup.yaml"
    startup.write_text(startup_yaml(tmp_path, [server("s", [listener(port)])]))
    running = tmp_path / "running.yaml"
    running.write_text(running_yaml(["s"]))
    shard = tmp_path / "spool" / "shard-1"
    shard.mkdir(parents=True)
    fd = os.open(shard, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = run_cli("run", "--workers", "2", "--startup", str(startup), "--running",
                      str(running), cwd=tmp_path)
    finally:
        os.close(fd)
    assert out.returncode == 1
    assert "event=app.start_failed" in out.stderr
    assert f"spool directory {shard} is in use" in out.stderr
    assert not (tmp_path / "ferrymail.pid").exists()


def test_workers_option_and_key_are_validated(tmp_path: Path):
    out = run_cli("run", "--workers", "0", cwd=tmp_path)
    assert out.returncode == 2
    assert "not a positive number of workers" in out.stderr
    bad = tmp_path / "startup.yaml"
    bad.write_text("environment:\n  workers: 0\n")
    out = run_cli("config", "check", str(bad))
    assert out.returncode == 1
    assert out.stdout.startswith(f"{bad}:2: environment.workers: ")
    # a huge count would fork that many interpreters: refused before anything starts
    out = run_cli("run", "--workers", "100000", cwd=tmp_path)
    assert out.returncode == 2
    assert "at most 256 workers" in out.stderr
    assert not (tmp_path / "var").exists()
    bad.write_text("environment:\n  workers: 100000\n")
    out = run_cli("config", "check", str(bad))
    assert out.returncode == 1
    assert out.stdout.startswith(f"{bad}:2: environment.workers: ")
    assert "256" in out.stdout


def test_workers_drop_privileges_each_and_own_their_shards(ferrymail_proc):
    """environment.user with workers: the supervisor (root) binds, every worker runs as the
    user, and the shard directories belong to it."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to switch users)")
    world = Path(tempfile.mkdtemp(prefix="ferrymail-workers-priv-"))
    os.chmod(world, 0o755)
    try:
        port = free_port()
        doc = yaml.safe_load(startup_yaml(world, [server("s", [listener(port)])]))
        doc["environment"]["user"] = "nobody"
        proc = ferrymail_proc(yaml.safe_dump(doc), running_yaml(["s"]), wait=[(HOST, port)],
                              workdir=world, workers=2)
        proc.wait_log("event=supervisor.started", timeout=30)
        for index in (0, 1):
            uid = Path(f"/proc/{worker_pids(proc, index)[0]}/status").read_text()
            assert re.search(r"^Uid:\s+65534\s+65534\s+65534\s+65534$", uid, re.M), uid
        assert os.stat(f"/proc/{proc.pid}").st_uid == 0  # the supervisor forks the restarts
        for _ in range(50):
            assert relay_rcpt(port, "b@example.com") == 250
        for shard in (world / "spool", world / "spool" / "shard-1"):
            st = shard.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o700)
        # the limiter service runs as the user too, its socket the user's only
        service = int(proc.wait_log(r"event=limiter\.spawned pid=(\d+)")[0].rsplit("=", 1)[1])
        uid = Path(f"/proc/{service}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s+65534\s+65534\s+65534$", uid, re.M), uid
        sock = (world / "spool" / "limiter.sock").stat()
        assert (sock.st_uid, sock.st_mode & 0o777) == (65534, 0o600)
        proc.wait_log(r"event=limiter\.state state=shared ", count=2)
        assert proc.stop() == 0
    finally:
        shutil.rmtree(world, ignore_errors=True)


def test_a_second_instance_cannot_share_the_port(ferrymail_proc, tmp_path: Path):
    """Workers share their port through SO_REUSEPORT; another ferrymail (same user, other
    pidfile and spool) must still be refused the port, not silently get half the clients."""
    port = free_port()
    startup = startup_yaml(tmp_path, [server("s", [listener(port)])])
    first = ferrymail_proc(startup, running_yaml(["s"]), wait=[(HOST, port)], workers=2)
    first.wait_log("event=supervisor.started", timeout=30)
    other = tmp_path / "other.yaml"
    other.write_text(startup.replace(str(tmp_path / "ferrymail.pid"), str(tmp_path / "2.pid"))
                     .replace(str(tmp_path / "spool"), str(tmp_path / "spool2")))
    assert first.running_path is not None
    out = run_cli("run", "--workers", "2", "--startup", str(other), "--running",
                  str(first.running_path), cwd=tmp_path)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert not (tmp_path / "2.pid").exists()
    assert first.proc.poll() is None


def test_default_worker_count_is_the_cpus_with_host_wide_limits(ferrymail_proc,
                                                                  tmp_path: Path):
    """Without a count, `run` starts one worker per CPU, logs the count and why, and (with
    N >= 2, no cluster) the limiter service that keeps policies exact for the host;
    `environment.workers: 1` keeps one process."""
    from ferrymail.supervisor import default_workers

    cpus = default_workers()
    port = free_port()
    startup = startup_yaml(tmp_path, [server("s", [listener(port)])])
    running = running_yaml(["s"]) + "policies:\n  - fields: [localip]\n" \
                                    "    default: {concurrency: 2}\n"
    many = ferrymail_proc(startup, running, wait=[(HOST, port)], workers=None)
    many.wait_log(rf"event=supervisor\.workers workers={cpus} why=\"default: the CPUs ")
    if cpus > 1:
        many.wait_log("event=supervisor.started", timeout=30)
        many.wait_log(r"event=limiter\.started ")
        many.wait_log(r"event=limiter\.state state=shared .* worker=0", count=1)
        assert not many.wait_log(r"event=limiter\.state state=shared ", count=cpus)[cpus:]
    assert many.stop() == 0
    one = startup.replace("environment:\n", "environment:\n  workers: 1\n", 1)
    assert one != startup
    single = ferrymail_proc(one, running, wait=[(HOST, port)], workers=None)
    single.wait_log(r"event=supervisor\.workers workers=1 why=environment\.workers "
                    r"limits=in-process")
    assert not [ln for ln in single.logs() if " worker=" in ln or "event=limiter." in ln]
    assert single.stop() == 0


def test_top_and_queue_with_a_worker_that_does_not_answer(ferrymail_proc, tmp_path: Path):
    """A stopped worker (SIGSTOP: its socket accepts, nothing replies) costs `top` a short
    wait, and the frame names it; worker 0 not answering is a clear error, no traceback."""
    port = free_port()
    startup = startup_yaml(tmp_path, [server("s", [listener(port)])])
    proc = ferrymail_proc(startup, running_yaml(["s"]), wait=[(HOST, port)], workers=2)
    proc.wait_log("event=supervisor.started", timeout=30)
    w0, w1 = worker_pids(proc, 0)[-1], worker_pids(proc, 1)[-1]
    top = ("top", "--once", "--startup", str(proc.startup_path))
    os.kill(w1, signal.SIGSTOP)
    try:
        started = time.monotonic()
        out = run_cli(*top, cwd=tmp_path, timeout=60)
        took = time.monotonic() - started
        assert out.returncode == 0, out.stderr
        assert "workers 1/2" in out.stdout and "not answering: worker(s) 1 " in out.stdout, \
            out.stdout
        assert took < 8, f"top --once took {took:.1f}s with one worker stopped"
    finally:
        os.kill(w1, signal.SIGCONT)
    os.kill(w0, signal.SIGSTOP)
    try:
        out = run_cli(*top, cwd=tmp_path, timeout=60)
    finally:
        os.kill(w0, signal.SIGCONT)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("ferrymail top: ferrymail on ") and "did not answer" in \
        out.stderr, out.stderr
    out = run_cli(*top, cwd=tmp_path, timeout=60)  # both serve again
    assert out.returncode == 0 and "workers 2/2" in out.stdout, out


def test_queue_list_says_when_the_limiter_service_is_unreachable(ferrymail_proc,
                                                                  tmp_path: Path):
    """Each worker's host limiter state is on file like the Redis cluster's: `queue list`
    says the limits are host-wide, and which worker splits them while the service is gone
    (killed while the supervisor is stopped, so it cannot restart it yet)."""
    port = free_port()
    startup = startup_yaml(tmp_path, [server("s", [listener(port)])])
    proc = ferrymail_proc(startup, running_yaml(["s"]), wait=[(HOST, port)], workers=2)
    proc.wait_log("event=supervisor.started", timeout=30)
    proc.wait_log(r"event=limiter\.state state=shared ", count=2, timeout=10)
    qlist = ("queue", "list", "--startup", str(proc.startup_path))
    out = run_cli(*qlist, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "limiter: host-wide (limiter service), 2/2 worker(s) sharing" in out.stdout, out
    service = int(proc.wait_log(r"event=limiter\.spawned pid=(\d+)")[0].split("pid=")[1])
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        os.kill(service, signal.SIGKILL)
        proc.wait_log(r"event=limiter\.state state=fallback ", count=2, timeout=10)
        out = run_cli(*qlist, cwd=tmp_path)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert out.returncode == 0, out.stderr
    for k in (0, 1):
        assert re.search(rf"^limiter: service unreachable: worker {k} splits the limits 1/2 "
                         r"since \S+ \(", out.stdout, re.M), out.stdout
    proc.wait_log(r"event=limiter\.state state=shared previous=fallback", count=2, timeout=15)
    out = run_cli(*qlist, cwd=tmp_path)
    assert "limiter: host-wide (limiter service), 2/2 worker(s) sharing" in out.stdout, out
    left = (tmp_path / "spool" / "limiter-status.json").read_text()
    assert proc.stop() == 0
    assert not list(tmp_path.glob("spool/**/limiter-status.json"))
    # a file a SIGKILLed run left behind: nothing runs, so no limiter state is claimed
    (tmp_path / "spool" / "limiter-status.json").write_text(left)
    out = run_cli(*qlist, cwd=tmp_path)
    assert out.returncode == 0 and "limiter:" not in out.stdout, out
