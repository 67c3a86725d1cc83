"""Steady-state relay, end to end, side by side: smtp-source -> MTA -> smtp-sink, with
reception and delivery running at once: ferrymail with 1 worker, ferrymail with N workers,
Postfix.

    .venv/bin/python bench/relay.py [--quick] [--sizes 2048,102400] [--only a,b]
                                    [--workers N] [--write-results]

Per variant and size, one cycle: `smtp-source -s 20 -d -m N -l SIZE` sends N messages into
the MTA, which relays every one to the same smtp-sink as it goes; the clock runs from the
start of smtp-source until the sink has counted N and the MTA's queue is empty ("first message
sent -> last message in the sink"). The sink appends what it receives to a dump file, which
must then hold exactly N messages with N distinct queue ids of the MTA, all from the variant's
source address, and the MTA's log exactly those N deliveries (`outbound.verify_delivery`), so
a fast but lossy or duplicating run fails. CPU is utime+stime from /proc/<pid>/stat of each
process tree (the MTA's, the sink's) and smtp-source's rusage over the cycle.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import outbound  # bench/ is not a package: found via sys.path
import peers
import sidebyside
from inbound import environment, fmt_size
from peers import BenchError

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Relay"
POLL = 0.02  # seconds between looks at the sink and the queue once smtp-source is done


@dataclass(frozen=True)
class Plan:
    sizes: list[int]
    messages: int  # per cycle at 2 KB; fewer for larger sizes (`messages_for`)
    repeat: int
    warmup: int
    sessions: int  # smtp-source sessions
    concurrency: int  # delivery sessions to the sink (ferrymail and Postfix alike)
    reuse: int  # messages per delivery session
    workers: int  # ferrymail's worker count in the "N workers" variant


messages_for = sidebyside.messages_for


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    source: str  # the address the sink must see
    workers: int | None  # ferrymail --workers; None: Postfix
    many: bool = False  # ferrymail with plan.workers workers


VARIANTS = [
    Variant("ferrymail-1", "ferrymail, 1 worker", "127.0.0.2", 1),
    Variant("ferrymail-n", "ferrymail, N workers", "127.0.0.2", 0, many=True),
    Variant("postfix", "Postfix (smtpd -> cleanup -> qmgr -> smtp)", "127.0.0.4", None),
]
ALIASES = {"ferrymail": ["ferrymail-1", "ferrymail-n"]}


def label(v: Variant, plan: Plan) -> str:
    return f"ferrymail, {plan.workers} workers" if v.many else v.label


class ShardedFerrymail(outbound.Ferrymail):
    """outbound's ferrymail MTA, counting the queue over every spool shard under the spool
    directory (one `spool.db` per worker, or the single one)."""

    def queued(self) -> int:
        dbs = sorted(self.spool.rglob("spool.db"))
        return sum(peers.spool_messages(db.parent) for db in dbs)


def start_mta(v: Variant, stack: contextlib.ExitStack, d: Path, sink: peers.Peer,
              plan: Plan) -> outbound.MTA:
    if v.workers is None:
        settings = peers.postfix_relay_settings(sink.host, sink.port, v.source,
                                                concurrency=plan.concurrency, reuse=plan.reuse)
        # Short queue ids are the inode and the microseconds only: with queue files created
        # and removed all the time (steady state), an id comes back within one cycle and the
        # dump check would see a duplicate delivery that is none.
        settings["enable_long_queue_ids"] = "yes"
        pf = stack.enter_context(peers.postfix(d, settings=settings,
                                               services=peers.POSTFIX_SMTP_SERVICE))
        return outbound.Postfix(pf, v.source, sink)
    workers = plan.workers if v.many else v.workers
    fm = stack.enter_context(peers.ferrymail(d, args=("--workers", str(workers))))
    ov = outbound.Variant(v.key, v.label, v.source, None)
    oplan = outbound.Plan(sizes=plan.sizes, messages=plan.messages, repeat=plan.repeat,
                          warmup=plan.warmup, sessions=plan.sessions,
                          concurrency=plan.concurrency, reuse=plan.reuse)
    mta = ShardedFerrymail(fm, v.source,
                           lambda hold: outbound.ferrymail_running_yaml(ov, oplan, sink, None,
                                                                        hold), None)
    mta.release()  # the relay config, delivery on
    return mta


@dataclass
class Cycle:
    messages: int
    size: int
    wall: float  # first message sent -> last message in the sink, queue empty
    accept_wall: float  # smtp-source's own run: until the last 250
    mta_cpu: float
    sink_cpu: float
    source_cpu: float
    bench_cpu: float  # this script (the poller)
    busy: float  # CPU the whole machine spent meanwhile
    check: str

    @property
    def rate(self) -> float:
        return self.messages / self.wall if self.wall > 0 else 0.0

    @property
    def other_cores(self) -> float:
        mine = self.mta_cpu + self.sink_cpu + self.source_cpu + self.bench_cpu
        return max(0.0, self.busy - mine) / self.wall if self.wall > 0 else 0.0


def run_cycle(mta: outbound.MTA, sink: peers.Peer, n: int, size: int, plan: Plan) -> Cycle:
    dump = Path(str(sink.extra["dump"]))
    if dump.exists():
        dump.write_bytes(b"")  # the sink is idle between cycles: the queue was empty
    base = peers.sink_counter(sink)
    log_offset = mta.log_size()
    cpu0 = [mta.peer.cpu(), sink.cpu()]
    self0, busy0 = sidebyside.self_cpu(), peers.machine_busy_seconds()
    t0 = time.perf_counter()
    src = peers.run_smtp_source(mta.peer.host, mta.peer.port, n, size, plan.sessions,
                                timeout=60 + n / 20)
    timeout = 60 + n / 20
    while not (peers.sink_counter(sink) - base >= n and mta.queued() == 0):
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"not relayed after {timeout:.0f}s: {mta.queued()} still queued, "
                             f"the sink got {peers.sink_counter(sink) - base}/{n}; "
                             f"{mta.stuck()}")
        time.sleep(POLL)
    wall = time.perf_counter() - t0
    cpu1 = [mta.peer.cpu(), sink.cpu()]
    self1, busy1 = sidebyside.self_cpu(), peers.machine_busy_seconds()
    check = outbound.verify_delivery(mta, dump, n, log_offset,
                                     sink_received=lambda: peers.sink_counter(sink) - base)
    return Cycle(n, size, wall, src.wall, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1],
                 src.client_cpu, self1 - self0, busy1 - busy0, check)


@dataclass
class Result(sidebyside.CycleStats):
    SPAN = "wall"

    variant: str
    label: str
    size: int
    cycles: list[Cycle] = field(default_factory=list)
    error: str | None = None


def run_all(variants: list[Variant], plan: Plan, sink: peers.Peer,
            stack: contextlib.ExitStack, log: Callable[[str], None]) -> list[Result]:
    """Start every variant's MTA (with a warm-up cycle), then run the timed cycles
    interleaved (`sidebyside.run_interleaved`); a variant that fails is stopped at once and
    its rows say why."""
    results = {(v.key, s): Result(v.key, label(v, plan), s) for v in variants
               for s in plan.sizes}
    return sidebyside.run_interleaved(
        variants, plan.sizes, plan.repeat, plan.warmup, results, stack, log,
        prefix="bench-relay-", describe=lambda v: label(v, plan),
        start=lambda v, own, d: start_mta(v, own, d, sink, plan),
        cycle=lambda mta, n, size: run_cycle(mta, sink, n, size, plan),
        count=lambda size: messages_for(plan, size),
        warm_line=lambda v, warm: (f"  {v.key:12} warm-up {warm.messages:>6} msgs "
                                   f"{warm.wall:6.2f} s {warm.rate:8.0f} msg/s"),
        cycle_line=lambda v, size, c: (
            f"  {v.key:12} {size:>7} B {c.messages:>6} msgs {c.wall:6.2f} s "
            f"{c.rate:8.0f} msg/s  mta cpu {c.mta_cpu:5.2f} s "
            f"({c.mta_cpu / c.wall:4.2f} cores, other {c.other_cores:4.2f})"))


# --- reporting --------------------------------------------------------------------------------

def results_table(results: list[Result]) -> str:
    rows = ["| variant | size | msgs/cycle | msg/s (median) | cycles min-max | accepted by s "
            "| relayed by s | MTA CPU ms/msg | MTA cores busy | sink CPU ms/msg "
            "| smtp-source CPU ms/msg | other load (cores) | relayed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.error or not r.cycles:
            rows.append(r.failed_row(fmt_size, 13))
            continue
        rows.append(
            r.row_head(fmt_size)
            + f"{statistics.median(c.accept_wall for c in r.cycles):.2f} | "
            f"{statistics.median(c.wall for c in r.cycles):.2f} | "
            f"{r.per_1k('mta_cpu'):.3f} | {r.cores:.2f} | {r.per_1k('sink_cpu'):.3f} | "
            f"{r.per_1k('source_cpu'):.3f} | {r.other:.2f} | {r.cycles[-1].check} |")
    return "\n".join(rows)


RATIOS = [
    ("ferrymail-1", "postfix", "target (N workers) >= 3 at 2 KB, >= 2 at 100 KB"),
    ("ferrymail-n", "postfix", ""),
    ("ferrymail-n", "ferrymail-1", "target >= 1.7 on 2 cores"),
]


def ratios_table(results: list[Result], sizes: list[int]) -> str:
    return sidebyside.cycle_ratios_table(results, RATIOS, sizes, fmt_size)


def report(results: list[Result], plan: Plan, env: dict[str, str], command: str) -> str:
    counts = ", ".join(f"{messages_for(plan, s):,} at {fmt_size(s)}" for s in plan.sizes)
    out = [
        *sidebyside.report_head(env, ["Postfix"], command),
        f"Method: per cycle `smtp-source -s {plan.sessions} -d -m N -l SIZE` sends N messages "
        f"({counts}) into the MTA, which relays them meanwhile to one smtp-sink on 127.0.0.1 "
        f"over up to {plan.concurrency} sessions, {plan.reuse} messages per session; the "
        "clock runs from smtp-source's start until the sink has counted N and the MTA's "
        f"queue is empty (polled every {POLL * 1000:.0f} ms). Median of {plan.repeat} "
        f"cycle(s) after a {plan.warmup}-message warm-up, the variants' cycles interleaved. "
        "\"accepted by\" is when smtp-source had its last 250; CPU is utime+stime of each "
        "process tree from /proc/<pid>/stat over the cycle (\"MTA cores busy\": MTA CPU per "
        "second of the cycle; ferrymail's workers and Postfix's daemons are in the tree); "
        "\"other load\" is what everything else on the machine used meanwhile (from "
        "/proc/stat, in cores); \"relayed\" is what the sink's dump held after the cycle: "
        "N messages, N distinct queue ids of the MTA, all from the variant's source address, "
        "and exactly the N deliveries the MTA logged.",
    ]
    return sidebyside.join_report(out, results_table(results), ratios_table(results, plan.sizes))


def write_results(section_body: str, path: Path = RESULTS) -> None:
    """(Re)write the Relay section of RESULTS.md, keeping every other section."""
    peers.replace_section(path, SECTION, section_body)


# --- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sidebyside.add_cycle_args(p, [v.key for v in VARIANTS] + list(ALIASES),
                              "messages per cycle at 2 KB (default 6000; quick 100)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="ferrymail workers in the ferrymail-n variant (default: CPU count)")
    sidebyside.add_delivery_args(p, sessions="smtp-source sessions", section="Relay",
                                 results_name=RESULTS.name)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sidebyside.parse_sizes(args.sizes)
    plan = Plan(
        sizes=sizes,
        messages=args.messages or (100 if args.quick else 6_000),
        repeat=args.repeat or (1 if args.quick else 3),
        warmup=2 * args.sessions if args.quick else 10 * args.sessions,
        sessions=args.sessions,
        concurrency=args.concurrency,
        reuse=args.reuse,
        workers=args.workers,
    )
    if min(plan.messages, plan.repeat, plan.concurrency, plan.reuse, plan.sessions,
           plan.workers) < 1:
        raise SystemExit("--messages, --repeat, --concurrency, --reuse, --sessions and "
                         "--workers must be >= 1")
    variants = peers.select_variants(VARIANTS, ALIASES, args.only)
    log = sidebyside.log
    env = environment()
    command = peers.command_line("bench/relay.py", argv)
    t0 = time.monotonic()

    results = sidebyside.run_with_shared_peers(
        "bench-relay-shared-", "the sink",
        lambda d, stack: stack.enter_context(peers.dumping_sink(d)),
        lambda sink, stack: run_all(variants, plan, sink, stack, log), log)
    if isinstance(results, int):
        return results
    log(f"done in {time.monotonic() - t0:.0f} s")
    return sidebyside.publish(
        report(results, plan, env, command), results, plan, env, args.json,
        (lambda body: write_results(body + "\n\n" + NOTES)) if args.write_results else None,
        RESULTS, log, row=lambda r: {**asdict(r), "rate": r.rate})


NOTES = """\
Notes:
- The machine is shared: while these figures were taken, other work ran on the same two
  cores (see "other load" and the load average). They are provisional; compare the variants
  of one run, not runs of different days.
- ferrymail: the relay running config (`queues.concurrency` and `reuse.messages` as Postfix's
  destination concurrency and `smtp_connection_reuse_count_limit`), fsynced spool, one log
  line per transaction and per delivery attempt. With N workers every worker listens on the
  same port (`SO_REUSEPORT`) and owns its own spool shard.
- Postfix: `relayhost = [127.0.0.1]:SINK`, `smtp_bind_address = 127.0.0.4`,
  `in_flow_delay = 0s`, connection cache on demand, `enable_long_queue_ids = yes` (short ids
  repeat in steady state and would read as duplicates); its CPU is the whole instance.
"""


if __name__ == "__main__":
    sys.exit(main())
