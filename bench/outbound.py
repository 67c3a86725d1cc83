"""Outbound throughput, side by side: spool -> smtp-sink, ferrymail direct, ferrymail through
HAProxy (PROXY v1 and v2), and Postfix relaying.

    .venv/bin/python bench/outbound.py [--quick] [--sizes 2048,102400] [--only a,b]
                                       [--write-results]

Per variant and size, one cycle: the MTA accepts N messages from smtp-source while its delivery
is held (ferrymail: `queues.hold: true`; Postfix: every message goes to the hold queue), then
delivery is released (ferrymail: the running file with `hold: false` and SIGHUP; Postfix:
`postsuper -H ALL`, then `postqueue -f`) and timed until the spool (queue) is empty and the
sink has counted N. All variants deliver to the same smtp-sink, which appends what it receives
to a dump file; each cycle's dump must hold exactly N messages, N distinct queue ids of the MTA
(from its Received: header) and every one from the variant's source address, so a fast but
lossy or duplicating run fails. CPU is utime+stime from /proc of each process tree over the
timed drain.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sqlite3
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # bench/ is not a package: found via sys.path
import sidebyside
from inbound import environment, fmt_size
from peers import BenchError, Peer

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Outbound"
SINK_HOST = "127.0.0.1"
POLL = 0.02  # seconds between looks at the spool and the sink while draining


# --- the MTAs under test ----------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    sizes: list[int]
    messages: int  # per cycle at 2 KB; fewer for larger sizes (`messages_for`)
    repeat: int
    warmup: int
    sessions: int  # smtp-source sessions that pre-load the queue
    concurrency: int  # delivery sessions to the sink (ferrymail and Postfix alike)
    reuse: int  # messages per delivery session


messages_for = sidebyside.messages_for


class MTA:
    """One MTA whose delivery can be held and released; subclasses say how."""

    def __init__(self, peer: Peer, source: str, id_pattern: bytes, log: Path,
                 delivered_pattern: bytes, via: str) -> None:
        self.peer = peer
        self.source = source  # the address the sink must see
        self.id_rx = re.compile(id_pattern)  # the MTA's queue id in its Received: header
        self.log = log
        # a successful delivery in the MTA's log: groups (queue id, path taken)
        self.delivered_rx = re.compile(delivered_pattern, re.M)
        self.via = via  # the path every logged delivery must name

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def logged(self, offset: int) -> list[tuple[str, str]]:
        """(queue id, path) of each delivery the MTA logged after `offset`."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            data = f.read()
        return [(m.group(1).decode(), m.group(2).decode())
                for m in self.delivered_rx.finditer(data)]

    def hold(self) -> None:
        """Make sure mail accepted from now on stays queued."""

    def before_release(self) -> None:
        """Untimed preparation of `release`."""

    def release(self) -> None:
        """Start delivering what is queued (called with the clock running)."""
        raise NotImplementedError

    def queued(self) -> int:
        """Messages still queued."""
        raise NotImplementedError

    def stuck(self) -> str:
        """Why messages are still queued, for the error message."""
        return ""


class Ferrymail(MTA):
    def __init__(self, peer: Peer, source: str, running: Callable[[bool], str],
                 proxy: Peer | None) -> None:
        super().__init__(peer, source, rb"\(ferrymail\) with E?SMTP id (\w+)",
                         Path(str(peer.extra["log"])),
                         rb"^.* event=delivery\.attempt qid=(\w+) .* proxy=(\S+) "
                         rb".* result=delivered(?: worker=\d+)?$",
                         f"{proxy.host}:{proxy.port}" if proxy else "direct")
        self.running = running  # hold -> running config text
        self.spool = Path(str(peer.extra["spool"]))
        self.held = False

    def hold(self) -> None:
        if not self.held:
            self._reload(True)
            self.held = True

    def release(self) -> None:
        self._reload(False)
        self.held = False

    def _reload(self, hold: bool) -> None:
        pids = self.peer.pids()
        if pids:
            wait_catching_sighup(pids[0])
        peers.ferrymail_reload(self.peer, self.running(hold))

    def queued(self) -> int:
        return peers.spool_messages(self.spool)

    def stuck(self) -> str:
        with contextlib.closing(sqlite3.connect(f"file:{self.spool / 'spool.db'}?mode=ro",
                                                uri=True, timeout=5)) as db:
            rows = db.execute("SELECT state, last_reply, COUNT(*) FROM recipients"
                              " GROUP BY state, last_reply ORDER BY 3 DESC LIMIT 3").fetchall()
        return "; ".join(f"{n} {state}: {reply or '-'}" for state, reply, n in rows)


