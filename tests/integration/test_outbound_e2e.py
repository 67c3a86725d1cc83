"""Outbound end to end through the seed's HAProxy into smtp-sink: the MX sees the configured
source IP and HELO whether the proxy is set at group, transport or address level, direct and
proxied sources mix, active/active survives a proxy going away, sessions are reused, and the
whole chain swaks -> proxied listener -> ferrymail -> HAProxy -> MX works as one.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.integration.conftest import listener, server, startup_yaml
from tests.integration.outbound_harness import LogCapture, engine, field_of, run
from tests.realpeers import (
    free_port,
    haproxy,
    require_transparent_proxy,
    seed_outbound_haproxy,
    smtp_sink,
)


@pytest.fixture(scope="module")
def proxy_port():
    require_transparent_proxy()
    port = free_port()
    with haproxy(seed_outbound_haproxy("127.0.0.1", port, retries=0, connect_timeout="1s"),
                 [("127.0.0.1", port)]):
        yield port


def proxied_config(level: str, proxy: int, version: int, sink: int) -> str:
    """One transport, one source address, the proxy set at ``level``."""
    pp = f"{{server: 127.0.0.1, port: {proxy}, version: {version}}}"
    group = f"proxyprotocol: {pp}" if level == "group" else ""
    transport = f"proxyprotocol: {pp}," if level == "transport" else ""
    address = f", proxyprotocol: {pp}" if level == "address" else ""
    return f"""
servers: [{{id: in, transport: t}}]
addresses:
  - {{id: a1, address: 127.0.0.21, hostname: a1.out.test{address}}}
transportgroups:
  - id: g
    connection:
      {group}
      server: 127.0.0.1
      port: {sink}
    transports:
      - id: t
        connection: {{{transport} sourceip: {{ipv4: [a1]}}}}
"""


@pytest.mark.parametrize(("level", "version"),
                         [("group", 1), ("transport", 2), ("address", 1), ("address", 2)])
def test_proxy_at_each_level_mx_sees_source_ip_and_helo(proxy_port, tmp_path, level, version):
    with smtp_sink() as sink, LogCapture() as logs:
        async def main() -> None:
            async with engine(tmp_path, proxied_config(level, proxy_port, version,
                                                       sink.port)) as h:
                await h.submit(("one@dest.test", "two@dest.test"))
                await h.drained()

        run(main)
        (dump,) = sink.wait_dumps(1)
    assert dump.client_addr == "127.0.0.21"
    assert dump.helo == "a1.out.test"
    assert sorted(dump.rcpts) == ["<one@dest.test>", "<two@dest.test>"]
    assert b"Hello from ferrymail." in dump.raw
    (line,) = logs.lines("delivery.attempt")
    assert field_of(line, "proxy") == f"127.0.0.1:{proxy_port}"
    assert field_of(line, "source_ip") == "127.0.0.21"
    assert field_of(line, "source_id") == "a1"
    assert field_of(line, "helo") == "a1.out.test"
    assert field_of(line, "result") == "delivered"
    assert field_of(line, "reply_code") == "250"
    assert field_of(line, "rcpts") == "one@dest.test,two@dest.test"


def test_proxied_and_direct_sources_in_one_transport(proxy_port, tmp_path):
    def cfg_text(sink: int) -> str:
        return f"""
servers: [{{id: in, transport: t}}]
addresses:
  - {{id: via, address: 127.0.0.22, hostname: via.out.test,
      proxyprotocol: {{server: 127.0.0.1, port: {proxy_port}}}}}
  - {{id: bound, address: 127.0.0.23, hostname: bound.out.test}}
transportgroups:
  - id: g
    transports:
      - id: t
        connection:
          server: 127.0.0.1
          port: {sink}
          sourceip: {{ipv4: [via, bound]}}
          reuse: {{idle: 0}}
"""
    with smtp_sink() as sink, LogCapture() as logs:
        async def main() -> None:
            async with engine(tmp_path, cfg_text(sink.port)) as h:
                for i in range(4):
                    await h.submit((f"r{i}@dest.test",))
                    await h.drained()

        run(main)
        dumps = sink.wait_dumps(4)
    seen = {(d.client_addr, d.helo) for d in dumps}
    assert seen == {("127.0.0.22", "via.out.test"), ("127.0.0.23", "bound.out.test")}
    routes = {(field_of(ln, "source_ip"), field_of(ln, "proxy"))
              for ln in logs.lines("delivery.attempt")}
    assert routes == {("127.0.0.22", f"127.0.0.1:{proxy_port}"), ("127.0.0.23", "direct")}


def test_active_active_survives_a_proxy_going_away(tmp_path):
    require_transparent_proxy()
    p1, p2 = free_port(), free_port()
    def cfg_text(sink: int) -> str:
        return f"""
