"""Cluster-wide proxy health: two real ``ferrymail run`` processes sharing one Redis
(``cluster.redis``), two generated HAProxies. A proxy killed is noticed by one instance and
skipped by both: the other sends no message into it. ``ferrymail proxy status`` shows it.
Also the Redis store alone: entries with TTL, pub/sub to another store, garbage ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import time
from pathlib import Path

import pytest
import redis

from ferrymail.delivery.health import HealthEntry, RedisHealthStore
from tests.integration.conftest import run_cli, startup_yaml
from tests.integration.outbound_harness import field_of as field_of_line
from tests.integration.test_proxy_ha import A, B, generated_haproxy
from tests.realpeers import (
    free_port,
    haproxy,
    redis_server,
    require_transparent_proxy,
    smtp_sink,
)

pytestmark = pytest.mark.timeout(180)


def running(pa: int, pb: int, sink: int) -> str:
    return f"""
servers:
  - {{id: in, transport: t, domains: [dest.test], relay_networks: [127.0.0.0/8]}}
addresses:
  - {{id: a1, address: 127.0.0.21, proxyprotocol: {{server: {A}, port: {pa}}}}}
  - {{id: b1, address: 127.0.0.31, proxyprotocol: {{server: {B}, port: {pb}}}}}
transportgroups:
  - id: g
    retry: {{intervals: [1]}}
    transports:
      - id: t
        connection:
          server: 127.0.0.1
          port: {sink}
          sourceip: {{ipv4: [a1, b1]}}
          reuse: {{idle: 0}}
          timeout: {{connect: 2, banner: 3}}
"""


def send(port: int, tag: str, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        for i in range(n):
            s.sendmail("sender@origin.test", [f"{tag}{i}@dest.test"],
                       f"Subject: {tag}{i}\r\n\r\nbody\r\n")


def delivered(proc, tag: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [ln for ln in proc.logs() if " event=delivery.attempt " in ln
            and f"rcpts={tag}" in ln and "result=delivered" in ln]


def wait_delivered(proc, tag: str, n: int, timeout: float = 30) -> list[str]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while len(delivered(proc, tag)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(delivered(proc, tag))} of {n} {tag} delivered:\n"
                               + proc.log_text()[-4000:])
        time.sleep(0.05)
    return delivered(proc, tag)


def test_proxy_killed_is_skipped_by_both_instances(tmp_path: Path, ferrymail_proc) -> None:
    require_transparent_proxy()
    pa, pb = free_port(A), free_port(B)
    with redis_server() as rds, smtp_sink() as sink, contextlib.ExitStack() as stack:
        run_text = running(pa, pb, sink.port)
        stack.enter_context(haproxy(generated_haproxy(tmp_path, run_text, f"{A}:{pa}"),
                                    [(A, pa)]))
        proxy_b = haproxy(generated_haproxy(tmp_path, run_text, f"{B}:{pb}"), [(B, pb)])
        hb = proxy_b.__enter__()
        stack.callback(proxy_b.__exit__, None, None, None)
        procs, ports = [], []
        for n in (1, 2):
            work = tmp_path / f"i{n}"
            work.mkdir()
            port = free_port()
            start = startup_yaml(work, [{"id": "in", "listeners": [{"port": port,
                                                                     "address": "127.0.0.1"}]}],
                                 fsync=False)
            start += f"cluster: {{redis: '{rds.url}'}}\n"
            procs.append(ferrymail_proc(start, run_text, wait=[("127.0.0.1", port)],
                                        workdir=work))
            ports.append(port)
        one, two = procs
        # both instances use both proxies
        for proc, port in zip(procs, ports, strict=True):
            send(port, "warm", 4)
            lines = wait_delivered(proc, "warm", 4)
            assert {field_of_line(ln, "proxy") for ln in lines} == {f"{A}:{pa}", f"{B}:{pb}"}
        hb.proc.kill()
        hb.proc.wait()
        # instance one notices (at most one failed connection) ...
        send(ports[0], "one", 6)
        wait_delivered(one, "one", 6)
        noticed = one.wait_log(rf"event=proxy.health proxy={B}:{pb} source=\* "
                               r"state=suspended")[0]
        origin = field_of_line(noticed, "origin")
        # ... and instance two hears of it through Redis, before sending anything
        two.wait_log(rf"event=proxy.health proxy={B}:{pb} source=\* state=suspended "
                     rf".*origin={origin}", timeout=5)
        send(ports[1], "two", 10)
        lines = wait_delivered(two, "two", 10)
        assert {field_of_line(ln, "proxy") for ln in lines} == {f"{A}:{pa}"}
        assert not [ln for ln in two.logs() if "event=delivery.connect_failed" in ln], \
            two.log_text()[-3000:]
        refused = [ln for ln in one.logs() if "event=delivery.connect_failed" in ln]
        assert len(refused) <= 1, "\n".join(refused)
        # proxy status reads the shared store
        status = run_cli("proxy", "status", "--startup", str(one.startup_path),
                         "--running", str(one.running_path))
        assert status.returncode == 0, status.stderr
        rows = {tuple(line.split()[:3]) for line in status.stdout.splitlines()[1:]}
        assert (f"{B}:{pb}", "*", "suspended") in rows, status.stdout
        assert (f"{A}:{pa}", "*", "up") in rows and (f"{A}:{pa}", "127.0.0.21", "up") in rows
        assert origin in status.stdout
        for proc in procs:
            assert proc.stop() == 0


def test_redis_store_shares_entries_with_ttl_and_ignores_garbage() -> None:
    with redis_server() as rds:
        async def main() -> None:
            a, b = RedisHealthStore(rds.url), RedisHealthStore(rds.url)
            heard: list[HealthEntry] = []
            await a.start(lambda e: None)
            await b.start(heard.append)
            try:
                await asyncio.sleep(0.2)  # b is subscribed
                now = time.time()
                e = HealthEntry("127.0.0.12:2525", None, "suspended", "connect", "refused",
                                now, now + 30, now, 30.0, "a:1:x")
                await a.publish(e)
                client = redis.Redis.from_url(rds.url)
                client.publish(a.channel, b"not json")
                deadline = time.monotonic() + 5
                while not heard and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert heard == [e]
                assert await b.entries() == [e]
                ttl = client.ttl(f"{a.prefix}entry:127.0.0.12:2525|*")
                assert 3600 < ttl <= 3600 + 31
                client.close()
            finally:
                await a.close()
                await b.close()

        asyncio.run(asyncio.wait_for(main(), 20))


def test_redis_store_unreachable_keeps_running() -> None:
    port = free_port()

    async def main() -> None:
        store = RedisHealthStore(f"redis://127.0.0.1:{port}/0", timeout=0.3)
        await store.start(lambda e: None)
        await store.publish(HealthEntry("p:1", None, "up"))  # logged, not raised
        assert await store.entries() == []
        await store.close()

    asyncio.run(asyncio.wait_for(main(), 10))
