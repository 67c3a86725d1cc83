"""The scheduler under adversity, with real listeners on loopback: a refusing port, a tarpit
(accepts, never answers), a byte-dripping banner and an MX silent after DATA, next to
smtp-sink for the live domains. Live mail keeps >= 80 % of its rate without the dead half,
fresh live mail leaves within seconds, and the dead backlog stays queued.

Counts are small (the machine is shared): rates are compared as a ratio with a margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ferrymail.config import parse_running
from ferrymail.delivery.engine import DeliveryEngine
from ferrymail.spool import Envelope, SqliteSpool
from tests.integration.outbound_harness import MESSAGE, LogCapture, run
from tests.realpeers import free_port, smtp_sink, stop, wait_listening

HOSTILE = Path(__file__).resolve().parents[2] / "bench" / "hostile.py"
KINDS = ("refuse", "tarpit", "drip", "silent")
LIVE_DOMAINS = 20
DEAD_DOMAINS = 5  # per kind
ROUNDS_MAX = 5


@contextlib.contextmanager
def hostile_peers() -> Iterator[dict[str, int]]:
    """bench/hostile.py as its own process; ports per kind ("refuse": nothing listens)."""
    ports = {k: free_port() for k in KINDS}
    proc = subprocess.Popen(
        [sys.executable, str(HOSTILE), "--tarpit", f"127.0.0.1:{ports['tarpit']}",
         "--drip", f"127.0.0.1:{ports['drip']}",
         "--silent-data", f"127.0.0.1:{ports['silent']}", "--drip-interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        for k in ("tarpit", "drip", "silent"):
            wait_listening("127.0.0.1", ports[k], proc=proc)
        yield ports
    finally:
        stop(proc)


def config(sink_port: int, ports: dict[str, int], hold: bool) -> str:
    routes = "\n".join(f'  - {{recipientdomain: "*.{k}.test", transport: {k}}}' for k in KINDS)
    transports = "\n".join(
        f"      - {{id: {k}, connection: {{server: 127.0.0.1, port: {ports[k]}}}}}"
        for k in KINDS)
    return f"""
servers: [{{id: in, transport: live}}]
routing:
{routes}
queues:
  concurrency: 10
  total_concurrency: 20
  hold: {'true' if hold else 'false'}
  destination: {{dead_after: 2, dead_backoff: 60s}}
transportgroups:
  - id: g
    connection:
      tls: {{mode: disabled}}
      timeout: {{min_rate_grace: 2s}}
    retry: {{intervals: [{{interval: 60s}}]}}
    transports:
      - {{id: live, connection: {{server: 127.0.0.1, port: {sink_port}}}}}
{transports}
"""


def envelope(rcpt: str) -> Envelope:
    return Envelope(sender="s@origin.test", recipients=(rcpt,), client_ip="127.0.0.1",
                    client_port=1, helo="h", server_id="in", size=len(MESSAGE),
                    received_at=time.time())


def dump_count(sink) -> int:
    return sum(1 for _ in sink.dump_dir.iterdir())


async def wait_count(sink, n: int, timeout: float) -> float:
    """Seconds until smtp-sink holds n messages."""
    t0 = time.monotonic()
    while dump_count(sink) < n:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"smtp-sink got {dump_count(sink)} of {n} in {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def cycle(tmp: Path, sink, ports: dict[str, int], live: int, dead: int
                ) -> tuple[float, DeliveryEngine, SqliteSpool]:
    """Store ``live`` live and ``dead`` dead messages held, release, and time the live ones;
    returns the live rate (msg/s) and the still running engine and spool."""
    spool = SqliteSpool(tmp / "spool", fsync=False)
    await spool.start()
    holder = [parse_running(config(sink.port, ports, hold=True))]
    eng = DeliveryEngine(spool, lambda: holder[0], hostname="mta.test", stop_grace=0.5)
    await eng.start()
    for i in range(max(live, dead)):
        if i < live:
            await spool.store(envelope(f"u{i}@d{i % LIVE_DOMAINS}.live.test"), MESSAGE)
        if i < dead:
            kind = KINDS[i % len(KINDS)]
            await spool.store(envelope(f"u{i}@d{i % DEAD_DOMAINS}.{kind}.test"), MESSAGE)
    base = dump_count(sink)
    holder[0] = parse_running(config(sink.port, ports, hold=False))
    t0 = time.monotonic()
    eng.config_changed(holder[0])
    # the spool's count is cheap to poll: the live mail is out when only the dead half is left
    while await spool.count() > dead:
        if time.monotonic() - t0 > 25:
            raise TimeoutError(f"{await spool.count() - dead} live messages left after 25 s")
        await asyncio.sleep(0.005)
    took = time.monotonic() - t0
    await wait_count(sink, base + live, timeout=5)  # and smtp-sink has every one
    return live / took, eng, spool


# The target, live + dead half >= 0.8 x live only, is a speed target: it is judged by
# bench/adversity.py on a quiet machine (bench/RESULTS.md). This test keeps a floor that only
# starvation breaks (before the fix: 999 of 10,000 live messages in 120 s, ratio ~0.1), with
# room for the load of a shared CI machine (ratios of 0.65-1.4 seen here under load).
SUITE_RATIO = 0.5


def pair_ratios(rates: dict[str, list[float]]) -> list[float]:
    """Each round's dead-half rate over its live-only rate."""
    return [b / a for a, b in zip(rates["a"], rates["b"], strict=False)]


