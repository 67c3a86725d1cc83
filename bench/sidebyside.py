"""What the side-by-side throughput benches (bench/inbound.py, bench/outbound.py,
bench/relay.py) share: parsing sizes, cycle sizing, CPU of this script, interleaved cycles
over long-lived MTAs, the ratio table and writing the results out.

Peers themselves (sinks, HAProxy, Postfix, ferrymail) are started by `peers.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # bench/ is not a package: found via sys.path
from peers import BenchError


class CyclePlan(Protocol):
    @property
    def messages(self) -> int: ...  # per cycle at 2 KB

    @property
    def sessions(self) -> int: ...  # smtp-source sessions


class VariantLike(Protocol):
    @property
    def key(self) -> str: ...


class ResultLike(Protocol):
    variant: str
    size: int
    error: str | None

    @property
    def cycles(self) -> list[Any]: ...


S = TypeVar("S")
V = TypeVar("V", bound=VariantLike)
M = TypeVar("M")
C = TypeVar("C")
R = TypeVar("R", bound=ResultLike)


def log(msg: str) -> None:
    """Progress goes to stderr; the report alone to stdout."""
    print(msg, file=sys.stderr, flush=True)


def parse_sizes(text: str) -> list[int]:
    """'2048,102400' -> [2048, 102400]; SystemExit on anything but positive byte counts."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--sizes wants comma-separated byte counts, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise SystemExit("--sizes needs at least one positive size")
    return sizes


def messages_for(plan: CyclePlan, size: int) -> int:
    """N for one cycle: the 2 KB count, scaled down for larger messages (about 1/5 at 100 KB),
    never fewer than the smtp-source sessions."""
    return max(plan.sessions, int(plan.messages * min(1.0, (2048 / size) ** 0.4)))


def self_cpu() -> float:
    """Seconds of CPU (user + system) this script has used: the poller's share of a cycle."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def error_line(e: BaseException) -> str:
    """The first line of an error, for a table cell."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def show_logs(d: Path, log: Callable[[str], None], lines: int = 12) -> None:
    """Log the last `lines` lines of every peer log in `d` (after a failure)."""
    for path in sorted(d.glob("*.log")) + sorted(d.glob("maillog")):
        text = peers.tail(path, lines)
        if text.strip():
            log(f"  --- last lines of {path.name}:\n"
                + "\n".join(f"  | {ln}" for ln in text.splitlines()))


class CycleStats:
    """Figures over a result's timed `cycles` (each with `messages`, `rate`, `mta_cpu`,
    `other_cores` and a duration in seconds named by SPAN)."""

    SPAN = "wall"
    label: str
    size: int
    error: str | None
    cycles: list[Any]

    def row_head(self, fmt_size: Callable[[int], str]) -> str:
        """A results row's first cells: variant, size, msgs/cycle, median msg/s, min-max
        msg/s (ends with "| ": the caller adds the rest)."""
        rates = [c.rate for c in self.cycles]
        return (f"| {self.label} | {fmt_size(self.size)} | {self.cycles[0].messages:,} | "
                f"{self.rate:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | ")

    def failed_row(self, fmt_size: Callable[[int], str], columns: int) -> str:
        """A results row of `columns` cells for a variant that failed or did not run: FAILED
        under msg/s, the error in the last cell."""
        return (f"| {self.label} | {fmt_size(self.size)} | | FAILED |" + " |" * (columns - 5)
                + f" {self.error or 'not run'} |")

    @property
    def rate(self) -> float:
        """Median msg/s over the cycles."""
        return statistics.median(c.rate for c in self.cycles) if self.cycles else 0.0

    def per_1k(self, attr: str) -> float:
        """CPU seconds `attr` per 1,000 messages (= ms per message) over all cycles."""
        total = sum(c.messages for c in self.cycles)
        return sum(getattr(c, attr) for c in self.cycles) * 1000 / total if total else 0.0

    @property
    def cores(self) -> float:
        """The MTA's CPU per second of the timed spans: cores it kept busy."""
        span = sum(getattr(c, self.SPAN) for c in self.cycles)
        return sum(c.mta_cpu for c in self.cycles) / span if span else 0.0

    @property
    def other(self) -> float:
        """Median cores the rest of the machine used meanwhile."""
        return statistics.median(c.other_cores for c in self.cycles) if self.cycles else 0.0


