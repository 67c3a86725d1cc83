"""Inbound throughput, side by side: ferrymail (direct and behind HAProxy), aiosmtpd, Postfix.

    .venv/bin/python bench/inbound.py [--quick] [--sizes 2048,102400] [--only a,b] [--write-results]

Each variant's server is started in its own process on a free loopback port; Postfix's
smtp-source sends N messages over 20 kept-open sessions (-d), timed by wall clock. Per variant
and size: one warm-up run sizes N so that a timed run lasts about --target seconds, then
--repeat timed runs; the median rate is reported. Server CPU is utime+stime from /proc of the
server's process tree, before and after the timed runs. Whatever a variant stores is counted
afterwards and must equal what smtp-source sent, so a fast but lossy server fails the run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # bench/ is not a package: found via sys.path
import sidebyside
from peers import BenchError, Peer

from ferrymail.supervisor import default_workers, shard_paths

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Inbound"


@dataclass
class Target:
    """What smtp-source connects to, whose CPU counts, and how to check what was stored."""

    host: str
    port: int
    server: Peer
    proxy: Peer | None = None
    verify: Callable[[int, int], str] = lambda sent, smallest: "-"  # (sent, smallest size)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    start: Callable[[contextlib.ExitStack, Path], Target]


@dataclass
class Result:
    variant: str
    label: str
    size: int
    messages_per_run: int = 0
    rates: list[float] = field(default_factory=list)
    server_cpu_per_1k: float = 0.0
    proxy_cpu_per_1k: float | None = None
    client_cpu_per_1k: float = 0.0
    other_cores: float = 0.0  # CPU used by everything else on the machine during the runs
    check: str = ""
    error: str | None = None

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


# --- variants --------------------------------------------------------------------------------

def ferrymail_spool_summary(spool: Path) -> dict[str, int]:
    """Counts read straight from a stopped ferrymail's SQLite spool (read-only), summed over
    every worker's shard (``shard-K`` below the spool directory); ``min_size`` the least."""
    parts = [shard_summary(p) for p in shard_paths(spool) if (p / "spool.db").exists()]
    if not parts:
        raise BenchError(f"no spool database at {spool / 'spool.db'}")
    out = {k: sum(x[k] for x in parts) for k in parts[0]}
    out["min_size"] = min(x["min_size"] for x in parts)
    return out


def shard_summary(spool: Path) -> dict[str, int]:
    """The counts of one shard's database."""
    db = spool / "spool.db"
    if not db.exists():
        raise BenchError(f"no spool database at {db}")
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise BenchError(f"cannot open {db}: {e}") from None
    try:
        one = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "messages": one("SELECT COUNT(*) FROM messages"),
            # small bodies are BLOBs, large ones files of the spool (bodies/<queue id>)
            "bodies": one("SELECT COUNT(*) FROM bodies") + sum(
                1 for p in (db.parent / "bodies").glob("*") if "." not in p.name),
            "queued": one("SELECT COUNT(*) FROM recipients WHERE state = 'queued'"),
            "proxied": one("SELECT COUNT(*) FROM messages"
                           " WHERE json_extract(envelope, '$.proxy.version') = 2"),
            "min_size": one("SELECT COALESCE(MIN(json_extract(envelope, '$.size')), 0)"
                            " FROM messages"),
        }
    except sqlite3.Error as e:
        raise BenchError(f"cannot read {db}: {e}") from None
    finally:
        conn.close()


def start_ferrymail(proxied: bool, workers: int = 1
                    ) -> Callable[[contextlib.ExitStack, Path], Target]:
    def start(stack: contextlib.ExitStack, d: Path) -> Target:
        fm = stack.enter_context(peers.ferrymail(d, args=("--workers", str(workers))))
        proxy = None
        host, port = fm.host, fm.port
        if proxied:
            proxy = stack.enter_context(peers.haproxy(d, fm.host, int(fm.extra["proxied_port"])))
            host, port = proxy.host, proxy.port
        spool = Path(str(fm.extra["spool"]))
        running = stack.pop_all()  # the check reads the spool after ferrymail has stopped
        stack.callback(running.close)

        def verify(sent: int, smallest: int) -> str:
            running.close()
            got = ferrymail_spool_summary(spool)
            want = {"messages": sent, "bodies": sent, "queued": sent,
                    "proxied": sent if proxied else 0}
            wrong = {k: f"{got[k]} (want {v})" for k, v in want.items() if got[k] != v}
            if got["min_size"] < smallest:
                wrong["min_size"] = f"{got['min_size']} (want >= {smallest})"
            if got["messages"] == sent and got["queued"] != sent:
                wrong["queued"] += " - delivery ran during the benchmark: disable it"
            if wrong:
                raise BenchError(f"ferrymail spool after {sent} messages sent: "
                                 + ", ".join(f"{k} {v}" for k, v in wrong.items()))
            return f"spool {got['messages']}/{sent}" + (", all PROXY v2" if proxied else "")

        return Target(host, port, fm, proxy, verify)

    return start


