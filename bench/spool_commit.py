"""Spool group-commit micro-benchmark: stores/s of 2 KB messages from concurrent storers.

    .venv/bin/python bench/spool_commit.py [--seconds 2] [--storers 20] [--size 2048] [--dir DIR]

Runs once with fsync on and once with fsync off, each bounded by --seconds (and 200,000
stores), on a fresh spool in a temporary directory (under --dir if given: put it on the disk
the spool will live on, since /tmp may be a tmpfs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from ferrymail.spool import Envelope, SqliteSpool

MAX_STORES = 200_000


async def run(directory: str, fsync: bool, seconds: float, storers: int, size: int) -> dict:
    spool = SqliteSpool(directory, fsync=fsync)
    await spool.start()
    data = os.urandom(size // 2).hex().encode()[:size]
    env = Envelope(
        sender="bench@example.org",
        recipients=("rcpt@example.net",),
        client_ip="127.0.0.1",
        client_port=40000,
        helo="bench.example.org",
        server_id="bench",
        received_at=time.time(),
        size=len(data),
    )
    stored = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def storer() -> None:
        nonlocal stored
        while time.perf_counter() < deadline and stored < MAX_STORES:
            await spool.store(env, data)
            stored += 1

    await asyncio.gather(*(storer() for _ in range(storers)))
    elapsed = time.perf_counter() - start
    commits = spool.commits
    await spool.close()
    return {
        "fsync": fsync,
        "stores": stored,
        "seconds": elapsed,
        "rate": stored / elapsed,
        "commits": commits,
        "per_commit": stored / max(commits, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--storers", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--dir", default=None, help="parent of the temporary spool directory")
    args = parser.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    print(f"{args.storers} concurrent storers, {args.size}-byte messages, {args.seconds}s each")
    for fsync in (True, False):
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="spool-bench-") as tmp:
            r = runner(run(tmp, fsync, args.seconds, args.storers, args.size))
        print(
            f"fsync={'on ' if r['fsync'] else 'off'}  {r['rate']:8.0f} stores/s"
            f"  ({r['stores']} stores, {r['commits']} commits,"
            f" {r['per_commit']:.1f} stores/commit)"
        )


if __name__ == "__main__":
    main()
