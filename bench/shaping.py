"""Delivery rate with shaping policies whose limits never bind, side by side in one run:
no policies, the in-process limiter, and the Redis limiter (a real redis-server).

    .venv/bin/python bench/shaping.py [--messages 4000] [--repeat 3] [--write-results]

Per variant: N messages of 2 KB are stored in a fresh spool (fsync off: the spool is not what
is measured), then one delivery engine on this process's uvloop is started and timed until
the spool is empty; smtp-sink (discarding) is the MX, reached from two source IPs
(127.0.0.2, 127.0.0.3). The policies give concurrency, a rate and a connect interval per
source IP, a rate per grouping and a global rate, all far above what is reached, so the
difference is the cost of asking: with Redis one script per new connection and one per
message. The sink must have received N messages, else the run fails.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # bench/ is not a package: found via sys.path
from inbound import environment

from ferrymail.config import parse_running
from ferrymail.config.policies import Cluster as ClusterConfig
from ferrymail.delivery.engine import DeliveryEngine
from ferrymail.orchestrator.local import LocalLimiter
from ferrymail.spool import Envelope, SqliteSpool

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
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
    server_cpu: list[float]  # of which redis-server's
    calls: list[float]  # Redis calls per message (scripts and commands)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def server_median(self) -> float:
        return statistics.median(self.server_cpu) if self.server_cpu else 0.0

    @property
    def calls_median(self) -> float:
        return statistics.median(self.calls) if self.calls else 0.0


async def one_run(d: Path, variant: str, sink_port: int, redis_url: str | None, n: int,
                  redis_pid: int | None = None) -> tuple[float, float, float, float]:
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
        shared = None
        if variant == "redis":
            from ferrymail.orchestrator.redis import RedisLimiter

            assert redis_url is not None
            shared = RedisLimiter(ClusterConfig(redis=redis_url, instance="bench"),
                                  default_instance="bench")
            limiter = shared  # type: ignore[assignment]
        engine = DeliveryEngine(spool, lambda: cfg, hostname="bench.test", limiter=limiter)
        t0 = time.monotonic()
        server0 = peers.cpu_seconds([redis_pid]) if variant == "redis" and redis_pid else 0.0
        cpu0 = time.process_time()
        await engine.start()
        try:
            while await spool.count():
                if time.monotonic() - t0 > 60:
                    raise peers.BenchError(f"{variant}: spool not empty after 60 s")
                await asyncio.sleep(0.02)
            took = time.monotonic() - t0
            cpu = time.process_time() - cpu0
            server = 0.0
            if variant == "redis" and redis_pid:
                server = peers.cpu_seconds([redis_pid]) - server0
        finally:
            await engine.stop()
        calls = 0.0
        if shared is not None:
            assert shared.status()["state"] == "shared", shared.status()
            calls = shared.cluster.calls / n
        return n / took, (cpu + server) * 1000 / n, server * 1000 / n, calls
    finally:
        await spool.close()


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
        "| variant | msg/s (median) | runs | CPU s / 1k msg (median) | of which redis-server "
        "| Redis calls / msg |",
        "|---|---:|---|---:|---:|---:|",
    ]
    labels = {"none": "no policies", "local": "policies, in-process limiter",
              "redis": "policies, Redis limiter"}
    for r in runs:
        lines.append(f"| {labels[r.variant]} | {r.median:,.0f} | "
                     f"{', '.join(f'{x:,.0f}' for x in r.rates)} | {r.cpu_median:.3f} | "
                     f"{r.server_median:.3f} | {r.calls_median:.3f} |")
    lines += ["", "| ratio | msg/s | CPU per message |", "|---|---:|---:|"]
    if "none" in by:
        for v in ("local", "redis"):
            if v in by:
                lines.append(f"| {v} / none | {by[v].median / by['none'].median:.2f} | "
                             f"{by[v].cpu_median / by['none'].cpu_median:.2f} |")
    lines += ["", "CPU is this process's (the engine's) plus, for the Redis variant, "
              "redis-server's; it is less sensitive than msg/s to other load on the machine.",
              "",
              "Target (issue 8): Redis round trips cost at most 10 % of rate and CPU/msg against "
              "no policies. Round trips are already below one per message: one script per new "
              "connection (acquire, connected, release) and one per message batch (rates above "
              "400/s take up to 64 slots per call, kept at most 5 ms past their time), so "
              "'Redis calls / msg' stays near 0.2; one call costs ~0.08 ms of client CPU and "
              "~0.04 ms of redis-server CPU (measured alone with redis-py asyncio EVALSHA). What "
              "cost rate beyond that was messages waiting for the fetch in flight: kept slots "
              "are now refetched in the background when they are within 2 ms of running out "
              "(2026-12-01: 0.77 -> 0.87 of the no-policies rate, CPU/msg 1.26 -> 1.15 in the "
              "same session). The rest is the engine's own waits on a batch fetch and redis-py's "
              "per-call overhead on this CPU-bound single process."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", default="none,local,redis")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    variants = [v for v in args.only.split(",") if v]
    env = environment()
    import uvloop

    runs: dict[str, Run] = {v: Run(v, [], [], [], []) for v in variants}
    with (peers.workdir("bench-shaping-") as d, peers.smtp_sink(d) as sink,
          redis(d) as (url, pid)):
        for i in range(args.repeat):  # interleaved, so that machine noise hits all alike
            for v in variants:
                rate, cpu, server, calls = uvloop.run(
                    one_run(d, v, sink.port, url, args.messages, pid))
                runs[v].rates.append(rate)
                runs[v].cpu.append(cpu)
                runs[v].server_cpu.append(server)
                runs[v].calls.append(calls)
                print(f"run {i + 1} {v}: {rate:,.0f} msg/s, {cpu:.3f} CPU s/1k", file=sys.stderr)
    command = "python bench/shaping.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(list(runs.values()), args.messages, args.repeat, env, command.strip())
    print(text)
    if args.write_results:
        peers.replace_section(RESULTS, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