def test_dead_half_does_not_starve_live_mail(tmp_path):
    """Live only vs live + dead half, one right after the other in each round (the machine is
    shared: each round's ratio compares runs under similar load, and the median of 3 to
    ROUNDS_MAX rounds' ratios is judged); then fresh live mail beside the dead backlog."""
    live_n, dead_n = 500, 500
    with hostile_peers() as ports, smtp_sink() as sink, LogCapture() as logs:
        async def main() -> None:
            rates: dict[str, list[float]] = {"a": [], "b": []}
            eng = spool = None
            for n in range(ROUNDS_MAX):  # alternate; stop once the best-of ratio is met
                for variant, dead in (("a", 0), ("b", dead_n)):
                    if eng is not None:
                        await eng.stop()
                        await spool.close()
                    rate, eng, spool = await cycle(tmp_path / f"{variant}{n}", sink, ports,
                                                   live_n, dead)
                    rates[variant].append(rate)
                if n >= 2 and statistics.median(pair_ratios(rates)) >= SUITE_RATIO:
                    break
            assert eng is not None and spool is not None  # the last dead-half run goes on
            try:
                # the refusing next hop is dead; the dripping banner is cut off by min_rate
                await logs.wait(r"destination\.state .*refuse.* to=dead", timeout=10)
                await logs.wait(r"banner from .* cut off: \d+ bytes in", timeout=10)
                # fresh live mail leaves within seconds while the dead backlog stays queued
                base = dump_count(sink)
                for i in range(20):
                    await spool.store(envelope(f"fresh{i}@d{i}.live.test"), MESSAGE)
                    eng.wake()
                fresh_s = await wait_count(sink, base + 20, timeout=10)
                left = await spool.count()
                give_up = time.monotonic() + 5  # results are recorded after the sink's 250
                while left > dead_n and time.monotonic() < give_up:
                    await asyncio.sleep(0.02)
                    left = await spool.count()
                states = {d["destination"]: d["state"] for d in eng.scheduler.destinations()}
            finally:
                await eng.stop()
                await spool.close()
            ratio = statistics.median(pair_ratios(rates))
            print(f"live only {rates['a']} msg/s, with the dead half {rates['b']} msg/s "
                  f"(median of the rounds' ratios {ratio:.2f}); fresh mail in {fresh_s:.2f}s")
            assert ratio >= SUITE_RATIO, rates
            assert fresh_s < 5.0
            assert left == dead_n  # nothing of the dead half delivered, nothing lost
            assert states.get(f"refuse/127.0.0.1:{ports['refuse']}") == "dead"
            assert not any(s == "dead" for d, s in states.items() if d.startswith("live/"))

        run(main, timeout=120)
    # one log line per transition, and every dead job deferred without a connection
    assert logs.lines("destination.state")
    assert "delivery temporarily suspended" in logs.text()