def start_aiosmtpd(mode: str) -> Callable[[contextlib.ExitStack, Path], Target]:
    def start(stack: contextlib.ExitStack, d: Path) -> Target:
        srv = stack.enter_context(peers.aiosmtpd(d, mode))
        if mode == "discard":
            return Target(srv.host, srv.port, srv)

        def verify(sent: int, smallest: int) -> str:
            n = _count_appended(Path(str(srv.extra["store"])))
            if n != sent:
                raise BenchError(f"aiosmtpd fsync file holds {n} messages, {sent} were sent")
            return f"file {n}/{sent}"

        return Target(srv.host, srv.port, srv, None, verify)

    return start


def _count_appended(path: Path) -> int:
    """Records in the aiosmtpd fsync file: a "From ... LEN" line, LEN bytes, a newline."""
    if not path.exists():
        return 0
    n = 0
    with open(path, "rb") as f:
        while line := f.readline():
            try:
                length = int(line.split()[-1])
            except (ValueError, IndexError):
                raise BenchError(f"{path}: record {n + 1} has no length: {line[:80]!r}") from None
            f.seek(length + 1, os.SEEK_CUR)
            n += 1
    return n


def start_postfix(stack: contextlib.ExitStack, d: Path) -> Target:
    pf = stack.enter_context(peers.postfix(d))
    maillog = Path(str(pf.extra["maillog"]))

    def verify(sent: int, smallest: int) -> str:
        # cleanup logs one message-id line per message it queued; postlogd writes it a
        # little later, so give it a few seconds.
        deadline = time.monotonic() + 10
        while True:
            text = maillog.read_text(errors="replace") if maillog.exists() else ""
            n = len(re.findall(r"postfix/cleanup\[\d+\]: \w+: message-id=", text))
            if n >= sent or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if n != sent:
            raise BenchError(f"postfix cleanup queued {n} messages, {sent} were sent")
        return f"queued {n}/{sent}"

    return Target(pf.host, pf.port, pf, None, verify)


def start_sink(stack: contextlib.ExitStack, d: Path) -> Target:
    sink = stack.enter_context(peers.smtp_sink(d))
    return Target(sink.host, sink.port, sink)


CPUS = default_workers()
VARIANTS = [
    Variant("ferrymail-direct", "ferrymail, direct, fsync spool", start_ferrymail(False)),
    Variant("ferrymail-proxied", "ferrymail behind HAProxy (PROXY v2), fsync spool",
            start_ferrymail(True)),
    Variant("ferrymail-workers", f"ferrymail, direct, fsync spool, {CPUS} workers (the default)",
            start_ferrymail(False, CPUS)),
    Variant("aiosmtpd-discard", "aiosmtpd + uvloop, discard", start_aiosmtpd("discard")),
    Variant("aiosmtpd-fsync", "aiosmtpd + uvloop, append + fsync", start_aiosmtpd("fsync")),
    Variant("postfix", "Postfix smtpd, queue to disk", start_postfix),
    Variant("smtp-sink", "smtp-sink, discard (ceiling)", start_sink),
]
ALIASES = {"ferrymail": ["ferrymail-direct", "ferrymail-proxied", "ferrymail-workers"],
           "aiosmtpd": ["aiosmtpd-discard", "aiosmtpd-fsync"]}


# --- running ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    sizes: list[int]
    sessions: int
    target: float  # seconds per timed run
    repeat: int
    warmup: int  # messages in the warm-up run
    max_messages: int