servers: [{{id: in, transport: t}}]
addresses:
  - {{id: on1, address: 127.0.0.31, hostname: on1.out.test,
      proxyprotocol: {{server: 127.0.0.1, port: {p1}}}}}
  - {{id: on2, address: 127.0.0.32, hostname: on2.out.test,
      proxyprotocol: {{server: 127.0.0.1, port: {p2}, version: 2}}}}
transportgroups:
  - id: g
    transports:
      - id: t
        connection:
          server: 127.0.0.1
          port: {sink}
          sourceip: {{ipv4: [on1, on2]}}
          reuse: {{idle: 0}}
"""
    with smtp_sink() as sink, LogCapture() as logs, \
            haproxy(seed_outbound_haproxy("127.0.0.1", p2), [("127.0.0.1", p2)]):
        first = haproxy(seed_outbound_haproxy("127.0.0.1", p1), [("127.0.0.1", p1)])
        first.__enter__()
        try:
            async def main() -> None:
                async with engine(tmp_path, cfg_text(sink.port)) as h:
                    for i in range(4):  # both up: round robin over both
                        await h.submit((f"up{i}@dest.test",))
                        await h.drained()
                    first.__exit__(None, None, None)
                    for i in range(4):  # proxy 1 gone: everything through proxy 2
                        await h.submit((f"down{i}@dest.test",))
                        await h.drained()

            run(main)
        finally:
            first.__exit__(None, None, None)
        dumps = sink.wait_dumps(8)
    by_rcpt = {d.rcpts[0]: d.client_addr for d in dumps}
    assert len(by_rcpt) == 8  # no loss
    assert {by_rcpt[f"<up{i}@dest.test>"] for i in range(4)} == {"127.0.0.31", "127.0.0.32"}
    assert {by_rcpt[f"<down{i}@dest.test>"] for i in range(4)} == {"127.0.0.32"}
    failures = logs.lines("delivery.connect_failed")
    assert failures, logs.text()
    assert len(failures) == 1  # then the proxy is known down and skipped
    assert field_of(failures[0], "kind") == "proxy"
    assert field_of(failures[0], "proxy") == f"127.0.0.1:{p1}"
    assert field_of(failures[0], "then") == "next source"
    assert all(field_of(ln, "result") == "delivered" for ln in logs.lines("delivery.attempt"))


def test_sessions_are_reused_for_the_same_destination(tmp_path):
    with smtp_sink() as sink:
        async def main() -> None:
            async with engine(tmp_path, f"""
servers: [{{id: in, transport: t}}]
addresses: [{{id: a, address: 127.0.0.24, hostname: a.out.test}}]
transportgroups:
  - id: g
    transports:
      - id: t
        connection:
          server: 127.0.0.1
          port: {sink.port}
          sourceip: {{ipv4: [a]}}
          reuse: {{messages: 3, idle: 10}}
""") as h:
                for i in range(5):
                    await h.submit((f"r{i}@dest.test",))
                    await h.drained()
                # five messages, at most three per session: two sessions, three reuses
                assert h.engine.pool.reused == 3

        run(main)
        dumps = sink.wait_dumps(5)
    assert {d.client_addr for d in dumps} == {"127.0.0.24"}


def test_chain_swaks_proxied_listener_ferrymail_haproxy_mx(proxy_port, tmp_path,
                                                            ferrymail_proc):
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed")
    lport = free_port()
    with smtp_sink() as sink:
        running = f"""
servers:
  - {{id: viaproxy, transport: out, domains: [example.com]}}
addresses:
  - {{id: src1, address: 127.0.0.25, hostname: smtp25.out.test}}
transportgroups:
  - id: default
    connection:
      proxyprotocol: {{server: 127.0.0.1, port: {proxy_port}}}
    transports:
      - id: out
        connection:
          server: 127.0.0.1
          port: {sink.port}
          sourceip: {{ipv4: [src1]}}
"""
        startup = startup_yaml(tmp_path, [server("viaproxy", [listener(lport, proxy=True)])])
        fm = ferrymail_proc(startup, running, wait=[("127.0.0.1", lport)])
        out = subprocess.run(
            [swaks, "--server", f"127.0.0.1:{lport}", "--from", "<>",
             "--to", "someone@example.com", "--proxy-version", "1", "--proxy-family", "tcp4",
             "--proxy-source", "45.33.68.55", "--proxy-source-port", "54321",
             "--proxy-dest", "172.253.122.26", "--proxy-dest-port", "25"],
            capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "PROXY TCP4 45.33.68.55 172.253.122.26 54321 25" in out.stdout
        (dump,) = sink.wait_dumps(1)
        line = fm.wait_log("event=delivery.attempt")[0]
        fm.stop()
    assert dump.client_addr == "127.0.0.25" and dump.helo == "smtp25.out.test"
    assert dump.rcpts == ["<someone@example.com>"]
    assert b"45.33.68.55" in dump.raw  # the Received: line names the PROXY-reported client
    assert field_of(line, "proxy") == f"127.0.0.1:{proxy_port}"
    assert field_of(line, "result") == "delivered"
