"""``ferrymail suspend add|list|remove``: hold deliveries on a key, without bouncing anything.

With a ``cluster`` section in the startup file the suspension is stored in Redis and every
instance obeys it within a heartbeat; without one it goes to ``suspensions.json`` in the
spool directory, which the running instance re-reads when it changes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ferrymail.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, print_config_error
from ferrymail.config import ConfigError, StartupConfig, load_startup
from ferrymail.config.types import parse_duration
from ferrymail.orchestrator.limiter import iso
from ferrymail.orchestrator.suspensions import (
    FILE_NAME,
    Suspension,
    SuspensionFile,
    new_suspension,
)


def _fields(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise ValueError(f"--field {pair!r}: expected FIELD=VALUE, e.g. localip=192.0.2.1")
        if name.strip() in out:
            raise ValueError(f"--field {name.strip()} is given twice")
        out[name.strip()] = value.strip()
    return out


def _startup(args: argparse.Namespace) -> StartupConfig | None:
    try:
        return load_startup(args.startup)
    except ConfigError as exc:
        print_config_error(exc)
        return None


def _store(startup: StartupConfig) -> SuspensionFile:
    return SuspensionFile(Path(startup.spool.path) / FILE_NAME)


async def _with_cluster(startup: StartupConfig, action):  # type: ignore[no-untyped-def]
    from ferrymail.orchestrator.redis import suspension_client

    assert startup.cluster is not None
    cluster = suspension_client(startup.cluster)
    try:
        return await action(cluster)
    finally:
        await cluster.client.aclose()


def cmd_add(args: argparse.Namespace) -> int:
    startup = _startup(args)
    if startup is None:
        return EXIT_CONFIG
    try:
        fields = _fields(args.field)
        duration = parse_duration(args.duration)
        s = new_suspension(fields, duration, args.reason)
    except ValueError as exc:
        print(f"ferrymail suspend add: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        if startup.cluster is not None:
            from ferrymail.orchestrator.redis import add_suspension

            asyncio.run(_with_cluster(startup, lambda c: add_suspension(c, s)))
        else:
            _store(startup).add(s)
    except Exception as exc:  # RedisDown, OSError, ValueError: say so, store nothing
        print(f"ferrymail suspend add: not stored: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(s.id)
    return EXIT_OK


def _load(startup: StartupConfig) -> list[Suspension]:
    if startup.cluster is not None:
        from ferrymail.orchestrator.redis import list_suspensions

        return list(asyncio.run(_with_cluster(startup, list_suspensions)))
    return _store(startup).load()


def cmd_list(args: argparse.Namespace) -> int:
    startup = _startup(args)
    if startup is None:
        return EXIT_CONFIG
    try:
        items = _load(startup)
    except Exception as exc:
        print(f"ferrymail suspend list: {exc}", file=sys.stderr)
        return EXIT_FAIL
    now = time.time()
    active = sorted((s for s in items if s.until > now), key=lambda s: s.until)
    for s in active:
        what = " ".join(f"{k}={v}" for k, v in s.fields.items()) or "(everything)"
        print(f"{s.id}  until {iso(s.until)}  {what}  origin={s.origin}  "
              f"reason={s.reason!r}")
    print(f"{len(active)} suspension(s)")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    startup = _startup(args)
    if startup is None:
        return EXIT_CONFIG
    try:
        if startup.cluster is not None:
            from ferrymail.orchestrator.redis import remove_suspension

            done = asyncio.run(_with_cluster(startup, lambda c: remove_suspension(c, args.id)))
        else:
            done = _store(startup).remove(args.id)
    except Exception as exc:
        print(f"ferrymail suspend remove: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if not done:
        print(f"ferrymail suspend remove: no suspension {args.id!r}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``suspend add|list|remove`` to the ``ferrymail`` subparsers."""
    p = sub.add_parser("suspend", help="hold deliveries on a key (no bounces)")
    s_sub = p.add_subparsers(dest="suspend_command", metavar="SUBCOMMAND", required=True)
    add = s_sub.add_parser("add", help="add a suspension; prints its id")
    add.add_argument("--field", action="append", default=[], metavar="FIELD=VALUE",
                     help="localip, remoteip, remotemx, recipientdomain, transportid, "
                          "grouping (&name) or proxy; repeat for several (all must match)")
    add.add_argument("--duration", required=True, help="e.g. 10m, 2h, 3600")
    add.add_argument("--reason", default="", help="shown in logs and queue list")
    add.set_defaults(func=cmd_add)
    ls = s_sub.add_parser("list", help="active suspensions")
    ls.set_defaults(func=cmd_list)
    rm = s_sub.add_parser("remove", help="remove a suspension by id")
    rm.add_argument("id")
    rm.set_defaults(func=cmd_remove)
    for q in (add, ls, rm):
        q.add_argument("--startup", metavar="FILE", help="startup configuration (spool, "
                       "cluster)")