def run_variant(v: Variant, plan: Plan, log: Callable[[str], None]) -> list[Result]:
    results = [Result(v.key, v.label, size) for size in plan.sizes]
    sent = 0
    try:
        with peers.workdir(f"bench-{v.key}-") as d, contextlib.ExitStack() as stack:
            stack.callback(_show_logs_on_error, d, log)  # runs after the peers have stopped
            t = v.start(stack, d)
            for res in results:
                # A cold warm-up underestimates the rate: size a second run to last a fifth
                # of the target, and N from that.
                n = plan.warmup
                for fraction in (0.2, 1.0):
                    probe = peers.run_smtp_source(t.host, t.port, n, res.size, plan.sessions,
                                                  timeout=10 * plan.target + 20)
                    sent += probe.messages
                    n = int(min(plan.max_messages,
                                max(plan.warmup, probe.rate * plan.target * fraction)))
                res.messages_per_run = n
                cpu0 = t.server.cpu()
                pcpu0 = t.proxy.cpu() if t.proxy else 0.0
                busy0 = peers.machine_busy_seconds()
                client = wall = 0.0
                for _ in range(plan.repeat):
                    run = peers.run_smtp_source(t.host, t.port, n, res.size, plan.sessions,
                                                timeout=10 * plan.target + 20)
                    sent += run.messages
                    res.rates.append(run.rate)
                    client += run.client_cpu
                    wall += run.wall
                    log(f"  {v.key:18} {res.size:>7} B  {run.messages:>6} msgs "
                        f"{run.wall:6.2f} s  {run.rate:8.0f} msg/s")
                busy = peers.machine_busy_seconds() - busy0
                server = t.server.cpu() - cpu0
                proxy = t.proxy.cpu() - pcpu0 if t.proxy else 0.0
                total = n * plan.repeat
                res.server_cpu_per_1k = server * 1000 / total
                if t.proxy:
                    res.proxy_cpu_per_1k = proxy * 1000 / total
                res.client_cpu_per_1k = client * 1000 / total
                res.other_cores = max(0.0, busy - server - proxy - client) / wall
            check = t.verify(sent, min(plan.sizes))
            for res in results:
                res.check = check
    except BenchError as e:
        log(f"  {v.key}: FAILED: {e}")
        for res in results:
            res.error = str(e).splitlines()[0] if str(e) else type(e).__name__
    return results


def _show_logs_on_error(d: Path, log: Callable[[str], None]) -> None:
    if sys.exc_info()[0] is None:
        return
    for path in sorted(d.glob("*.log")) + sorted(d.glob("maillog")):
        text = peers.tail(path, 15)
        if text.strip():
            log(f"  --- last lines of {path.name}:\n" + "\n".join(f"  | {ln}" for ln in
                                                             text.splitlines()))


# --- reporting -------------------------------------------------------------------------------

def fmt_size(n: int) -> str:
    return f"{n // 1024} KB" if n % 1024 == 0 else f"{n} B"


def results_table(results: list[Result]) -> str:
    rows = ["| variant | size | msg/s (median) | runs min-max | msgs/run | server CPU s/1k msg "
            "| server cores busy | smtp-source CPU s/1k | other load (cores) | stored |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.error:
            rows.append(f"| {r.label} | {fmt_size(r.size)} | FAILED | | | | | | | {r.error} |")
            continue
        cpu = f"{r.server_cpu_per_1k:.3f}"
        if r.proxy_cpu_per_1k is not None:
            cpu += f" (+{r.proxy_cpu_per_1k:.3f} haproxy)"
        rows.append(f"| {r.label} | {fmt_size(r.size)} | {r.rate:,.0f} | "
                    f"{min(r.rates):,.0f}-{max(r.rates):,.0f} | {r.messages_per_run:,} | {cpu} | "
                    f"{r.server_cpu_per_1k * r.rate / 1000:.2f} | {r.client_cpu_per_1k:.3f} | "
                    f"{r.other_cores:.2f} | {r.check} |")
    return "\n".join(rows)


RATIOS = [
    ("ferrymail-direct", "aiosmtpd-discard"),
    ("ferrymail-workers", "aiosmtpd-discard"),
    ("ferrymail-direct", "aiosmtpd-fsync"),
    ("ferrymail-direct", "postfix"),
    ("ferrymail-proxied", "postfix"),
    ("ferrymail-proxied", "ferrymail-direct"),
    ("ferrymail-direct", "smtp-sink"),
]


def ratios_table(results: list[Result], sizes: list[int]) -> str:
    rate = {(r.variant, r.size): r.rate for r in results if not r.error and r.rates}
    return sidebyside.ratios_table(rate, [(a, b, None) for a, b in RATIOS], sizes, fmt_size)


def _version(cmd: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "?"


def _dist(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
                   f"Linux {platform.release()}",
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])
                   if Path("/proc/loadavg").exists() else "?",
        "python": platform.python_version(),
        "ferrymail": _dist("ferrymail"),
        "uvloop": _dist("uvloop"),
        "aiosmtpd": _dist("aiosmtpd"),
        "haproxy": _version(["haproxy", "-v"], r"version (\S+)"),
        "postfix": _version(["postconf", "-d", "mail_version"], r"= (\S+)"),
    }


