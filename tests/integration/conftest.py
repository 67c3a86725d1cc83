"""Integration fixtures: ``ferrymail run`` as a real subprocess, plus helpers around it.

``ferrymail_proc(startup_yaml, running_yaml, wait=[(host, port), ...])`` writes both files into
the test's tmp_path, starts ``ferrymail run`` there (so relative paths such as ``./var/spool``
land in tmp_path), waits for its ``app.started`` log line and for each listener, and returns a
``FerrymailProc``. Every process still running at the end of the test is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.realpeers import free_port

STARTED_EVENT = "event=app.started"


def _listening(host: str, port: int) -> bool:
    """Whether something LISTENs on host:port, read from /proc (no probe connection: a probe
    would show up in the server's log, e.g. as an untrusted PROXY peer)."""
    want_port = f"{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state = parts[1], parts[3]
            if state == "0A" and local.rsplit(":", 1)[1] == want_port:
                return True
    return False


@dataclass
class FerrymailProc:
    """A running ``ferrymail run``: its process, files and captured stderr."""

    proc: subprocess.Popen
    workdir: Path
    startup_path: Path | None
    running_path: Path | None
    _lines: list[str] = field(default_factory=list, repr=False)
    _reader: threading.Thread | None = field(default=None, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def logs(self) -> list[str]:
        """Every stderr line so far."""
        with self._cond:
            return list(self._lines)

    def log_text(self) -> str:
        return "\n".join(self.logs())

    def wait_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[str]:
        """Block until ``count`` lines match the regex ``pattern``; return the matches."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self._lines if rx.search(line)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader_alive()):
                    raise TimeoutError(
                        f"no {count} log line(s) matching {pattern!r} after {timeout}s; "
                        f"log:\n{self.log_text_unlocked()}")
                self._cond.wait(min(left, 0.1))

    def log_text_unlocked(self) -> str:
        return "\n".join(self._lines)

    def _reader_alive(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def problems(self) -> list[str]:
        """Log lines at warning level or above, and anything that is not a logfmt line."""
        return [line for line in self.logs()
                if not line.startswith("ts=") or re.search(r" level=(warning|error|critical) ",
                                                           line)]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"ferrymail did not stop within {timeout}s:\n"
                                     f"{self.log_text()}") from None
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no cleanup at all (crash tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)


def ferrymail_command(*args: str) -> list[str]:
    """argv for the ferrymail CLI of this checkout."""
    return [sys.executable, "-m", "ferrymail.cli", *args]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 30.0
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ferrymail_command(*args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def start_ferrymail(workdir: Path, startup_yaml: str | None, running_yaml: str | None, *,
                    wait: Sequence[tuple[str, int]] = (), timeout: float = 15.0,
                    name: str = "", preexec_fn: Callable[[], None] | None = None,
                    workers: int | None = 1) -> FerrymailProc:
    """Start ``ferrymail run`` in ``workdir`` (None yaml: the embedded default file).

    ``preexec_fn`` runs in the child before exec (e.g. to set a resource limit).
    ``workers``: ``--workers`` (one process unless asked; None: ferrymail's default)."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["run"] if workers is None else ["run", "--workers", str(workers)]
    startup_path = running_path = None
    if startup_yaml is not None:
        startup_path = workdir / f"startup{name}.yaml"
        startup_path.write_text(startup_yaml)
        args += ["--startup", str(startup_path)]
    if running_yaml is not None:
        running_path = workdir / f"running{name}.yaml"
        running_path.write_text(running_yaml)
        args += ["--running", str(running_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(ferrymail_command(*args), cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, preexec_fn=preexec_fn)
    handle = FerrymailProc(proc, workdir, startup_path, running_path)
    handle._reader = threading.Thread(target=handle._read, daemon=True)
    handle._reader.start()
    try:
        handle.wait_log(STARTED_EVENT, timeout)
        deadline = time.monotonic() + timeout
        for host, port in wait:
            while not _listening(host, port):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise TimeoutError(f"ferrymail is not listening on {host}:{port}:\n"
                                       f"{handle.log_text()}")
                time.sleep(0.02)
    except BaseException:
        handle.kill()
        raise
    return handle


@pytest.fixture
def ferrymail_proc(tmp_path: Path) -> Iterator[Callable[..., FerrymailProc]]:
    """Factory: ``ferrymail_proc(startup_yaml, running_yaml, *, wait=[...]) -> FerrymailProc``."""
    started: list[FerrymailProc] = []

    def start(startup_yaml: str | None, running_yaml: str | None, *,
              wait: Sequence[tuple[str, int]] = (), timeout: float = 15.0,
              workdir: Path | None = None,
              preexec_fn: Callable[[], None] | None = None,
              workers: int | None = 1) -> FerrymailProc:
        handle = start_ferrymail(workdir or tmp_path, startup_yaml, running_yaml, wait=wait,
                                 timeout=timeout, name="" if not started else str(len(started)),
                                 preexec_fn=preexec_fn, workers=workers)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.kill()


class ClientThreads:
    """``count`` daemon threads, started at once, each running
    ``target(port, n, results, lock, stop)`` (n = 0 .. count-1): clients that record what they
    got in the shared ``results`` under ``lock`` and end when ``stop`` is set (or on error)."""

    def __init__(self, target: Callable[..., None], port: int, results: Any,
                 count: int = 4) -> None:
        self.results = results
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=target,
                                         args=(port, n, results, self.lock, self.stop_event),
                                         daemon=True) for n in range(count)]
        for t in self.threads:
            t.start()

    def wait_until(self, cond: Callable[[Any], bool], timeout: float) -> bool:
        """Poll ``cond(results)`` under the lock every 50 ms for up to ``timeout`` seconds;
        whether it became true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if cond(self.results):
                    return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float) -> None:
        """Tell every client to stop and wait up to ``timeout`` seconds for each."""
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout)


# --------------------------------------------------------------------------- config builders


def startup_yaml(workdir: Path, servers: list[dict[str, Any]], *, level: str = "info",
                 fsync: bool = True, spool: Path | None = None,
                 metrics: str | bool = False, min_free: str | None = None) -> str:
    """A startup file for ``servers`` with spool and pidfile inside ``workdir``; the metrics
    listener is off unless ``metrics`` names an ``ADDRESS:PORT`` (tests run side by side);
    ``min_free`` sets ``spool.min_free`` (e.g. ``"1MiB"``)."""
    doc = {
        "environment": {"hostname": "mx.ferrymail.test",
                        "pidfile": str(workdir / "ferrymail.pid"),
                        "logging": {"level": level}},
        "servers": servers,
        "spool": {"path": str(spool or workdir / "spool"), "fsync": fsync},
        "metrics": {"listen": metrics},
    }
    if min_free is not None:
        doc["spool"]["min_free"] = min_free
    return yaml.safe_dump(doc, sort_keys=False)


def running_yaml(server_ids: Sequence[str], *, domains: Sequence[str] = ("example.com",),
                 relay_networks: Sequence[str] = ("127.0.0.0/8", "::1/128"),
                 hold: bool = True) -> str:
    """A running file: every server accepts ``domains`` and relays for ``relay_networks``.

    ``hold`` sets ``queues.hold`` so that no delivery starts and what the inbound side
    stored stays in the spool, untouched, for the test to inspect.
    """
    doc: dict[str, Any] = {
        "servers": [{"id": sid, "transport": "mx", "domains": list(domains),
                     "relay_networks": list(relay_networks)} for sid in server_ids],
        "transportgroups": [{"id": "default", "transports": [{"id": "mx"}]}],
    }
    if hold:
        doc["queues"] = {"hold": True}
    return yaml.safe_dump(doc, sort_keys=False)


def sink_running_yaml(sink_port: int, server_id: str = "in", *,
                      domains: Sequence[str] = ("example.com",)) -> str:
    """A running file in which server ``server_id`` accepts ``domains`` and delivers all of
    it, undelayed, to the smtp-sink on 127.0.0.1:``sink_port``."""
    return yaml.safe_dump({
        "servers": [{"id": server_id, "transport": "sink", "domains": list(domains)}],
        "transportgroups": [{"id": "default", "transports": [{
            "id": "sink", "connection": {"server": "127.0.0.1", "port": sink_port}}]}],
    })


def server(sid: str, listeners: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": sid, "type": "smtp", "listeners": listeners, **extra}


def listener(port: int, *, proxy: bool = False, address: str | None = "127.0.0.1"
             ) -> dict[str, Any]:
    return {"address": address, "port": port, "proxyprotocol": proxy}


def spool_messages(spool_path: Path) -> list:
    """Every message in a spool, read-only (works beside a running ferrymail)."""
    from ferrymail.spool import SqliteSpool

    async def read() -> list:
        spool = SqliteSpool(spool_path, readonly=True)
        await spool.start()
        try:
            return await spool.list(100000)
        finally:
            await spool.close()

    return asyncio.run(read())


def _spool_db(spool_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{spool_path / 'spool.db'}?mode=ro", uri=True, timeout=5)


def spool_count(spool_path: Path) -> int:
    """Messages in the spool, read-only while ferrymail runs (SQLite WAL allows it)."""
    if not (spool_path / "spool.db").exists():
        return 0
    with contextlib.closing(_spool_db(spool_path)) as db:
        return db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]


def spool_get(spool_path: Path, qid: str) -> tuple[Any, bytes] | None:
    """(Envelope, data) of a queued message, read-only while ferrymail runs; None if absent."""
    from ferrymail.spool.sqlite import envelope_from_json

    with contextlib.closing(_spool_db(spool_path)) as db:
        row = db.execute("SELECT m.envelope, b.data FROM messages m LEFT JOIN bodies b "
                         "USING (id) WHERE id = ?", (int(qid, 16),)).fetchone()
    if row is None:
        return None
    if row[1] is None:  # a large message: its body is a file of the spool
        return envelope_from_json(row[0]), (spool_path / "bodies" / qid).read_bytes()
    return envelope_from_json(row[0]), bytes(row[1])


__all__ = [
    "FerrymailProc",
    "ferrymail_command",
    "free_port",
    "listener",
    "run_cli",
    "running_yaml",
    "server",
    "spool_count",
    "spool_get",
    "spool_messages",
    "start_ferrymail",
    "startup_yaml",
]