def catches_sighup(pid: int) -> bool | None:
    """Whether process `pid` has a handler for SIGHUP (SigCgt in /proc); None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                    return None
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & 1)  # SIGHUP is 1: the lowest bit
    except FileNotFoundError:
        return None
    return False


def wait_catching_sighup(pid: int, timeout: float = 15.0) -> None:
    """Wait until `pid` handles SIGHUP. ferrymail listens before it installs its handler,
    and a SIGHUP in between would terminate it (the default action): seen as a reload that
    never came, now and then, when a reload followed the start on a busy machine."""
    deadline = time.monotonic() + timeout
    while not (caught := catches_sighup(pid)):
        if caught is None:
            raise BenchError(f"process {pid} exited")
        if time.monotonic() > deadline:
            raise BenchError(f"process {pid} does not handle SIGHUP after {timeout:.0f}s")
        time.sleep(0.005)


class Postfix(MTA):
    def __init__(self, peer: Peer, source: str, sink: Peer) -> None:
        super().__init__(peer, source, rb"\(Postfix\) with E?SMTP id (\w+)",
                         Path(str(peer.extra["maillog"])),
                         rb"postfix/smtp\[\d+\]: (\w+): to=<[^>]*>, relay=([^,]+), "
                         rb".*status=sent",
                         f"{sink.host}[{sink.host}]:{sink.port}")

    def before_release(self) -> None:
        # hold -> deferred is bookkeeping (renames; qmgr does not look at the deferred queue
        # until told to), left out of the time
        peers.postfix_command(self.peer, "postsuper", "-H", "ALL")

    def release(self) -> None:
        peers.postfix_command(self.peer, "postqueue", "-f")

    def queued(self) -> int:
        return sum(peers.postfix_queue_counts(self.peer.workdir).values())

    def stuck(self) -> str:
        counts = peers.postfix_queue_counts(self.peer.workdir)
        log = peers.tail(Path(str(self.peer.extra["maillog"])), 3)
        return f"{counts}; maillog: {log}"


@dataclass
class Shared:
    """Peers all variants use: the sink, and HAProxy if a proxied variant runs."""

    sink: Peer
    proxy: Peer | None = None


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    source: str
    proxy_version: int | None  # ferrymail through HAProxy with this PROXY version
    postfix: bool = False


VARIANTS = [
    Variant("ferrymail-direct", "ferrymail, direct (bound to 127.0.0.2)", "127.0.0.2", None),
    Variant("ferrymail-haproxy-v1", "ferrymail via HAProxy, PROXY v1 (127.0.0.3)",
            "127.0.0.3", 1),
    Variant("ferrymail-haproxy-v2", "ferrymail via HAProxy, PROXY v2 (127.0.0.3)",
            "127.0.0.3", 2),
    Variant("postfix", "Postfix smtp, relayhost (bound to 127.0.0.4)", "127.0.0.4", None,
            postfix=True),
]
ALIASES = {"ferrymail": [v.key for v in VARIANTS if not v.postfix],
           "haproxy": ["ferrymail-haproxy-v1", "ferrymail-haproxy-v2"]}


def ferrymail_running_yaml(v: Variant, plan: Plan, sink: Peer, proxy: Peer | None,
                           hold: bool) -> str:
    """A running config whose only transport delivers as variant `v` to the sink."""
    conn = "{sourceip: {ipv4: [src]}}"
    if v.proxy_version is not None:
        assert proxy is not None
        conn = (f"{{sourceip: {{ipv4: [src]}}, proxyprotocol: {{server: {proxy.host}, "
                f"port: {proxy.port}, version: {v.proxy_version}}}}}")
    return f"""\
