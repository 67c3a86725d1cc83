"""Active/passive proxy tier with keepalived (VRRP unicast) in network namespaces this test
creates, configured by `ferrymail haproxy-config` and `ferrymail keepalived-config`.

Topology (addresses exist only inside the namespaces):

    ns C: ferrymail (engine in a thread that entered C) + smtp-sink 10.77.0.1, bridge br0
            │ veth                      │ veth
    ns 1: front 10.77.0.11        ns 2: front 10.77.0.12        HAProxy + keepalived in each
          vrrp 10.78.0.1 ─────────veth pair───────── vrrp 10.78.0.2   (VRRP unicast)

The VIP 10.77.0.100 (HAProxy's listener) and the source IPs 10.77.0.101/102 are VRRP
virtual addresses. The master's HAProxy is stopped mid-load: its vrrp_script fails, the
addresses move to the other node, connections in flight fail and are retried, every message
arrives, from the same source IPs, now held by the other node.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli
from tests.integration.outbound_harness import LogCapture, engine, field_of, run
from tests.realpeers import require, smtp_sink, stop

pytestmark = pytest.mark.timeout(150)

VIP, SOURCES = "10.77.0.100", ("10.77.0.101", "10.77.0.102")
SINK_HOST = "10.77.0.1"
CLONE_NEWNET = 0x40000000


def sh(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")


@contextlib.contextmanager
def namespaces(tag: str) -> Iterator[tuple[str, str, str]]:
    """Create ns C, 1, 2 as drawn above; delete them (and every link in them) afterwards."""
    c, n1, n2 = f"{tag}c", f"{tag}1", f"{tag}2"
    made: list[str] = []
    try:
        for ns in (c, n1, n2):
            sh("ip", "netns", "add", ns)
            made.append(ns)
        sh("ip", "-n", c, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", c, "addr", "add", f"{SINK_HOST}/24", "dev", "br0")
        for ns in (c, n1, n2):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", c, "link", "set", "br0", "up")
        for i, ns in ((1, n1), (2, n2)):
            sh("ip", "-n", c, "link", "add", f"c{i}", "type", "veth", "peer", "name", "front",
               "netns", ns)
            sh("ip", "-n", c, "link", "set", f"c{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"10.77.0.1{i}/24", "dev", "front")
            sh("ip", "-n", ns, "link", "set", "front", "up")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1")
        sh("ip", "-n", n1, "link", "add", "vrrp", "type", "veth", "peer", "name", "vrrp",
           "netns", n2)
        for i, ns in ((1, n1), (2, n2)):
            sh("ip", "-n", ns, "addr", "add", f"10.78.0.{i}/30", "dev", "vrrp")
            sh("ip", "-n", ns, "link", "set", "vrrp", "up")
        yield c, n1, n2
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_netns(ns: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` in a thread that entered network namespace ``ns`` (setns is per thread;
    sockets it opens and processes it starts live there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    failure: list[BaseException] = []

    def target() -> None:
        fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({ns}) failed")
        finally:
            os.close(fd)
        try:
            fn()
        except BaseException as e:  # re-raised in the test's thread
            failure.append(e)

    t = threading.Thread(target=target, name=f"netns-{ns}")
    t.start()
    t.join()
    if failure:
        raise failure[0]


def addresses(ns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "front"],
                         capture_output=True, text=True).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def running_yaml(sink_port: int) -> str:
    return f"""
servers: [{{id: in, transport: t}}]
addresses:
  - {{id: s1, address: {SOURCES[0]}}}
  - {{id: s2, address: {SOURCES[1]}}}
proxyhealth: {{suspend: 2, suspend_max: 4}}
transportgroups:
  - id: g
    retry: {{intervals: [1]}}
    connection:
      proxyprotocol: {{server: {VIP}, port: 2525, check: {{interval: 1, timeout: 1}}}}
      sourceip: {{ipv4: [s1, s2]}}
    transports:
      - id: t
        connection:
          server: {SINK_HOST}
          port: {sink_port}
          reuse: {{messages: 20, idle: 30}}
          timeout: {{connect: 1, banner: 3}}
