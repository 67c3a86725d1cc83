"""Delivery rate with shaping policies whose limits never bind, side by side in one run:
no policies, the in-process limiter, the Redis limiter (a real redis-server), and the
host-wide limiter (a real limiter service process) with one engine and with ``--workers``
engines in as many processes.

    .venv/bin/python bench/shaping.py [--messages 4000] [--repeat 3] [--write-results]

Per variant: N messages of 2 KB are stored in a fresh spool (fsync off: the spool is not what
is measured), then one delivery engine on this process's uvloop is started and timed until
the spool is empty; smtp-sink (discarding) is the MX, reached from two source IPs
(127.0.0.2, 127.0.0.3). The policies give concurrency, a rate and a connect interval per
source IP, a rate per grouping and a global rate, all far above what is reached, so the
difference is the cost of asking: with Redis one script per new connection and one per
64 messages (prefetched rate slots). The sink must have received N messages, else the run
fails.

Host variants: ``host`` is one engine whose `HostLimiter` asks the limiter service (its
CPU counted) for every connection and for rate slots (prefetched: these rates are far above
400/s, so one request brings 64 slots, `ferrymail.orchestrator.prefetch`, as for Redis);
``host-noprefetch`` is the same with one slot per request (`prefetch.PREFETCH_MAX` 1 in
that run: every message asks, as before prefetch), the A/B of it; ``hostxN`` is N engine
processes
(forked, each draining N-th of the messages from its own spool, started together), the way
``ferrymail run --workers N`` shares limits; its rate is all messages over the slowest
process's time, compared with ``local`` (one engine, in-process limiter).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # bench/ is not a package: found via sys.path
from inbound import environment

from ferrymail.config import parse_running
from ferrymail.config.policies import Cluster as ClusterConfig
from ferrymail.delivery.engine import DeliveryEngine
from ferrymail.orchestrator import prefetch
from ferrymail.orchestrator.local import LocalLimiter
from ferrymail.spool import Envelope, SqliteSpool

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PREFETCH_MAX = prefetch.PREFETCH_MAX  # restored after a host-noprefetch run
SECTION = "## Shaping"
BODY = (b"From: a@bench.test\r\nTo: b@example.com\r\nSubject: shaping bench\r\n\r\n"
        + b"x" * 2000 + b"\r\n")

POLICIES = """
policies:
  - fields: [localip]
    default: {concurrency: 1000, rate: "1000000/1", connectinterval: 0.000001}
  - fields: [grouping]
    default: {rate: "1000000/1", burst: 1000}
  - default: {rate: "2000000/1"}
"""


def running_yaml(sink_port: int, policies: bool) -> str:
    return f"""
servers: [{{id: in, transport: t}}]
addresses:
  - {{id: s0, address: 127.0.0.2}}
  - {{id: s1, address: 127.0.0.3}}
transportgroups:
  - id: g
    connection:
      server: 127.0.0.1
      port: {sink_port}
      reuse: {{messages: 100, idle: 5s}}
      sourceip: {{ipv4: [s0, s1]}}
    retry: {{intervals: [{{interval: 1s}}]}}  # a transient failure costs a second, not a minute
    transports: [{{id: t}}]
