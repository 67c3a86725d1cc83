"""Real peers for tests: smtp-sink, HAProxy, Redis, each started on loopback and stopped after.

Every helper picks a free port itself and waits until the peer listens, so tests never
sleep on a guess. Append new peers here rather than starting processes ad hoc in tests.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ferrymail.proxytier.haproxy import outbound_listen

# One registry of handed-out ports for the tests and the benchmarks they run in-process:
# bench/ is not a package, its modules import each other by name.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from peers import free_port

__all__ = ["free_port"]  # (re-exported: tests import it from here)


def wait_listening(host: str, port: int, timeout: float = 10.0, proc=None) -> None:
    """Block until host:port accepts a TCP connection (or fail, naming the peer)."""
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None and os.path.exists(f"/usr/sbin/{binary}"):
        path = f"/usr/sbin/{binary}"
    if path is None:
        pytest.skip(f"{binary} is not installed (make test installs it)")
    return path


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class SinkDump:
    """One transaction as smtp-sink -d wrote it."""

    client_addr: str
    helo: str
    mail_from: str
    rcpts: list[str]
    message: email.message.Message
    raw: bytes


@dataclass
class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1:port, dumping each transaction to `dump_dir`."""

    host: str
    port: int
    dump_dir: Path
    proc: subprocess.Popen = field(repr=False)

    def dumps(self) -> list[SinkDump]:
        out = []
        for p in sorted(self.dump_dir.iterdir()):
            raw = p.read_bytes()
            hdr = email.message_from_bytes(raw, policy=email.policy.compat32)
            out.append(
                SinkDump(
                    client_addr=str(hdr.get("X-Client-Addr", "")),
                    helo=str(hdr.get("X-Helo-Args", "")),
                    mail_from=str(hdr.get("X-Mail-Args", "")),
                    rcpts=[str(v) for v in hdr.get_all("X-Rcpt-Args", [])],
                    message=hdr,
                    raw=raw,
                )
            )
        return out

    def wait_dumps(self, n: int, timeout: float = 15.0) -> list[SinkDump]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = list(self.dump_dir.iterdir())
            if len(files) >= n:
                time.sleep(0.05)  # let smtp-sink finish writing the last file
                return self.dumps()
            time.sleep(0.05)
        raise TimeoutError(f"smtp-sink got {len(list(self.dump_dir.iterdir()))} of {n} messages")


@contextlib.contextmanager
def smtp_sink(host: str = "127.0.0.1", port: int | None = None, extra: list[str] | None = None,
              backlog: int = 256) -> Iterator[SmtpSink]:
    """Start smtp-sink; `extra` adds flags (e.g. ["-f", "."] to reject at end of data)."""
    binary = require("smtp-sink")
    port = port or free_port(host)
    dump_dir = Path(tempfile.mkdtemp(prefix="sink-"))
    os.chmod(dump_dir, 0o777)
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cmd = [binary, "-u", "nobody", "-d", f"{dump_dir}/%H%M%S.", *(extra or []), addr,
           str(backlog)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(host, port, proc=proc)
        yield SmtpSink(host, port, dump_dir, proc)
    finally:
        stop(proc)
        shutil.rmtree(dump_dir, ignore_errors=True)


@dataclass
class HAProxy:
    cfg_path: Path
    proc: subprocess.Popen = field(repr=False)

    def log(self) -> str:
        return ""


@contextlib.contextmanager
def haproxy(config: str, wait_on: list[tuple[str, int]]) -> Iterator[HAProxy]:
    """Run HAProxy in the foreground (-db) with `config`, waiting for each (host, port) bind.

    The outbound seed configuration (`usesrc clientip`) needs root or CAP_NET_ADMIN; tests
    that need it call `require_transparent_proxy()` first.
    """
    binary = require("haproxy")
    d = Path(tempfile.mkdtemp(prefix="haproxy-"))
    cfg = d / "haproxy.cfg"
    cfg.write_text(config)
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejected its config:\n{check.stdout}{check.stderr}\n{config}")
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        for host, port in wait_on:
            wait_listening(host, port, proc=proc)
        yield HAProxy(cfg, proc)
    finally:
        stop(proc, signal.SIGUSR1)  # soft-stop, then kill if it lingers
        shutil.rmtree(d, ignore_errors=True)


def require_transparent_proxy() -> None:
    if os.geteuid() != 0:
        pytest.skip("HAProxy `usesrc clientip` needs root or CAP_NET_ADMIN")


def seed_outbound_haproxy(bind_host: str, bind_port: int, retries: int = 0,
                          connect_timeout: str = "2s") -> str:
    """The seed's `listen outboundsmtp` section, on loopback, as HAProxy config text."""
    return f"""
global
    log stderr format raw local0 info
defaults
    mode tcp
    log global
    timeout connect {connect_timeout}
    timeout client 30s
    timeout server 30s
    retries {retries}
{outbound_listen(bind_host, bind_port)}"""


@dataclass
class Redis:
    host: str
    port: int
    proc: subprocess.Popen = field(repr=False)
    argv: list[str] = field(default_factory=list, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def stop(self) -> None:
        """Stop it (SIGTERM; nothing is saved: a restart comes back empty)."""
        stop(self.proc)

    def restart(self) -> None:
        """Start it again on the same port, empty."""
        if self.proc.poll() is None:
            self.stop()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_listening(self.host, self.port, proc=self.proc)


@contextlib.contextmanager
def redis_server(host: str = "127.0.0.1") -> Iterator[Redis]:
    binary = require("redis-server")
    port = free_port(host)
    d = tempfile.mkdtemp(prefix="redis-")
    argv = [binary, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", d]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Redis(host, port, proc, argv)
    try:
        wait_listening(host, port, proc=proc)
        yield server
    finally:
        stop(server.proc)
        shutil.rmtree(d, ignore_errors=True)