"""


def test_active_passive_keepalived_moves_vip_and_sources(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces and HAProxy `usesrc clientip` need root")
    haproxy_bin, keepalived_bin = require("haproxy"), require("keepalived")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 `ip` is not installed")
    try:
        topo = namespaces(f"fk{os.getpid() % 100000}")
        c, n1, n2 = topo.__enter__()
    except RuntimeError as e:
        pytest.skip(f"cannot build the namespaces/veth topology here: {e}")
    procs: list[subprocess.Popen] = []
    try:
        sink_port = 2600 + os.getpid() % 1000  # inside ns C: nothing else listens there
        running = running_yaml(sink_port)
        (tmp_path / "startup.yaml").write_text("servers: [{id: in, listeners: [{port: 2599}]}]\n")
        (tmp_path / "running.yaml").write_text(running)
        files = ["--startup", str(tmp_path / "startup.yaml"), "--running",
                 str(tmp_path / "running.yaml")]
        res = run_cli("haproxy-config", *files, "--allow", "10.77.0.0/24", "--timeout-connect",
                      "2s", "-o", str(tmp_path / "haproxy.cfg"))
        assert res.returncode == 0, res.stderr
        haproxies = {}
        for ns in (n1, n2):
            p = subprocess.Popen(["ip", "netns", "exec", ns, haproxy_bin, "-db", "-f",
                                  str(tmp_path / "haproxy.cfg")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            haproxies[ns] = p
        time.sleep(0.5)
        for i, (ns, other) in enumerate(((n1, 2), (n2, 1)), 1):
            conf = tmp_path / f"keepalived{i}.conf"
            res = run_cli("keepalived-config", *files, "--interface", "vrrp", "--vip-interface",
                          "front", "--unicast-src", f"10.78.0.{i}", "--unicast-peer",
                          f"10.78.0.{other}", "--priority", str(200 - 50 * i), "--check",
                          f"/bin/kill -0 {haproxies[ns].pid}", "-o", str(conf))
            assert res.returncode == 0, res.stderr
            check = subprocess.run(["ip", "netns", "exec", ns, keepalived_bin, "-t", "-f",
                                    str(conf), "--log-console"], capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, keepalived_bin, "-n", "-l", "-P", "-f", str(conf),
                 "-p", str(tmp_path / f"ka{i}.pid"), "-r", str(tmp_path / f"kv{i}.pid")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        want = {VIP, *SOURCES}
        wait_for(lambda: want <= addresses(n1), 20, f"VRRP master in {n1}: {addresses(n1)}")
        assert not want & addresses(n2)

        seen: dict[str, list[str]] = {}
        moved: dict[str, float] = {}

        def body() -> None:
            with smtp_sink(SINK_HOST, sink_port) as sink, LogCapture() as logs:
                async def main() -> None:
                    import asyncio

                    async with engine(tmp_path, running) as h:
                        for i in range(300):
                            await h.submit((f"m{i}@dest.test",))
                        while sum(1 for _ in sink.dump_dir.iterdir()) < 100:
                            await asyncio.sleep(0.02)
                        haproxies[n1].kill()  # the master's HAProxy stops mid-load
                        haproxies[n1].wait()  # reaped: `kill -0` (the vrrp_script) fails
                        t0 = time.monotonic()
                        while not want <= addresses(n2):
                            await asyncio.sleep(0.05)
                            assert time.monotonic() - t0 < 20, "the VIP did not move"
                        moved["after_s"] = time.monotonic() - t0
                        await h.drained(timeout=60)

                run(main, timeout=100)
                time.sleep(0.3)
                for d in sink.dumps():
                    seen.setdefault(d.rcpts[0].strip("<>"), []).append(d.client_addr)
                moved["log"] = logs.text()  # type: ignore[assignment]

        in_netns(c, body)
        assert not want & addresses(n1) and want <= addresses(n2)
        missing = [i for i in range(300) if f"m{i}@dest.test" not in seen]
        assert not missing, missing[:20]
        assert {ip for v in seen.values() for ip in v} <= set(SOURCES)
        log = str(moved["log"]).splitlines()
        retried = [ln for ln in log if " event=delivery.error " in ln
                   or " event=delivery.connect_failed " in ln]
        assert retried, "the failover cost no failed connection at all?"
        assert all(field_of(ln, "proxy") == f"{VIP}:2525" for ln in retried), "\n".join(
            ln for ln in retried if field_of(ln, "proxy") != f"{VIP}:2525")
        per_msg = Counter(field_of(ln, "qid") for ln in log
                          if " event=delivery.error " in ln)
        # in-flight connections fail once and are retried: no message is deferred twice (while
        # the proxy is known down, new attempts wait for its active check instead of failing)
        assert max(per_msg.values(), default=0) <= 1, per_msg.most_common(3)
        print(f"\nactive/passive: addresses moved {moved['after_s']:.2f}s after the kill; "
              f"{len(retried)} failed attempts/connections, {len(per_msg)} messages deferred, "
              f"at most {max(per_msg.values(), default=0)} times; 300/300 delivered")
    finally:
        for p in reversed(procs):
            stop(p)
        topo.__exit__(None, None, None)
