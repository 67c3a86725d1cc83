"""The scheduler under adversity, side by side: ferrymail and Postfix, same topology.

    .venv/bin/python bench/adversity.py [--live 2000] [--domains 2000] [--mtas ferrymail,postfix]
                                        [--timeout 300] [--write-results]

Each row is one fresh MTA instance relaying from loopback. Messages are injected over SMTP
while delivery is held (ferrymail: ``queues.hold``; Postfix: the hold queue), then released;
the time runs until the smtp-sink counter has every live message.

- (a) live only: ``--live`` messages over 1,000 live domains;
- (b) live + dead half: the same plus as many messages for 400 dead domains, in four kinds
  of next hop: a refusing port, a tarpit (accepts, never answers), a byte-dripping banner and
  an MX silent after DATA (`hostile.py`, one process);
- (c) ``--live`` messages over ``--domains`` domains on one MX vs the same to one domain.

Topology for both MTAs: one fixed next hop per class of domain (ferrymail: a transport with
``connection.server``; Postfix: ``transport_maps``), default timeouts, concurrency 20 per
destination and 100 in total (Postfix: ``default_process_limit``). Reported: live msg/s per
row, the ratios (b)/(a) and (c) many/one, and ferrymail/Postfix per row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # bench/ is not a package: found via sys.path
from inbound import environment
from outbound import wait_catching_sighup
from peers import BenchError, Peer

from ferrymail.delivery.connect import Source, Timeouts
from ferrymail.smtp.client import SMTPClient, TLSMode

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## Adversity: dead half and many domains (bench/adversity.py)"
HOST = "127.0.0.1"
KINDS = ("refuse", "tarpit", "drip", "silent")
LIVE_DOMAINS = 1000
DEAD_DOMAINS = 100  # per kind
BODY = (b"From: bench@origin.test\r\nSubject: adversity\r\n\r\n" + b"x" * 1000 + b"\r\n")
INJECT_SESSIONS = 10


@dataclass(frozen=True)
class Row:
    key: str  # a, b, c-many, c-one
    title: str
    live: Callable[[int, int], list[str]]  # (n, domains) -> recipients
    dead: bool


def live_rcpts(n: int, domains: int) -> list[str]:
    return [f"u{i}@d{i % domains}.live.test" for i in range(n)]


ROWS = [
    Row("a", "(a) live only", lambda n, d: live_rcpts(n, LIVE_DOMAINS), False),
    Row("b", "(b) live + dead half", lambda n, d: live_rcpts(n, LIVE_DOMAINS), True),
    Row("c-many", "(c) many domains, one MX", live_rcpts, False),
    Row("c-one", "(c) one domain", lambda n, d: live_rcpts(n, 1), False),
]


def dead_rcpts(n: int) -> list[str]:
    return [f"u{i}@d{i % DEAD_DOMAINS}.{KINDS[i % len(KINDS)]}.test" for i in range(n)]


@contextlib.contextmanager
def hostile(d: Path) -> Iterator[dict[str, int]]:
    """hostile.py with a tarpit, a dripping banner and a silent-after-DATA MX; and a port
    where nothing listens."""
    ports = {k: peers.free_port(HOST) for k in KINDS}
    proc = peers.spawn([sys.executable, str(Path(__file__).with_name("hostile.py")),
                        "--tarpit", f"{HOST}:{ports['tarpit']}",
                        "--drip", f"{HOST}:{ports['drip']}",
                        "--silent-data", f"{HOST}:{ports['silent']}"], d / "hostile.log")
    try:
        for k in ("tarpit", "drip", "silent"):
            peers.wait_listening(HOST, ports[k], alive=lambda: proc.poll() is None,
                                 what="hostile.py")
        yield ports
    finally:
        peers.stop_process(proc)


def next_hops(sink: Peer, ports: dict[str, int]) -> dict[str, int]:
    return {"live": sink.port, **ports}


# --- the MTAs ---------------------------------------------------------------------------------

def ferrymail_running(hops: dict[str, int], hold: bool) -> str:
    routes = "\n".join(f'  - {{recipientdomain: "*.{k}.test", transport: {k}}}' for k in hops)
    transports = "\n".join(f"      - {{id: {k}, connection: {{server: {HOST}, port: {p}}}}}"
                           for k, p in hops.items())
    return f"""\
queues: {{hold: {str(hold).lower()}, concurrency: 20, total_concurrency: 100}}
servers:
  - id: bench
    transport: live
    domains: [example.com]
    relay_networks: [127.0.0.0/8]
