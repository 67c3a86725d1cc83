"""Profile ferrymail relaying (reception and delivery at once) under smtp-source load
(for development, not for RESULTS.md).

    .venv/bin/python bench/profile_relay.py [--size 2048] [--messages 6000] [--workers 1]
        [--cprofile out.prof] [--py-spy out.txt [--gil]] [--strace out.txt]
        [--perf-stat EVENTS] [--compare REV [--rounds 3]]

Starts `ferrymail run` with the relay configuration of `bench/relay.py` (fsynced spool, one
transport to one smtp-sink), sends a warm-up, then the timed load with `smtp-source -s 20 -d`,
waits until the sink has every message and the queue is empty, and prints the CPU per relayed
message of the ferrymail process per thread (user and system time, from /proc), of the sink
and of smtp-source. Judge a change by these CPU figures, not by the rate, on a shared machine.

- `--cprofile FILE`: ferrymail runs under `python -m cProfile` (main thread only; one worker);
  the heaviest functions are printed when it has stopped.
- `--py-spy FILE`: py-spy (if installed) samples every thread of the first worker meanwhile
  (collapsed stacks to FILE); the heaviest functions by self and inclusive time are printed.
- `--strace FILE`: `strace -c -f` on the ferrymail process meanwhile (syscall counts per
  message are printed; strace slows the process, so the CPU figures of that run are not
  comparable).
- `--perf-stat EVENTS`: `perf stat` counts (e.g. `instructions,context-switches`) per message.
- `--compare REV`: A/B against the source tree of git revision REV (`git archive` into a
  temporary directory, run with `PYTHONPATH` pointing at it, so the same venv, peers and
  config), `--rounds` times each, alternating REV and the worktree, and print both series
  and their medians of ferrymail CPU per message: on a machine shared with other work, the
  way to tell a change of a few per cent from the noise between runs minutes apart.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # bench/ is not a package: found via sys.path
import relay
from profile_inbound import print_thread_cpu, thread_cpu, top_self


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--messages", type=int, default=6000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cprofile", type=Path, help="cProfile stats of the main thread here")
    ap.add_argument("--py-spy", dest="pyspy", type=Path, help="collapsed stacks here")
    ap.add_argument("--gil", action="store_true", help="py-spy --gil: only samples holding it")
    ap.add_argument("--strace", type=Path, help="strace -c -f summary here")
    ap.add_argument("--perf-stat", default="", help="perf events to count (comma list)")
    ap.add_argument("--compare", metavar="REV", help="A/B against this git revision's src/")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side with --compare")
    args = ap.parse_args()
    if args.cprofile and args.workers != 1:
        raise SystemExit("--cprofile needs --workers 1 (the workers are forked children)")
    if args.compare:
        return compare(args)
    run_once(args)
    return 0


def compare(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="ferrymail-compare-") as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", args.compare, "src"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        series: dict[str, list[float]] = {args.compare: [], "worktree": []}
        for _ in range(args.rounds):
            for side, path in ((args.compare, f"{tmp}/src"), ("worktree", None)):
                saved = os.environ.pop("PYTHONPATH", None)
                if path is not None:
                    os.environ["PYTHONPATH"] = path  # ferrymail imports this tree first
                try:
                    with contextlib.redirect_stdout(sys.stderr):
                        cpu = run_once(args)
                finally:
                    os.environ.pop("PYTHONPATH", None)
                    if saved is not None:
                        os.environ["PYTHONPATH"] = saved
                series[side].append(cpu)
                print(f"{side:>12}: {cpu:.3f} CPU-ms/msg", flush=True)
    base, new = (statistics.median(v) for v in series.values())
    print(f"{args.size} B, {args.messages} msgs, {args.workers} worker(s), {args.rounds} "
          f"rounds: {args.compare} " + ", ".join(f"{x:.3f}" for x in series[args.compare])
          + f" (median {base:.3f}); worktree "
          + ", ".join(f"{x:.3f}" for x in series["worktree"])
          + f" (median {new:.3f}); {100 * (new - base) / base:+.1f} %")
    return 0


def run_once(args: argparse.Namespace) -> float:
    """One profiled cycle (see the module docstring); ferrymail CPU-ms per message."""
    plan = relay.Plan(sizes=[args.size], messages=args.messages, repeat=1, warmup=200,
                      sessions=args.sessions, concurrency=20, reuse=100, workers=args.workers)
    variant = relay.Variant("ferrymail-1", "ferrymail", "127.0.0.2", args.workers)
    with peers.workdir("ferrymail-relay-profile") as d, contextlib.ExitStack() as stack:
        sink = stack.enter_context(peers.dumping_sink(d))
        prefix: tuple[str, ...] = ()
        if args.cprofile:
            prefix = (sys.executable, "-m", "cProfile", "-o", str(args.cprofile.resolve()))
        own = contextlib.ExitStack()
        stack.enter_context(own)
        fm = own.enter_context(peers.ferrymail(d, args=("--workers", str(args.workers)),
                                               prefix=prefix))
        mta = relay.ShardedFerrymail(
            fm, variant.source,
            lambda hold: relay.outbound.ferrymail_running_yaml(
                relay.outbound.Variant("ferrymail-1", "ferrymail", variant.source, None),
                relay.outbound.Plan(sizes=plan.sizes, messages=plan.messages, repeat=1,
                                    warmup=plan.warmup, sessions=plan.sessions,
                                    concurrency=plan.concurrency, reuse=plan.reuse),
                sink, None, hold), None)
        mta.release()
        relay.run_cycle(mta, sink, plan.warmup, args.size, plan)
        root = fm.pids()[0]
        pids = peers.process_tree(root)
        tracer = None
        if args.pyspy:
            exe = shutil.which("py-spy") or str(peers.VENV_BIN / "py-spy")
            tracer = subprocess.Popen([exe, "record", "-p", str(pids[-1]), "-f", "raw", "-o",
                                       str(args.pyspy), "-r", "250", "--threads",
                                       "--nonblocking", *(["--gil"] if args.gil else [])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
        elif args.strace:
            tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(args.strace),
                                       *(f"-p{pid}" for pid in pids)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        elif args.perf_stat:
            tracer = subprocess.Popen(
                ["perf", "stat", "-x", ",", "-e", args.perf_stat, "-p",
                 ",".join(str(p) for p in pids)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
        before = {p: thread_cpu(p) for p in pids}
        cycle = relay.run_cycle(mta, sink, args.messages, args.size, plan)
        after = {p: thread_cpu(p) for p in pids}
        if tracer is not None:
            tracer.send_signal(2)
            _, err = tracer.communicate(timeout=30)
        n = args.messages
        print(f"{cycle.rate:,.0f} msg/s, {n} x {args.size} B, {args.workers} worker(s); "
              f"{cycle.check}")
        tu = ts = 0.0
        for pid in pids:
            u, s = print_thread_cpu(before[pid], after[pid], n, prefix=f"{pid:>7} ", width=28)
            tu, ts = tu + u, ts + s
        print(f"  {'ferrymail total':36} user {1000 * tu / n:.3f}  sys {1000 * ts / n:.3f}  "
              f"= {1000 * (tu + ts) / n:.3f} CPU-ms/msg (tree: {1000 * cycle.mta_cpu / n:.3f})")
        print(f"  sink {1000 * cycle.sink_cpu / n:.3f}, smtp-source "
              f"{1000 * cycle.source_cpu / n:.3f} CPU-ms/msg; other load "
              f"{cycle.other_cores:.2f} cores")
        if args.perf_stat and err:
            for line in err.splitlines():
                words = line.split(",")
                if len(words) >= 3 and words[0].strip().isdigit():
                    print(f"  {words[2]:30} {int(words[0]) / n:12,.0f} per msg")
        if args.pyspy and args.pyspy.exists():
            print(top_self(args.pyspy))
        if args.strace:
            lines = args.strace.read_text().splitlines()
            for line in lines:
                words = line.split()
                if len(words) >= 5 and words[3].isdigit():
                    print(f"  {words[-1]:20} {int(words[3]) / n:8.2f} per msg")
        own.close()  # stop ferrymail: cProfile writes its stats on the way out
    if args.cprofile:
        stats = pstats.Stats(str(args.cprofile))
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(40)
    return 1000 * (tu + ts) / n


if __name__ == "__main__":
    sys.exit(main())