queues: {{hold: {str(hold).lower()}, concurrency: {plan.concurrency}, total_concurrency: 500}}
servers:
  - id: bench
    transport: out
    domains: [example.com]
    relay_networks: [127.0.0.0/8]
addresses:
  - {{id: src, address: {v.source}, hostname: {v.key}.ferrymail.bench}}
transportgroups:
  - id: bench
    connection:
      server: {sink.host}
      port: {sink.port}
      reuse: {{messages: {plan.reuse}, idle: 5}}
    transports:
      - id: out
        connection: {conn}
"""


def start_mta(v: Variant, stack: contextlib.ExitStack, d: Path, shared: Shared,
              plan: Plan) -> MTA:
    if v.postfix:
        settings = peers.postfix_relay_settings(shared.sink.host, shared.sink.port, v.source,
                                                concurrency=plan.concurrency, reuse=plan.reuse,
                                                hold=True)
        pf = stack.enter_context(peers.postfix(d, settings=settings,
                                               services=peers.POSTFIX_SMTP_SERVICE))
        return Postfix(pf, v.source, shared.sink)
    fm = stack.enter_context(peers.ferrymail(d))
    proxy = shared.proxy if v.proxy_version is not None else None
    mta = Ferrymail(fm, v.source,
                    lambda hold: ferrymail_running_yaml(v, plan, shared.sink, proxy, hold), proxy)
    mta.hold()
    return mta


# --- one cycle: pre-load, release, drain, check -----------------------------------------------

@dataclass
class Cycle:
    messages: int
    size: int
    preload_rate: float
    drain: float  # seconds from release until queue empty and sink counted everything
    mta_cpu: float
    proxy_cpu: float
    sink_cpu: float
    bench_cpu: float  # this script's polling
    busy: float  # CPU the whole machine spent meanwhile
    check: str

    @property
    def rate(self) -> float:
        return self.messages / self.drain if self.drain > 0 else 0.0

    @property
    def other_cores(self) -> float:
        mine = self.mta_cpu + self.proxy_cpu + self.sink_cpu + self.bench_cpu
        return max(0.0, self.busy - mine) / self.drain if self.drain > 0 else 0.0


def run_cycle(mta: MTA, shared: Shared, n: int, size: int, plan: Plan) -> Cycle:
    sink = shared.sink
    dump = Path(str(sink.extra["dump"]))
    mta.hold()
    if dump.exists():
        dump.write_bytes(b"")  # smtp-sink opens the dump per message: safe while it is idle
    base = peers.sink_counter(sink)
    preload = peers.run_smtp_source(mta.peer.host, mta.peer.port, n, size, plan.sessions,
                                    timeout=30 + n / 50)
    _wait_for(lambda: mta.queued() == n, 15.0,
              lambda: f"{mta.queued()} of {n} messages queued after pre-loading")
    if peers.sink_counter(sink) != base:
        raise BenchError(f"the sink received {peers.sink_counter(sink) - base} messages "
                         "while delivery was held")

    mta.before_release()
    log_offset = mta.log_size()
    roots = [mta.peer, shared.proxy, sink]
    cpu0 = [p.cpu() if p else 0.0 for p in roots]
    self0, busy0 = sidebyside.self_cpu(), peers.machine_busy_seconds()
    timeout = 30 + n / 20
    t0 = time.perf_counter()
    mta.release()
    while True:
        # the sink's counter is cheap to read; the queue is looked at once it is complete
        if peers.sink_counter(sink) - base >= n and mta.queued() == 0:
            drain = time.perf_counter() - t0
            break
        elapsed = time.perf_counter() - t0
        if elapsed > timeout:
            raise BenchError(f"not drained after {timeout:.0f}s: {mta.queued()} still queued, "
                             f"the sink got {peers.sink_counter(sink) - base}/{n}; "
                             f"{mta.stuck()}")
        time.sleep(POLL)
    cpu1 = [p.cpu() if p else 0.0 for p in roots]
    self1, busy1 = sidebyside.self_cpu(), peers.machine_busy_seconds()
    check = verify_delivery(mta, dump, n, log_offset,
                            sink_received=lambda: peers.sink_counter(sink) - base)
    mta_cpu, proxy_cpu, sink_cpu = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    return Cycle(n, size, preload.rate, drain, mta_cpu, proxy_cpu, sink_cpu, self1 - self0,
                 busy1 - busy0, check)


def _wait_for(cond: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(what())
        time.sleep(POLL)


CLIENT_ADDR = re.compile(rb"^X-Client-Addr: (\S*)\n", re.M)


def dump_summary(data: bytes, id_rx: re.Pattern[bytes]) -> tuple[Counter[str], list[str]]:
    """(client addresses, MTA queue ids) of the messages in an smtp-sink dump."""
    addrs = Counter(m.group(1).decode() for m in CLIENT_ADDR.finditer(data))
    return addrs, [m.group(1).decode() for m in id_rx.finditer(data)]


def verify_delivery(mta: MTA, dump: Path, n: int, log_offset: int,
                    sink_received: Callable[[], int], settle: float = 0.3,
                    log_wait: float = 5.0) -> str:
    """Check one cycle: the sink's dump holds n messages with n distinct queue ids of the MTA,
    all from mta.source, and the MTA logged exactly those n deliveries, all via mta.via.

    Waits `settle` seconds first, so a late extra delivery (a duplicate, a bounce) is seen,
    and up to `log_wait` for the MTA's log to catch up (Postfix logs through postlogd).
    """
    time.sleep(settle)
    data = dump.read_bytes() if dump.exists() else b""
    addrs, ids = dump_summary(data, mta.id_rx)
    total = sum(addrs.values())
    deadline = time.monotonic() + log_wait
    while len(logged := mta.logged(log_offset)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    problems = []
    if sink_received() != n:
        problems.append(f"the sink counted {sink_received()} messages")
    if total != n:
        problems.append(f"the dump holds {total} messages")
    if len(ids) != total:
        problems.append(f"{total - len(ids)} messages lack the MTA's Received: header")
    dups = len(ids) - len(set(ids))
    if dups:
        problems.append(f"{dups} duplicate deliveries")
    wrong = {a: c for a, c in addrs.items() if a != mta.source}
    if wrong:
        problems.append(f"sources other than {mta.source}: {dict(wrong)}")
    if len(logged) != n:
        problems.append(f"the MTA logged {len(logged)} deliveries")
    paths = Counter(via for _, via in logged if via != mta.via)
    if paths:
        problems.append(f"deliveries logged via {dict(paths)}, not {mta.via}")
    if {q for q, _ in logged} != set(ids):
        problems.append("the queue ids the MTA logged are not those the sink received")
    if problems:
        raise BenchError(f"delivery of {n} messages wrong: " + "; ".join(problems))
    return f"{n}/{n}, distinct, all from {mta.source}, as logged"


# --- running ----------------------------------------------------------------------------------

@dataclass
class Result(sidebyside.CycleStats):
    SPAN = "drain"

    variant: str
    label: str
    size: int
    proxied: bool = False
    cycles: list[Cycle] = field(default_factory=list)
    error: str | None = None


def run_all(variants: list[Variant], plan: Plan, shared: Shared, stack: contextlib.ExitStack,
            log: Callable[[str], None]) -> list[Result]:
    """Start every variant's MTA (and warm it up), then run the timed cycles interleaved
    (`sidebyside.run_interleaved`); a variant that fails is stopped and its rows say why."""
    results = {(v.key, s): Result(v.key, v.label, s, v.proxy_version is not None)
               for v in variants for s in plan.sizes}
    return sidebyside.run_interleaved(
        variants, plan.sizes, plan.repeat, plan.warmup, results, stack, log,
        prefix="bench-out-", describe=lambda v: v.label,
        start=lambda v, own, d: start_mta(v, own, d, shared, plan),
        cycle=lambda mta, n, size: run_cycle(mta, shared, n, size, plan),
        count=lambda size: messages_for(plan, size),
        warm_line=lambda v, warm: (f"  {v.key:21} warm-up {warm.messages:>6} msgs "
                                   f"{warm.drain:6.2f} s {warm.rate:8.0f} msg/s"),
        cycle_line=lambda v, size, c: (
            f"  {v.key:21} {size:>7} B {c.messages:>6} msgs "
            f"(pre-load {c.preload_rate:6.0f} msg/s) drain {c.drain:6.2f} s "
            f"{c.rate:8.0f} msg/s  cpu {c.mta_cpu:5.2f} s "
            f"(poller {c.bench_cpu:4.2f} s, other {c.other_cores:4.2f} cores)"))


# --- reporting --------------------------------------------------------------------------------

def results_table(results: list[Result]) -> str:
    rows = ["| variant | size | msgs/cycle | msg/s (median) | cycles min-max | drain s "
            "| MTA CPU s/1k msg | MTA cores busy | HAProxy CPU s/1k | sink CPU s/1k "
            "| other load (cores) | delivered |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.error or not r.cycles:
            rows.append(r.failed_row(fmt_size, 12))
            continue
        proxy = f"{r.per_1k('proxy_cpu'):.3f}" if r.proxied else "-"
        rows.append(
            r.row_head(fmt_size)
            + f"{statistics.median(c.drain for c in r.cycles):.2f} | "
            f"{r.per_1k('mta_cpu'):.3f} | {r.cores:.2f} | {proxy} | "
            f"{r.per_1k('sink_cpu'):.3f} | {r.other:.2f} | {r.cycles[-1].check} |")
    return "\n".join(rows)


RATIOS = [
    ("ferrymail-haproxy-v1", "ferrymail-direct", "target >= 0.8"),
    ("ferrymail-haproxy-v2", "ferrymail-direct", "target >= 0.8"),
    ("ferrymail-direct", "postfix", "target > 1"),
    ("ferrymail-haproxy-v1", "postfix", ""),
]


def ratios_table(results: list[Result], sizes: list[int]) -> str:
    return sidebyside.cycle_ratios_table(results, RATIOS, sizes, fmt_size)


def report(results: list[Result], plan: Plan, env: dict[str, str], command: str) -> str:
    counts = ", ".join(f"{messages_for(plan, s):,} at {fmt_size(s)}" for s in plan.sizes)
    out = [
        *sidebyside.report_head(env, ["HAProxy", "Postfix"], command),
        f"Method: per cycle the MTA is pre-loaded with N messages ({counts}) by "
        f"`smtp-source -s {plan.sessions} -d -m N -l SIZE` while its delivery is held, then "
        "delivery is released and timed until its queue is empty and the sink has counted N "
        f"(polled every {POLL * 1000:.0f} ms); median of {plan.repeat} cycle(s) after a "
        f"{plan.warmup}-message warm-up cycle, the variants' cycles interleaved. Both MTAs "
        f"deliver over up to {plan.concurrency} sessions, {plan.reuse} messages per session, "
        "to the same "
        "smtp-sink on 127.0.0.1 (dumping to tmpfs: the check reads it). CPU is "
        "utime+stime of each process tree over the drain, from /proc (\"MTA cores busy\": "
        "MTA CPU per second of drain); \"other load\" is what everything else on the "
        "machine used meanwhile (from /proc/stat, in cores: noise); \"delivered\" is what "
        "the sink's dump held after each cycle: N messages, N distinct queue ids of the "
        "MTA, all from the variant's source address, and exactly the N deliveries the MTA "
        "logged, each via the variant's path (direct, the HAProxy, the relayhost).",
    ]
    return sidebyside.join_report(out, results_table(results), ratios_table(results, plan.sizes))


NOTES = """\
Notes:
- ferrymail: `queues.hold: true` while pre-loading; the clock starts as the running file with
  `hold: false` is written and SIGHUP sent. Its spool fsyncs (the recipients' results and the
  removal of delivered messages are durable before a message counts as gone), and it logs one
  line per delivery attempt. "via HAProxy" is the seed's `listen outboundsmtp` (`bind ...
  accept-proxy`, `server v4 0.0.0.0 source 0.0.0.0 usesrc clientip`): ferrymail connects to
  HAProxy and sends a PROXY header naming 127.0.0.3 and the sink; HAProxy connects to the sink
  from 127.0.0.3 transparently.
- Postfix: `smtpd_data_restrictions = check_client_access static:HOLD` puts every accepted
  message in the hold queue; `postsuper -H ALL` (not timed: renames into the deferred queue)
  and then `postqueue -f` (timed) release them. `relayhost = [127.0.0.1]:SINK`,
  `smtp_bind_address = 127.0.0.4`, initial and maximum destination concurrency equal to
  ferrymail's, `smtp_connection_cache_on_demand = yes`, `smtp_connection_reuse_count_limit`
  equal to ferrymail's `reuse.messages`. Its CPU is the whole instance (master, qmgr, smtp,
  postlogd, ...). It removes a delivered message's queue file without an fsync, where ferrymail
  commits each batch of delivery results with one.
- The sink, the MTA, HAProxy and this script's poller share the machine's cores.
"""


def write_results(section_body: str, path: Path = RESULTS) -> None:
    """(Re)write the Outbound section of RESULTS.md, keeping every other section."""
    peers.replace_section(path, SECTION, section_body)


# --- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sidebyside.add_cycle_args(p, [v.key for v in VARIANTS] + list(ALIASES),
                              "messages per cycle at 2 KB (default 8000; quick 200)")
    sidebyside.add_delivery_args(p, sessions="smtp-source sessions (pre-load)", section="Outbound",
                                 results_name=RESULTS.name)
    return p.parse_args(argv)


def select(only: str | None) -> list[Variant]:
    return peers.select_variants(VARIANTS, ALIASES, only)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sidebyside.parse_sizes(args.sizes)
    plan = Plan(
        sizes=sizes,
        messages=args.messages or (200 if args.quick else 8_000),
        repeat=args.repeat or (1 if args.quick else 3),
        warmup=2 * args.sessions if args.quick else 10 * args.sessions,
        sessions=args.sessions,
        concurrency=args.concurrency,
        reuse=args.reuse,
    )
    if min(plan.messages, plan.repeat, plan.concurrency, plan.reuse, plan.sessions) < 1:
        raise SystemExit("--messages, --repeat, --concurrency, --reuse and --sessions must be >= 1")
    variants = select(args.only)
    log = sidebyside.log
    env = environment()
    command = peers.command_line("bench/outbound.py", argv)
    t0 = time.monotonic()

    def start_shared(d: Path, stack: contextlib.ExitStack) -> Shared:
        shared = Shared(stack.enter_context(peers.dumping_sink(d, SINK_HOST)))
        if any(v.proxy_version for v in variants):
            shared.proxy = stack.enter_context(peers.outbound_haproxy(d))
        return shared

    results = sidebyside.run_with_shared_peers(
        "bench-out-shared-", "the shared peers", start_shared,
        lambda shared, stack: run_all(variants, plan, shared, stack, log), log)
    if isinstance(results, int):
        return results
    log(f"done in {time.monotonic() - t0:.0f} s")
    return sidebyside.publish(
        report(results, plan, env, command), results, plan, env, args.json,
        (lambda body: write_results(body + "\n\n" + NOTES)) if args.write_results else None,
        RESULTS, log, row=lambda r: {**asdict(r), "rate": r.rate})

if __name__ == "__main__":
    sys.exit(main())