routing:
{routes}
transportgroups:
  - id: g
    connection: {{tls: {{mode: disabled}}}}
    transports:
{transports}
"""


class MTA:
    name = ""
    port = 0

    def before_release(self) -> None:
        """Untimed preparation of `release`."""

    def release(self) -> None:
        raise NotImplementedError

    def queued(self) -> int:
        raise NotImplementedError


class Ferrymail(MTA):
    name = "ferrymail"

    def __init__(self, peer: Peer, hops: dict[str, int]) -> None:
        self.peer, self.hops, self.port = peer, hops, peer.port
        wait_catching_sighup(peer.pids()[0])
        peers.ferrymail_reload(peer, ferrymail_running(hops, hold=True))

    def release(self) -> None:
        peers.ferrymail_reload(self.peer, ferrymail_running(self.hops, hold=False))

    def queued(self) -> int:
        return peers.spool_messages(Path(str(self.peer.extra["spool"])))


class Postfix(MTA):
    name = "postfix"

    def __init__(self, peer: Peer) -> None:
        self.peer, self.port = peer, peer.port

    def before_release(self) -> None:
        peers.postfix_command(self.peer, "postsuper", "-H", "ALL")  # hold -> deferred

    def release(self) -> None:
        peers.postfix_command(self.peer, "postqueue", "-f")

    def queued(self) -> int:
        return sum(peers.postfix_queue_counts(self.peer.workdir).values())


def postfix_settings(sink: Peer, hops: dict[str, int]) -> dict[str, str]:
    s = peers.postfix_relay_settings(HOST, sink.port, HOST, concurrency=20, hold=True)
    maps = ", ".join(f".{k}.test=smtp:[{HOST}]:{p}" for k, p in hops.items())
    s.update({"transport_maps": f"inline:{{ {maps} }}", "default_process_limit": "100",
              "initial_destination_concurrency": "5", "relayhost": ""})
    return s


@contextlib.contextmanager
def start(kind: str, d: Path, sink: Peer, hops: dict[str, int]) -> Iterator[MTA]:
    if kind == "ferrymail":
        with peers.ferrymail(d) as fm:
            yield Ferrymail(fm, hops)
    else:
        with peers.postfix(d, settings=postfix_settings(sink, hops),
                           services=peers.POSTFIX_SMTP_SERVICE) as pf:
            yield Postfix(pf)


# --- injecting and timing ---------------------------------------------------------------------

async def inject(port: int, rcpts: list[str]) -> None:
    """One message per recipient over INJECT_SESSIONS reused sessions."""
    src = Source(None, "inject.bench")

    async def session(part: list[str]) -> None:
        client = await SMTPClient.connect(src, HOST, port, tls=TLSMode.DISABLED,
                                          timeouts=Timeouts(command=60, data=60))
        try:
            for r in part:
                result = await client.send("bench@origin.test", [r], BODY)
                if result.reply.code != 250:
                    raise BenchError(f"injecting to {r}: {result.reply}")
        finally:
            await client.quit()
    await asyncio.gather(*(session(rcpts[i::INJECT_SESSIONS]) for i in range(INJECT_SESSIONS)
                           if rcpts[i::INJECT_SESSIONS]))


def wait_for(cond: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(what())
        time.sleep(0.01)


def run_row(kind: str, row: Row, args: argparse.Namespace, sink: Peer,
            hops: dict[str, int]) -> float:
    """Live msg/s for one row with one MTA (a fresh instance)."""
    live = row.live(args.live, args.domains)
    dead = dead_rcpts(args.live) if row.dead else []
    with peers.workdir(f"adv-{kind}-") as d, start(kind, d, sink, hops) as mta:
        rcpts = [r for pair in zip(live, dead, strict=True) for r in pair] if dead else live
        asyncio.run(inject(mta.port, rcpts))
        total = len(live) + len(dead)
        wait_for(lambda: mta.queued() >= total, 60,
                 lambda: f"{kind}: {mta.queued()} of {total} queued")
        base = peers.sink_counter(sink)
        mta.before_release()
        t0 = time.monotonic()
        mta.release()
        wait_for(lambda: peers.sink_counter(sink) - base >= len(live), args.timeout,
                 lambda: f"{kind} {row.key}: {peers.sink_counter(sink) - base} of "
                 f"{len(live)} live messages in {args.timeout}s")
        took = time.monotonic() - t0
        if row.dead and peers.sink_counter(sink) - base != len(live):
            raise BenchError(f"{kind}: dead-half mail reached the sink")
    return len(live) / took


def report(rates: dict[tuple[str, str], float], runs: dict[tuple[str, str], list[float]],
           mtas: list[str], args: argparse.Namespace, command: str) -> str:
    lines = [f"`{command}`", "",
             f"{args.live} live messages per row (1,000 B bodies); (b) adds {args.live} for "
             f"dead next hops; (c) spreads them over {args.domains} domains on one MX. "
             f"Median of {args.repeat} interleaved run(s) (min-max in brackets).", "",
             "| Row | " + " | ".join(f"{m} msg/s" for m in mtas)
             + (" | ferrymail/postfix |" if len(mtas) == 2 else " |"),
             "|---|" + "---:|" * (len(mtas) + (1 if len(mtas) == 2 else 0))]
    for row in ROWS:
        cells = [f"{rates[(m, row.key)]:.0f} ({min(runs[(m, row.key)]):.0f}-"
                 f"{max(runs[(m, row.key)]):.0f})" if (m, row.key) in rates else "-"
                 for m in mtas]
        ratio = ""
        if len(mtas) == 2 and all((m, row.key) in rates for m in mtas):
            ratio = f" {rates[(mtas[0], row.key)] / rates[(mtas[1], row.key)]:.2f} |"
        lines.append(f"| {row.title} | " + " | ".join(cells) + " |" + ratio)
    lines += ["", "| Ratio | " + " | ".join(mtas) + " | target |",
              "|---|" + "---:|" * len(mtas) + "---|"]
    for title, num, den, target in (("(b)/(a)", "b", "a", "≥ 0.8"),
                                    ("(c) many/one", "c-many", "c-one", "≥ 0.9")):
        cells = [f"{rates[(m, num)] / rates[(m, den)]:.2f}"
                 if (m, num) in rates and (m, den) in rates else "-" for m in mtas]
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {target} |")
    env = environment()
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
              "Notes:",
              "- Each row is a fresh instance; messages are injected over SMTP (10 sessions) "
              "while delivery is held, then released (ferrymail: running file with `hold: "
              "false` + SIGHUP; Postfix: `postsuper -H ALL` untimed, `postqueue -f` timed); "
              "the clock stops when smtp-sink has counted every live message.",
              "- ferrymail: transports with a fixed `connection.server` per class (so all "
              "live domains share one next-hop queue), `concurrency: 20`, "
              "`total_concurrency: 100`, default timeouts and `queues.destination` defaults. "
              "Postfix: `transport_maps` to the same next hops, "
              "`default_destination_concurrency_limit = 20`, "
              "`initial_destination_concurrency = 5`, `default_process_limit = 100`, "
              "connection cache on demand, default timeouts.",
              "- The dead half: a refusing port, a tarpit, a banner dripped a byte every 0.5 s "
              "and an MX silent after DATA, 100 domains each (`bench/hostile.py`). None of it "
              "may reach the sink.",
              "- The machine is shared with other work (see loadavg): single runs vary a lot; "
              "compare the medians and ranges, not one run."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--live", type=int, default=2000, help="live messages per row")
    p.add_argument("--domains", type=int, default=2000, help="domains on one MX in (c)")
    p.add_argument("--mtas", default="ferrymail,postfix")
    p.add_argument("--rows", default=",".join(r.key for r in ROWS))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per row")
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs per row and MTA")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    mtas = [m.strip() for m in args.mtas.split(",") if m.strip()]
    rows = [r for r in ROWS if r.key in args.rows.split(",")]
    runs: dict[tuple[str, str], list[float]] = {}
    with peers.workdir("adv-") as d, peers.dumping_sink(d) as sink, hostile(d) as ports:
        hops = next_hops(sink, ports)
        for n in range(args.repeat):  # interleaved, so load on the shared machine spreads
            for row in rows:
                for kind in mtas:
                    rate = run_row(kind, row, args, sink, hops)
                    runs.setdefault((kind, row.key), []).append(rate)
                    print(f"run {n + 1}: {row.title:28} {kind:10} {rate:8.0f} msg/s",
                          flush=True)
    rates = {k: statistics.median(v) for k, v in runs.items()}
    text = report(rates, runs, mtas, args,
                  peers.command_line("bench/adversity.py", argv))
    print(text)
    if args.write_results:
        peers.replace_section(RESULTS, HEADING, text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench/adversity.py: {e}", file=sys.stderr)
        sys.exit(1)
