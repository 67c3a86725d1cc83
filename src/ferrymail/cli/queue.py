"""``ferrymail queue …``: inspect the spool."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from ferrymail.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, print_config_error
from ferrymail.config import ConfigError, load_startup


def _age(seconds: float) -> str:
    """``42s``, ``7m``, ``3h``, ``2d``."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cluster_line(spool_dir: Path) -> str:
    """``cluster: shared, 3 instances (mta1)`` or ``cluster: redis unreachable: split 1/3
    since … (error)`` from the running instance's status file; "" without one."""
    import json

    from ferrymail.orchestrator.limiter import STATUS_FILE, iso

    try:
        st = json.loads((spool_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return ""
    since = iso(float(st.get("since", 0)))
    if st.get("state") == "fallback":
        mode = st.get("fallback")
        share = f" 1/{st.get('instances')}" if mode == "split" else ""
        return (f"cluster: redis unreachable: {mode}{share} since {since} "
                f"({st.get('error') or 'no answer'}); instance {st.get('instance')}")
    return (f"cluster: {st.get('state')}, {st.get('instances')} live instance(s), "
            f"instance {st.get('instance')}, since {since}")


def cmd_queue_list(args: argparse.Namespace) -> int:
    from ferrymail.spool import SpoolError, SqliteSpool
    from ferrymail.supervisor import shard_paths

    try:
        startup = load_startup(args.startup)
    except ConfigError as exc:
        print_config_error(exc)
        return EXIT_CONFIG

    async def listing() -> list:
        # every worker's shard (supervisor.py), read-only: works beside a running daemon
        found: list = []
        for path in shard_paths(startup.spool.path):
            if not (path / "spool.db").exists():
                continue
            spool = SqliteSpool(path, readonly=True)
            await spool.start()
            try:
                found += await spool.list(args.limit)
            finally:
                await spool.close()
        found.sort(key=lambda m: m.queue_id)  # ids are time-ordered across shards
        return found[:args.limit]

    if not Path(startup.spool.path).exists():
        print(f"ferrymail queue list: no spool at {startup.spool.path}", file=sys.stderr)
        return EXIT_FAIL
    try:
        messages = asyncio.run(listing())
    except SpoolError as exc:
        print(f"ferrymail queue list: {exc}", file=sys.stderr)
        return EXIT_FAIL
    now = time.time()
    cluster = cluster_line(Path(startup.spool.path))
    if cluster:
        print(cluster)
    for msg in messages:
        env = msg.envelope
        print(f"{msg.queue_id}  {_age(now - env.received_at):>4}  <{env.sender}>  "
              f"client={env.client_ip}  size={env.size}  server={env.server_id}")
        for rcpt in msg.recipients:
            extra = f"  attempts={rcpt.attempts}" if rcpt.attempts else ""
            reply = f'  last="{rcpt.last_reply}"' if rcpt.last_reply else ""
            print(f"    <{rcpt.address}>  {rcpt.state.value}{extra}{reply}")
    from ferrymail.delivery.scheduler import destination_lines

    shards = shard_paths(startup.spool.path)
    for shard in shards:  # written by each worker's scheduler
        lines = destination_lines(shard, now)
        if lines and len(shards) > 1:
            lines[0] = f"{lines[0]} [{shard}]"
        for line in lines:
            print(line)
    print(f"{len(messages)} message(s)" + (" (limit reached)" if len(messages) >= args.limit
                                         else ""))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``queue list`` to the ``ferrymail`` subparsers."""
    q = sub.add_parser("queue", help="inspect the spool")
    q_sub = q.add_subparsers(dest="queue_command", metavar="SUBCOMMAND", required=True)
    p = q_sub.add_parser("list", help="list pending messages", description="list pending messages")
    p.set_defaults(func=cmd_queue_list)
    p.add_argument("--startup", metavar="FILE", help="startup configuration (for the spool)")
    p.add_argument("--limit", type=int, default=1000, help="show at most this many")