queues: {{concurrency: 20}}
{POLICIES if policies else ""}
"""


@dataclass
class Run:
    variant: str
    rates: list[float]
    cpu: list[float]  # CPU seconds per 1,000 messages: this process (+ redis-server)
    asks: list[float]  # limiter round trips per message (Redis calls, service requests)
    conns: list[int]  # SMTP connections the engine(s) opened to the sink

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


async def one_run(d: Path, variant: str, sink_port: int, redis_url: str | None, n: int,
                  redis_pid: int | None = None, *, service: Path | None = None,
                  workers: int = 1, barrier: Any = None) -> tuple[float, float, float, int]:
    """(msg/s, CPU s per 1k messages, limiter round trips per message, connections opened)
    of one engine draining ``n`` messages."""
    spool = SqliteSpool(d / f"spool-{variant}-{time.monotonic_ns()}", fsync=False)
    await spool.start()
    try:
        for i in range(n):
            env = Envelope(sender="a@bench.test", recipients=(f"b{i}@example.com",),
                           client_ip="127.0.0.1", client_port=1, helo="bench", server_id="in",
                           size=len(BODY), received_at=time.time())
            await spool.store(env, BODY)
        cfg = parse_running(running_yaml(sink_port, variant != "none"))
        limiter = LocalLimiter()
        prefetch.PREFETCH_MAX = 1 if variant == "host-noprefetch" else PREFETCH_MAX
        if variant.startswith("host"):
            from ferrymail.orchestrator.host import HostLimiter

            assert service is not None
            limiter = HostLimiter(service, d, workers=workers)  # type: ignore[assignment]
        if variant == "redis":
            from ferrymail.orchestrator.redis import RedisLimiter

            assert redis_url is not None
            limiter = RedisLimiter(ClusterConfig(redis=redis_url, instance="bench"),
                                   default_instance="bench")  # type: ignore[assignment]
        engine = DeliveryEngine(spool, lambda: cfg, hostname="bench.test", limiter=limiter)
        if barrier is not None:
            barrier.wait(60)  # every engine process starts together
        t0 = time.monotonic()
        cpu0 = time.process_time() + (peers.cpu_seconds([redis_pid]) if redis_pid else 0.0)
        await engine.start()
        try:
            while await spool.count():
                if time.monotonic() - t0 > 60:
                    raise peers.BenchError(f"{variant}: spool not empty after 60 s")
                await asyncio.sleep(0.02)
            took = time.monotonic() - t0
            cpu = time.process_time() - cpu0
            if variant == "redis" and redis_pid:
                cpu += peers.cpu_seconds([redis_pid])
        finally:
            await engine.stop()
        asks = 0
        if variant in ("redis",) or variant.startswith("host"):
            assert limiter.status()["state"] == "shared", limiter.status()
            asks = (limiter.cluster.calls if variant == "redis"  # type: ignore[attr-defined]
                    else limiter.requests)  # type: ignore[attr-defined]
        return n / took, cpu * 1000 / n, asks / n, engine.connections_opened
    finally:
        await spool.close()


def _engine_process(args: tuple[Path, str, int, int, Path, int, Any], results: Any) -> None:
    import uvloop

    d, variant, sink_port, n, service, workers, barrier = args
    results.put(uvloop.run(one_run(d, variant, sink_port, None, n, service=service,
                                   workers=workers, barrier=barrier)))


def host_run(d: Path, variant: str, sink_port: int, n: int, service: Path, service_pid: int,
             workers: int) -> tuple[float, float, float, int]:
    """``hostxN``: N forked engine processes sharing the service; as `one_run`."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    share = n // workers
    cpu0 = peers.cpu_seconds([service_pid])
    procs = [ctx.Process(target=_engine_process, args=(
        (d, variant, sink_port, share, service, workers, barrier), results))
        for _ in range(workers)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
        if proc.exitcode != 0:
            raise peers.BenchError(f"{variant}: an engine process exited {proc.exitcode}")
    took = max(share / rate for rate, _, _, _ in got)
    cpu = sum(c * share / 1000 for _, c, _, _ in got) + peers.cpu_seconds([service_pid]) - cpu0
    asks = sum(a for _, _, a, _ in got) / workers
    conns = sum(n for _, _, _, n in got)
    return share * workers / took, cpu * 1000 / (share * workers), asks, conns


@contextlib.contextmanager
def limiter_service(d: Path):  # type: ignore[no-untyped-def]
    """A real limiter service process on ``d/limiter.sock``: (socket path, pid)."""
    from ferrymail.orchestrator.hostservice import socket_path

    path = socket_path(d)
    code = ("import sys, uvloop; from ferrymail.orchestrator.hostservice import serve; "
            "uvloop.run(serve(sys.argv[1]))")
    proc = peers.spawn([sys.executable, "-c", code, str(d)], d / "limiter.log")
    try:
        deadline = time.monotonic() + 15
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise peers.BenchError(f"limiter service not up: {peers.tail(d / 'limiter.log')}")
            time.sleep(0.02)
        yield path, proc.pid
    finally:
        peers.stop_process(proc)


@contextlib.contextmanager
def redis(d: Path):  # type: ignore[no-untyped-def]
    port = peers.free_port()
    proc = peers.spawn([peers.binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port),
                        "--save", "", "--appendonly", "no", "--dir", str(d)], d / "redis.log")
    try:
        peers.wait_listening("127.0.0.1", port, alive=lambda: proc.poll() is None,
                             what="redis-server")
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        peers.stop_process(proc)


