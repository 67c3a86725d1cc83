"""``ferrymail queue`` when what it prints comes from the spool rather than the daemon: it
says so, why, and how old the state files it shows are."""

from __future__ import annotations

import os
import re
import signal
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
    startup_yaml,
)
from tests.integration.test_workers import relay_rcpt, worker_pids
from tests.realpeers import free_port, redis_server, require

HOST = "127.0.0.1"


def test_queue_list_with_a_silent_worker_says_so_and_reads_the_spool(ferrymail_proc,
                                                                    tmp_path: Path):
    """A worker whose admin socket accepts but never answers (SIGSTOP) used to cost 30 s,
    after which the spool was read without a word. Now each worker has ``--timeout``
    seconds (5 by default) and stderr names the worker, the wait and the fallback."""
    port = free_port()
    spool = tmp_path / "spool"
    startup = startup_yaml(tmp_path, [server("s", [listener(port)])])
    proc = ferrymail_proc(startup, running_yaml(["s"]), wait=[(HOST, port)], workers=2)
    proc.wait_log("event=supervisor.started", timeout=30)
    for _ in range(200):  # the queue is held: mail stays in the shard that took it
        assert relay_rcpt(port) == 250
        if spool_count(spool) and spool_count(spool / "shard-1"):
            break
    else:
        pytest.fail("200 connections never reached both workers")
    queued = spool_count(spool) + spool_count(spool / "shard-1")
    qlist = ("queue", "list", "--startup", str(proc.startup_path))
    w1 = worker_pids(proc, 1)[-1]
    os.kill(w1, signal.SIGSTOP)
    try:
        runs = []
        for extra in ((), ("--timeout", "1.5")):
            started = time.monotonic()
            out = run_cli(*qlist, *extra, cwd=tmp_path, timeout=60)
            runs.append((out, time.monotonic() - started))
    finally:
        os.kill(w1, signal.SIGCONT)
    sock = tmp_path / "ferrymail.w1.sock"
    for (out, took), wait in zip(runs, ("5", "1.5"), strict=True):
        assert out.returncode == 0, out.stderr
        assert out.stderr == (f"ferrymail queue list: worker 1: ferrymail on {sock} did not "
                              f"answer within {wait} s; what follows was read from the spool "
                              "(every shard)\n"), out.stderr
        # every shard's mail, the stopped worker's too
        assert f"\n{queued} message(s)\n" in out.stdout, out.stdout
        assert took < float(wait) + 10, took
    assert runs[1][1] < runs[0][1]  # the option bounds the wait
    out = run_cli(*qlist, cwd=tmp_path)  # both answer again: nothing on stderr
    assert out.returncode == 0 and out.stderr == "", out
    assert proc.stop() == 0


def test_queue_timeout_must_be_a_positive_number(tmp_path: Path):
    for bad in ("0", "-1", "nan", "soon"):
        out = run_cli("queue", "list", "--timeout", bad, cwd=tmp_path)
        assert out.returncode == 2 and "--timeout" in out.stderr, out
        assert re.search(r"seconds", out.stderr), out.stderr


def test_a_killed_instances_cluster_state_is_marked_stale(ferrymail_proc, tmp_path: Path):
    """``cluster-status.json`` is written on every change of the cluster state and removed at
    a clean stop; a SIGKILLed instance leaves it behind, and ``queue list`` read from the
    spool used to print it as the current state."""
    require("redis-server")
    port = free_port()
    with redis_server() as r:
        doc = yaml.safe_load(startup_yaml(tmp_path, [server("in", [listener(port)])]))
        doc["cluster"] = {"redis": r.url, "instance": "m1", "heartbeat": 0.2}
        proc = ferrymail_proc(yaml.safe_dump(doc), running_yaml(["in"]), wait=[(HOST, port)])
        proc.wait_log(r"event=cluster\.state state=shared ")
        qlist = ("queue", "list", "--startup", str(proc.startup_path))
        out = run_cli(*qlist, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        live = out.stdout.splitlines()[0]
        assert re.fullmatch(r"cluster: shared, 1 live instance\(s\), instance m1, since \S+",
                            live), out.stdout
        proc.kill()
        assert (tmp_path / "spool" / "cluster-status.json").exists()
        out = run_cli(*qlist, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "read from the spool" in out.stderr
    stale = (rf"cluster: stale: pid {proc.pid} that wrote this is gone \(written \d+s ago\): "
             + re.escape(live.removeprefix("cluster: ")))
    assert re.fullmatch(stale, out.stdout.splitlines()[0]), out.stdout