def add_cycle_args(p: argparse.ArgumentParser, keys: Sequence[str], messages: str) -> None:
    """The cycle options outbound.py and relay.py share; `keys` the variants (and aliases),
    `messages` the --messages help (its defaults)."""
    p.add_argument("--quick", action="store_true", help="tiny cycles, for a smoke test")
    p.add_argument("--sizes", default="2048,102400", help="message payload sizes in bytes")
    p.add_argument("--only", help="comma-separated variants: " + ", ".join(keys))
    p.add_argument("--messages", type=int, help=messages)
    p.add_argument("--repeat", type=int, help="timed cycles per size (default 3; quick 1)")


def add_delivery_args(p: argparse.ArgumentParser, *, sessions: str, section: str,
                      results_name: str) -> None:
    """The delivery, smtp-source and output options outbound.py and relay.py share."""
    p.add_argument("--concurrency", type=int, default=20, help="delivery sessions")
    p.add_argument("--reuse", type=int, default=100, help="messages per delivery session")
    p.add_argument("--sessions", type=int, default=20, help=sessions)
    p.add_argument("--write-results", action="store_true",
                   help=f"rewrite the {section} section of {results_name}")
    p.add_argument("--json", type=Path, help="also write the raw results here")


def report_head(env: dict[str, str], versions: Sequence[str], command: str) -> list[str]:
    """The report's first lines: when and where, the versions of ferrymail and of the named
    peers (`env` keys), the command."""
    peers_part = ", ".join(f"{name} {env[name.lower()]}" for name in versions)
    return [
        f"Measured {env['date']} on {env['machine']}; load average before the run "
        f"{env['loadavg']}.",
        f"Python {env['python']}, ferrymail {env['ferrymail']}, uvloop {env['uvloop']}, "
        f"{peers_part}.",
        "",
        f"Command: `{command}`",
        "",
    ]


def run_interleaved(variants: Sequence[V], sizes: list[int], repeat: int, warmup: int,
                    results: dict[tuple[str, int], R], stack: contextlib.ExitStack,
                    log: Callable[[str], None], *, prefix: str, describe: Callable[[V], str],
                    start: Callable[[V, contextlib.ExitStack, Path], M],
                    cycle: Callable[[M, int, int], C], count: Callable[[int], int],
                    warm_line: Callable[[V, C], str],
                    cycle_line: Callable[[V, int, C], str]) -> list[R]:
    """Start every variant's MTA in a work directory `prefix`KEY-... (with a `warmup`-message
    cycle at the smallest size), then run the timed cycles interleaved: per size and
    repetition one cycle (`count(size)` messages) of each variant in turn, so that drift in
    the machine's state spreads over all variants instead of favouring whichever ran first.

    A variant that fails (BenchError) is stopped at once (its queue must not trickle into a
    shared sink during another variant's cycle), its logs are shown and its rows in `results`
    (keyed by (variant key, size)) get the error. Returns the results in variant, size order.
    """
    live: dict[str, tuple[V, M, contextlib.ExitStack, Path]] = {}

    def fail(v: V, own: contextlib.ExitStack, d: Path, e: BenchError) -> None:
        log(f"  {v.key}: FAILED: {e}")
        show_logs(d, log)
        own.close()
        live.pop(v.key, None)
        for s in sizes:
            results[(v.key, s)].error = error_line(e)

    for v in variants:
        log(f"{v.key}: {describe(v)}")
        own = contextlib.ExitStack()
        stack.callback(own.close)  # closed before the shared peers (a stack unwinds LIFO)
        d = own.enter_context(peers.workdir(f"{prefix}{v.key}-"))
        try:
            mta = start(v, own, d)
            warm = cycle(mta, warmup, min(sizes))
        except BenchError as e:
            fail(v, own, d, e)
            continue
        live[v.key] = (v, mta, own, d)
        log(warm_line(v, warm))
    for size in sizes:
        n = count(size)
        for _ in range(repeat):
            for v, mta, own, d in list(live.values()):
                try:
                    c = cycle(mta, n, size)
                except BenchError as e:
                    fail(v, own, d, e)
                    continue
                results[(v.key, size)].cycles.append(c)
                log(cycle_line(v, size, c))
    return [results[(v.key, s)] for v in variants for s in sizes]