def report(results: list[Result], plan: Plan, env: dict[str, str], command: str) -> str:
    out = [
        f"Measured {env['date']} on {env['machine']}; load average before the run "
        f"{env['loadavg']}.",
        f"Python {env['python']}, ferrymail {env['ferrymail']}, uvloop {env['uvloop']}, "
        f"aiosmtpd {env['aiosmtpd']}, HAProxy {env['haproxy']}, Postfix {env['postfix']}.",
        "",
        f"Command: `{command}`",
        "",
        f"Load: `smtp-source -s {plan.sessions} -d -m N -l SIZE` (one recipient, payload SIZE "
        f"bytes plus headers) on the same machine; after a {plan.warmup}-message warm-up and a "
        f"sizing run, N is set so that a run lasts about {plan.target:g} s; median of "
        f"{plan.repeat} timed runs. "
        "Server CPU is utime+stime of the server's process tree from /proc (\"cores busy\": "
        "that CPU per second at the median rate; ferrymail and aiosmtpd are one process each, "
        "Postfix several); \"other load\" is "
        "the CPU that everything else on the machine used meanwhile (from /proc/stat, in "
        "cores: noise); \"stored\" is what the server had stored afterwards against all "
        "that smtp-source sent to it.",
    ]
    return sidebyside.join_report(out, results_table(results), ratios_table(results, plan.sizes))


NOTES = """\
Notes:
- Load generator and servers share the machine's cores, so a server that needs less CPU also
  leaves more to smtp-source (and to HAProxy); the client's CPU per 1,000 messages is shown.
- ferrymail and aiosmtpd-fsync acknowledge only after fsync; Postfix's cleanup fsyncs each
  queue file before smtpd answers 250, and its qmgr then hands the message to the discard
  transport meanwhile (that CPU counts as server CPU too). aiosmtpd-discard and smtp-sink
  store nothing. Postfix runs with `in_flow_delay = 0s` so that it is not throttled to its
  delivery rate. Postfix and ferrymail (level info) log about one line per message to a
  file; aiosmtpd's logger is at WARNING, so it logs nothing.
- ferrymail runs with `queues.hold: true` (no outbound delivery), so its figures are
  reception alone; the spool check confirms every recipient is still queued.
"""


def write_results(section_body: str, path: Path = RESULTS) -> None:
    """(Re)write the Inbound section of RESULTS.md, keeping every other section."""
    if not path.exists():  # a new file keeps the usual order: Inbound, then Outbound
        path.write_text(f"# Benchmark results\n\n{SECTION}\n\n## Outbound\n\nNot measured yet.\n")
    peers.replace_section(path, SECTION, section_body)


# --- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny runs, for a smoke test")
    p.add_argument("--sizes", default="2048,102400", help="message payload sizes in bytes")
    p.add_argument("--only", help="comma-separated variants: " + ", ".join(
        [v.key for v in VARIANTS] + list(ALIASES)))
    p.add_argument("--sessions", type=int, default=20, help="parallel smtp-source sessions")
    p.add_argument("--target", type=float, help="seconds per timed run (default 2.5; quick 0.3)")
    p.add_argument("--repeat", type=int, help="timed runs per size (default 3; quick 1)")
    p.add_argument("--write-results", action="store_true",
                   help=f"rewrite the Inbound section of {RESULTS.name}")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    return p.parse_args(argv)


def select(only: str | None) -> list[Variant]:
    return peers.select_variants(VARIANTS, ALIASES, only)


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into KeyboardInterrupt so every finally block stops its peer.

    SIGINT too: a shell starts background jobs with SIGINT ignored, which Python inherits.
    """
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sidebyside.parse_sizes(args.sizes)
    plan = Plan(
        sizes=sizes,
        sessions=args.sessions,
        target=args.target or (0.3 if args.quick else 2.5),
        repeat=args.repeat or (1 if args.quick else 3),
        warmup=2 * args.sessions if args.quick else 10 * args.sessions,
        max_messages=2_000 if args.quick else 100_000,
    )
    variants = select(args.only)
    log = sidebyside.log
    env = environment()
    command = peers.command_line("bench/inbound.py", argv)
    results: list[Result] = []
    t0 = time.monotonic()
    with signals_as_interrupt():
        try:
            for v in variants:
                log(f"{v.key}: {v.label}")
                results += run_variant(v, plan, log)
        except KeyboardInterrupt:
            log("interrupted: peers stopped")
            return 130
    log(f"done in {time.monotonic() - t0:.0f} s")

    return sidebyside.publish(
        report(results, plan, env, command), results, plan, env, args.json,
        (lambda body: write_results(body + "\n\n" + NOTES)) if args.write_results else None,
        RESULTS, log)

if __name__ == "__main__":
    sys.exit(main())
