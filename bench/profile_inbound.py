"""Profile ferrymail's inbound path under smtp-source load (for development, not for RESULTS.md).

    .venv/bin/python bench/profile_inbound.py [--size 2048] [--messages 20000] [--proxied]
        [--wait-quiet] [--py-spy out.txt [--gil] [--native]] [--perf out.txt [--perf-event E]]
        [--perf-stat syscalls:sys_enter_futex,context-switches,...]

Starts `ferrymail run` as the inbound benchmark does (direct and PROXY listeners, fsynced
spool, `queues.hold`), optionally HAProxy in front, sends a warm-up and then the timed load
with `smtp-source -s 20 -d`, and prints the rate and the server's CPU per message, split into
user and system time and per thread (event loop, spool writer, checkpointer), and the CPU
everything else on the machine used meanwhile. With `--py-spy FILE`, py-spy (if installed)
samples the server meanwhile and writes collapsed stacks to FILE, then the heaviest functions
by self time are printed; `--perf FILE` writes `perf report` output instead, and
`--perf-stat` counts events (e.g. syscalls) per message and thread.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # bench/ is not a package: found via sys.path

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """(utime, stime) seconds per thread (name/tid) of process `pid`."""
    out: dict[str, tuple[float, float]] = collections.defaultdict(lambda: (0.0, 0.0))
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = f'{stat[stat.index("(") + 1:stat.rindex(")")]}/{tid}'
        fields = stat[stat.rindex(")") + 2:].split()
        u, s = out[name]
        out[name] = (u + int(fields[11]) / TICK, s + int(fields[12]) / TICK)
    return dict(out)


def print_thread_cpu(before: dict[str, tuple[float, float]],
                     after: dict[str, tuple[float, float]], messages: int,
                     prefix: str = "", width: int = 32) -> tuple[float, float]:
    """Print each thread's user and sys CPU-ms per message between two `thread_cpu`
    readings (threads that used none left out); returns the (user, sys) seconds summed."""
    tu = ts = 0.0
    for name in sorted(after):
        u = after[name][0] - before.get(name, (0, 0))[0]
        s = after[name][1] - before.get(name, (0, 0))[1]
        tu, ts = tu + u, ts + s
        if u + s > 0:
            print(f"  {prefix}{name:{width}} user {1000 * u / messages:.3f}  "
                  f"sys {1000 * s / messages:.3f} CPU-ms/msg")
    return tu, ts


def top_self(collapsed: Path, n: int = 40) -> str:
    """The `n` heaviest frames by self samples (and by inclusive samples) in collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    lines = [f"{total} samples", "-- self"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in own.most_common(n)]
    lines.append("-- inclusive")
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(n)]
    return "\n".join(lines)


def wait_quiet(limit: float = 0.15, window: float = 2.0, timeout: float = 180.0) -> float:
    """Wait until the machine's busy cores over `window` s stay below `limit` (other work)."""
    deadline = time.monotonic() + timeout
    while True:
        b0 = peers.machine_busy_seconds()
        time.sleep(window)
        busy = (peers.machine_busy_seconds() - b0) / window
        if busy < limit or time.monotonic() > deadline:
            return busy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--proxied", action="store_true", help="send through HAProxy (PROXY v2)")
    ap.add_argument("--py-spy", dest="pyspy", type=Path, help="collapsed stacks to this file")
    ap.add_argument("--native", action="store_true", help="py-spy --native")
    ap.add_argument("--gil", action="store_true", help="py-spy --gil: only samples holding it")
    ap.add_argument("--idle", action="store_true",
                    help="py-spy --idle: also samples of threads waiting (epoll, the GIL, locks)")
    ap.add_argument("--perf", type=Path, help="perf report output file")
    ap.add_argument("--perf-event", default="cpu-clock", help="event for --perf")
    ap.add_argument("--perf-stat", default="", help="count these perf events (comma list), "
                    "e.g. syscalls:sys_enter_fdatasync,syscalls:sys_enter_read")
    ap.add_argument("--wait-quiet", action="store_true",
                    help="before the timed load, wait until nothing else runs")
    args = ap.parse_args()
    with peers.workdir("ferrymail-profile") as d, contextlib.ExitStack() as stack:
        fm = stack.enter_context(peers.ferrymail(d))
        host, port = fm.host, fm.port
        if args.proxied:
            px = stack.enter_context(peers.haproxy(d, fm.host, int(fm.extra["proxied_port"])))
            host, port = px.host, px.port
        pid = fm.pids()[0]
        peers.run_smtp_source(host, port, 20 * args.sessions, args.size, args.sessions)
        prof = None
        perf_data = d / "perf.data"
        if args.pyspy:
            exe = shutil.which("py-spy") or str(peers.VENV_BIN / "py-spy")
            cmd = [exe, "record", "-p", str(pid), "-f", "raw", "-o", str(args.pyspy),
                   "-r", "250", "--threads"]
            # py-spy refuses --native together with --nonblocking (it must pause the process)
            cmd.append("--native" if args.native else "--nonblocking")
            if args.gil:
                cmd.append("--gil")
            if args.idle:
                cmd.append("--idle")
            prof = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        elif args.perf:
            prof = subprocess.Popen(["perf", "record", "-e", args.perf_event, "-g", "-p", str(pid),
                                     "-o", str(perf_data)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        if args.wait_quiet:
            wait_quiet()
        stat = None
        if args.perf_stat:
            stat = subprocess.Popen(
                ["perf", "stat", "--per-thread", "-e", args.perf_stat, "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
        before = thread_cpu(pid)
        busy0 = peers.machine_busy_seconds()
        run = peers.run_smtp_source(host, port, args.messages, args.size, args.sessions,
                                    timeout=300)
        after = thread_cpu(pid)
        busy = peers.machine_busy_seconds() - busy0
        for p in (prof, stat):
            if p is not None:
                p.send_signal(2)
                p.wait(30)
        print(f"{run.rate:,.0f} msg/s, {args.messages} x {args.size} B"
              f"{' via HAProxy' if args.proxied else ''}; smtp-source "
              f"{1000 * run.client_cpu / args.messages:.3f} CPU-ms/msg")
        tu, ts = print_thread_cpu(before, after, args.messages)
        print(f"  {'total':32} user {1000 * tu / args.messages:.3f}  "
              f"sys {1000 * ts / args.messages:.3f}  = {1000 * (tu + ts) / args.messages:.3f}")
        other = (busy - tu - ts - run.client_cpu) / run.wall
        print(f"  server {(tu + ts) / run.wall:.2f} cores, other load {other:.2f} cores")
        if stat is not None:
            for line in stat.stderr.read().splitlines():  # type: ignore[union-attr]
                words = line.split()  # per thread: "comm-tid  count  event"
                if len(words) >= 3 and words[1].replace(",", "").isdigit():
                    n = int(words[1].replace(",", ""))
                    print(f"  {words[0]:20} {words[2]:40} {n / args.messages:8.3f} per msg")
        if args.pyspy and args.pyspy.exists():
            print(top_self(args.pyspy))
        if args.perf:
            with open(args.perf, "w") as f:
                for extra in (["--sort", "tid,dso", "-g", "none"], ["--sort", "dso"],
                              ["--sort", "tid,dso,sym", "-g", "none"],
                              ["--sort", "dso,sym", "-G"]):
                    f.flush()
                    subprocess.run(["perf", "report", "-i", str(perf_data), "--no-children",
                                    "--stdio", *extra], stdout=f, stderr=subprocess.DEVNULL)
            print(f"perf report in {args.perf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