def report(runs: list[Run], n: int, repeat: int, env: dict[str, str], command: str) -> str:
    by = {r.variant: r for r in runs}
    lines = [
        f"Measured {env['date']} on {env['machine']}; load average before the run "
        f"{env['loadavg']}.",
        "",
        f"Command: `{command}`",
        "",
        f"Load: {n} messages of 2 KB stored first, then one delivery engine (one process, "
        "uvloop) drains them to smtp-sink from two source IPs, 20 connections at most, 100 "
        f"messages per connection; median of {repeat} runs. Policies: concurrency, rate and "
        "connect interval per source IP, a rate per grouping and a global rate, none of "
        "them reached.",
        "",
        "| variant | msg/s (median) | runs | CPU s / 1k msg (median) | limiter round trips "
        "/ msg (median) | connections opened (median) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    labels = {"none": "no policies", "local": "policies, in-process limiter",
              "redis": "policies, Redis limiter",
              "host": "policies, host limiter service, 1 engine",
              "host-noprefetch": "policies, host limiter service, 1 engine, no prefetch"}
    for r in runs:
        if r.variant.startswith("hostx"):
            labels[r.variant] = (f"policies, host limiter service, {r.variant[5:]} engine "
                                 "processes")
    for r in runs:
        asks = f"{statistics.median(r.asks):.3f}" if any(r.asks) else "-"
        lines.append(f"| {labels[r.variant]} | {r.median:,.0f} | "
                     f"{', '.join(f'{x:,.0f}' for x in r.rates)} | {r.cpu_median:.3f} | "
                     f"{asks} | {statistics.median(r.conns):,.0f} |")
    lines += ["", "| ratio | msg/s | CPU per message |", "|---|---:|---:|"]
    if "none" in by:
        for v in ("local", "redis"):
            if v in by:
                lines.append(f"| {v} / none | {by[v].median / by['none'].median:.2f} | "
                             f"{by[v].cpu_median / by['none'].cpu_median:.2f} |")
    if "local" in by:
        for v in by:
            if v.startswith("host"):
                lines.append(f"| {v} / local | {by[v].median / by['local'].median:.2f} | "
                             f"{by[v].cpu_median / by['local'].cpu_median:.2f} |")
    if "host" in by and "host-noprefetch" in by:
        a, b = by["host"], by["host-noprefetch"]
        lines.append(f"| host / host-noprefetch | {a.median / b.median:.2f} | "
                     f"{a.cpu_median / b.cpu_median:.2f} |")
    lines += ["", "Rate slots are prefetched for the Redis and host variants "
              "(`orchestrator/prefetch.py`; these rates are far above 400/s: 64 slots a "
              "request, but a kept slot is dropped 5 ms after its time, so at this pace one "
              "request serves about 10 messages); the other round trips are per new "
              "connection (with Redis also the heartbeat). Limiter round trips: Redis "
              "`Cluster.calls`, the host limiter's `requests` (requests with a reply). "
              "Connections opened: the engine's new SMTP sessions (hostxN: all engines'); "
              "at 100 messages a session the least is N/100 plus the slow start.",
              "", "CPU is this process's (the engine's) plus, for the Redis variant, "
              "redis-server's, for the host variants the limiter service's (and every engine "
              "process's); it is less sensitive than msg/s to other load on the machine. "
              "hostxN: every message over the slowest engine process's time; on 2 cores shared "
              "with other jobs, N engines, the service and smtp-sink compete for the cores, so "
              "CPU per message is the cost figure rather than msg/s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", default="none,local,redis,host,host-noprefetch,hostx2",
                   help="variants, comma-separated (hostxN: N engine processes; "
                        "host-noprefetch: one rate slot per request)")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    variants = [v for v in args.only.split(",") if v]
    env = environment()
    import uvloop

    runs: dict[str, Run] = {v: Run(v, [], [], [], []) for v in variants}
    with (peers.workdir("bench-shaping-") as d, peers.smtp_sink(d) as sink,
          redis(d) as (url, pid), limiter_service(d) as (service, service_pid)):
        for i in range(args.repeat):  # interleaved, so that machine noise hits all alike
            for v in variants:
                if v.startswith("hostx"):
                    rate, cpu, asks, conns = host_run(d, v, sink.port, args.messages, service,
                                               service_pid, int(v[5:]))
                elif v in ("host", "host-noprefetch"):
                    cpu0 = peers.cpu_seconds([service_pid])
                    rate, cpu, asks, conns = uvloop.run(one_run(
                        d, v, sink.port, None, args.messages, service=service))
                    cpu += (peers.cpu_seconds([service_pid]) - cpu0) * 1000 / args.messages
                else:
                    rate, cpu, asks, conns = uvloop.run(one_run(
                        d, v, sink.port, url, args.messages, pid))
                runs[v].rates.append(rate)
                runs[v].cpu.append(cpu)
                runs[v].asks.append(asks)
                runs[v].conns.append(conns)
                print(f"run {i + 1} {v}: {rate:,.0f} msg/s, {cpu:.3f} CPU s/1k, "
                      f"{asks:.3f} limiter round trips/msg, {conns} connections",
                      file=sys.stderr)
    command = "python bench/shaping.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(list(runs.values()), args.messages, args.repeat, env, command.strip())
    print(text)
    if args.write_results:
        peers.replace_section(RESULTS, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