def ratios_table(rate: dict[tuple[str, int], float],
                 ratios: Sequence[tuple[str, str, str | None]], sizes: list[int],
                 fmt_size: Callable[[int], str]) -> str:
    """A markdown table of rate[a] / rate[b] per size for each (a, b, note) in `ratios`
    ("-" where either is missing); a note column when any note is not None. "" when no
    ratio could be computed."""
    noted = any(note is not None for _, _, note in ratios)
    rows = []
    for a, b, note in ratios:
        cells = [f"{rate[(a, s)] / rate[(b, s)]:.2f}" if (a, s) in rate and rate.get((b, s))
                 else "-" for s in sizes]
        if any(c != "-" for c in cells):
            rows.append(f"| {a} / {b} | " + " | ".join(cells)
                        + (f" | {note or ''} |" if noted else " |"))
    if not rows:
        return ""
    head = "| ratio (msg/s) | " + " | ".join(fmt_size(s) for s in sizes) + (" | |" if noted
                                                                             else " |")
    sep = "|---|" + "---:|" * len(sizes) + ("---|" if noted else "")
    return "\n".join([head, sep, *rows])


def cycle_ratios_table(results: Sequence[Any], ratios: Sequence[tuple[str, str, str | None]],
                       sizes: list[int], fmt_size: Callable[[int], str]) -> str:
    """`ratios_table` over results with `cycles` (CycleStats): the median rates of those
    that ran without error."""
    rate = {(r.variant, r.size): r.rate for r in results if not r.error and r.cycles}
    return ratios_table(rate, ratios, sizes, fmt_size)


def join_report(lines: list[str], table: str, ratios: str) -> str:
    """The report: `lines` (head and method), the results `table`, then the `ratios` table
    if there is one, blank lines between."""
    return "\n".join([*lines, "", table, *(["", ratios] if ratios else [])])


def run_with_shared_peers(prefix: str, what: str,
                          start_shared: Callable[[Path, contextlib.ExitStack], S],
                          run: Callable[[S, contextlib.ExitStack], list[R]],
                          log: Callable[[str], None]) -> list[R] | int:
    """Start the peers all variants share (`start_shared`, entering them on the stack) in a
    work directory `prefix`..., then `run` the variants. SIGTERM and SIGINT become
    KeyboardInterrupt so that every peer is stopped. Returns the results, or the exit status:
    1 if `what` (the shared peers) could not start, 130 when interrupted."""
    from inbound import signals_as_interrupt  # inbound imports this module

    with signals_as_interrupt():
        try:
            with peers.workdir(prefix) as d, contextlib.ExitStack() as stack:
                try:
                    shared = start_shared(d, stack)
                except BenchError as e:
                    log(f"cannot start {what}: {e}")
                    return 1
                return run(shared, stack)
        except KeyboardInterrupt:
            log("interrupted: peers stopped")
            return 130


def publish(body: str, results: Sequence[Any], plan: Any, env: dict[str, str],
            json_path: Path | None, write: Callable[[str], None] | None, results_path: Path,
            log: Callable[[str], None], row: Callable[[Any], dict[str, Any]] = asdict) -> int:
    """Print the report `body`, write the raw results to `json_path` if given, and `write`
    the section (None: not asked to) unless a variant failed. Returns the exit status: 1 if
    any result has an error, else 0."""
    print(body)
    if json_path:
        json_path.write_text(json.dumps({"environment": env, "plan": asdict(plan),
                                         "results": [row(r) for r in results]}, indent=2))
    failed = [r.variant for r in results if r.error]
    if write is not None and failed:
        log(f"not writing {results_path.name}: {', '.join(sorted(set(failed)))} failed")
    elif write is not None:
        write(body)
        log(f"wrote {results_path}")
    return 1 if failed else 0
