"""``ferrymail top``: the live view of a running daemon (observe/top.py)."""

from __future__ import annotations

import argparse
import sys

from ferrymail.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, print_config_error
from ferrymail.config import ConfigError, load_startup

WORKER_TIMEOUT = 2.0  # seconds each frame waits for workers 1.. (worker 0: 10 s)


def cmd_top(args: argparse.Namespace) -> int:
    from ferrymail.admin.client import AdminClient, AdminError, AdminUnavailable, other_workers
    from ferrymail.observe import top

    try:
        startup = load_startup(args.startup)
    except ConfigError as exc:
        print_config_error(exc)
        return EXIT_CONFIG
    client = AdminClient.for_startup(startup, timeout=10)
    if client is None:
        print("ferrymail top: the admin API is switched off", file=sys.stderr)
        return EXIT_FAIL
    try:
        # another worker may be restarting or stopped: a short wait, the frame says so
        top.run([client, *other_workers(startup, timeout=WORKER_TIMEOUT)],
                interval=args.interval,
                once=args.once)
    except KeyboardInterrupt:
        return EXIT_OK
    except (AdminUnavailable, AdminError) as exc:
        print(f"ferrymail top: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``top``."""
    p = sub.add_parser("top", help="live view of the running daemon",
                       description="live view: rates, queue, destinations, sources, errors")
    p.set_defaults(func=cmd_top)
    p.add_argument("--startup", metavar="FILE", help="startup configuration (admin socket)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