def test_queue_list_shows_a_dead_destination(ferrymail_proc, tmp_path: Path):
    """A real ferrymail process: a next hop that refuses connections turns dead (one log line
    per transition) and ``queue list`` shows it beside the deferred message."""
    from tests.integration.conftest import listener, run_cli, server, startup_yaml

    port, refuse = free_port(), free_port()
    running = f"""
servers:
  - {{id: s, transport: t, domains: [dead.test], relay_networks: [127.0.0.0/8]}}
queues: {{destination: {{dead_after: 1, dead_backoff: 120s}}}}
transportgroups:
  - id: g
    transports: [{{id: t, connection: {{server: 127.0.0.1, port: {refuse}}}}}]
"""
    proc = ferrymail_proc(startup_yaml(tmp_path, [server("s", [listener(port)])]), running,
                          wait=[("127.0.0.1", port)])
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"HELO t\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@dead.test>\r\nDATA\r\n")
        while not f.readline().startswith(b"354"):
            pass
        s.sendall(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        assert f.readline().startswith(b"250")
    (line,) = proc.wait_log(r"event=destination\.state .*to=dead", timeout=10)
    assert f"destination=t/127.0.0.1:{refuse}" in line and "from=slow_start" in line
    deadline = time.monotonic() + 10
    while True:  # the state file follows within STATE_WRITE_EVERY
        out = run_cli("queue", "list", "--startup", str(proc.startup_path), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        if f"t/127.0.0.1:{refuse}  dead" in out.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    row = next(x for x in out.stdout.splitlines() if f"t/127.0.0.1:{refuse}" in x)
    assert " dead 1" in row and "failures=1" in row and "refused" in row, out.stdout
    assert "    <b@dead.test>  deferred" in out.stdout
    assert out.stdout.splitlines()[-1] == "1 message(s)"


def test_a_dead_destination_probes_after_its_period_and_revives(tmp_path):
    """Refused: dead after one failure, its mail deferred without connecting; once the
    period is over the deferred mail comes due, one probe goes out, the next hop now answers
    (smtp-sink started on the port), and the destination is back in slow start: all delivered."""
    port = free_port()
    cfg = parse_running(f"""
servers: [{{id: in, transport: t}}]
queues: {{destination: {{dead_after: 1, dead_backoff: 1s}}}}
transportgroups:
  - id: g
    connection: {{tls: {{mode: disabled}}}}
    retry: {{intervals: [{{interval: 1s}}]}}
    transports: [{{id: t, connection: {{server: 127.0.0.1, port: {port}}}}}]
""")
    with LogCapture() as logs:
        async def main() -> None:
            spool = SqliteSpool(tmp_path / "spool", fsync=False)
            await spool.start()
            eng = DeliveryEngine(spool, lambda: cfg, hostname="mta.test", stop_grace=0.5)
            await eng.start()
            try:
                for i in range(5):
                    await spool.store(envelope(f"u{i}@d{i}.test"), MESSAGE)
                eng.wake()
                await logs.wait(r"destination\.state .*from=slow_start to=dead", timeout=10)
                await logs.wait("delivery temporarily suspended", timeout=10)
                with smtp_sink(port=port) as sink:
                    await logs.wait(r"destination\.state .*from=dead to=probing", timeout=10)
                    await logs.wait(r"destination\.state .*from=probing to=slow_start "
                                    r".*reason=\"probe succeeded\"", timeout=10)
                    await wait_count(sink, 5, timeout=10)
                    async with asyncio.timeout(10):  # results recorded after the sink's 250
                        while await spool.count():
                            await asyncio.sleep(0.02)
            finally:
                await eng.stop()
                await spool.close()

        run(main, timeout=60)
    connects = logs.lines("delivery.connect_failed")
    # dead at the first refusal: at most the initial window (2) tried, then nothing until the
    # probe (which found smtp-sink)
    assert 1 <= len(connects) <= 2


def test_domains_with_the_same_mx_set_share_one_queue_after_the_first_lookup(tmp_path):
    """KumoMTA's MX rollup: once a lookup showed that a.test and b.test have the same MX
    set, their next mail shares that set's queue (and its health and concurrency)."""
    from ferrymail.delivery.scheduler import Destination
    from tests.integration.outbound_harness import dns_server

    dns_port = free_port()
    zone = {("a.test.", "MX"): ["10 mx.shared.test."], ("b.test.", "MX"): ["5 MX.shared.test."],
            ("c.test.", "MX"): ["10 mx.other.test."],
            ("mx.shared.test.", "A"): ["127.0.0.1"], ("mx.other.test.", "A"): ["127.0.0.1"]}
    with smtp_sink() as sink:
        async def main() -> None:
            cfg = parse_running(f"""
servers: [{{id: in, transport: t}}]
resolver: {{nameservers: [127.0.0.1], port: {dns_port}, timeout: 2}}
transportgroups:
  - id: g
    connection: {{port: {sink.port}, tls: {{mode: disabled}}}}
    transports: [{{id: t}}]
""")
            async with dns_server(zone, dns_port):
                spool = SqliteSpool(tmp_path / "spool", fsync=False)
                await spool.start()
                eng = DeliveryEngine(spool, lambda: cfg, hostname="mta.test", stop_grace=0.5)
                await eng.start()
                try:
                    for rcpt in ("u@a.test", "u@b.test", "u@c.test"):  # first: per domain
                        await spool.store(envelope(rcpt), MESSAGE)
                    eng.wake()
                    await wait_count(sink, 3, timeout=10)
                    sched = eng.scheduler
                    assert sched.mx_site("a.test") == sched.mx_site("B.test") == \
                        "mx:mx.shared.test"
                    assert sched.mx_site("c.test") == "mx:mx.other.test"
                    shared = Destination("t", "", f"mx:mx.shared.test:{sink.port}")
                    assert shared not in sched._health
                    for rcpt in ("v@a.test", "v@b.test"):  # now: one queue for both
                        await spool.store(envelope(rcpt), MESSAGE)
                    eng.wake()
                    await wait_count(sink, 5, timeout=10)
                    # the sink's dump file exists from the transaction's start: the result
                    # (and the queue's success) is recorded after its 250 has been read
                    deadline = time.monotonic() + 10
                    while shared not in sched._health \
                            or sched._health[shared].last_success is None:
                        assert time.monotonic() < deadline, "the shared queue saw no success"
                        await asyncio.sleep(0.02)
                finally:
                    await eng.stop()
                    await spool.close()

        run(main, timeout=40)
