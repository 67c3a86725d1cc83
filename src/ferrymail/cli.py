"""The ``ferrymail`` command.

``ferrymail run [--startup FILE] [--running FILE]``   serve (no options: embedded defaults)
``ferrymail config check FILE…``                     validate configuration files
``ferrymail reload [--startup FILE]``                 SIGHUP the running instance (pidfile)
``ferrymail queue list [--startup FILE]``             pending messages in the spool
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ferrymail import __version__
from ferrymail.config import ConfigError, check_files, load_startup
from ferrymail.observe import log

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _print_config_error(exc: ConfigError) -> None:
    for err in exc.errors:
        print(str(err), file=sys.stderr)


# --------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    from ferrymail.app import App

    try:
        app = App.from_files(args.startup, args.running)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG
    log.configure(app.startup.environment.logging.level)
    try:
        uvloop.run(app.run())
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # startup failures: port in use, spool unusable, pidfile…
        log.log_event("app.start_failed", "error", error=f"{type(exc).__name__}: {exc}")
        return EXIT_FAIL
    return EXIT_OK


# --------------------------------------------------------------------------- config check


def cmd_config_check(args: argparse.Namespace) -> int:
    errors = check_files(list(args.files))
    bad = {e.file for e in errors}
    for err in errors:
        print(str(err))
    for name in args.files:
        if name not in bad:
            print(f"{name}: OK")
    return EXIT_FAIL if errors else EXIT_OK


# --------------------------------------------------------------------------- reload


def cmd_reload(args: argparse.Namespace) -> int:
    from ferrymail.app import read_pidfile

    try:
        startup = load_startup(args.startup)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG
    pidfile = Path(startup.environment.pidfile)
    try:
        pid = read_pidfile(pidfile)
    except (OSError, ValueError) as exc:
        print(f"ferrymail reload: cannot read pidfile {pidfile}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"ferrymail reload: no process {pid} (stale pidfile {pidfile})", file=sys.stderr)
        return EXIT_FAIL
    except PermissionError as exc:
        print(f"ferrymail reload: cannot signal process {pid}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"sent SIGHUP to ferrymail (pid {pid})")
    return EXIT_OK


# --------------------------------------------------------------------------- queue list


def _age(seconds: float) -> str:
    """``42s``, ``7m``, ``3h``, ``2d``."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cmd_queue_list(args: argparse.Namespace) -> int:
    from ferrymail.spool import SpoolError, SqliteSpool

    try:
        startup = load_startup(args.startup)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG

    async def listing() -> list:
        spool = SqliteSpool(startup.spool.path, readonly=True)  # works beside a running daemon
        await spool.start()
        try:
            return await spool.list(args.limit)
        finally:
            await spool.close()

    if not Path(startup.spool.path).exists():
        print(f"ferrymail queue list: no spool at {startup.spool.path}", file=sys.stderr)
        return EXIT_FAIL
    try:
        messages = asyncio.run(listing())
    except SpoolError as exc:
        print(f"ferrymail queue list: {exc}", file=sys.stderr)
        return EXIT_FAIL
    now = time.time()
    for msg in messages:
        env = msg.envelope
        print(f"{msg.queue_id}  {_age(now - env.received_at):>4}  <{env.sender}>  "
              f"client={env.client_ip}  size={env.size}  server={env.server_id}")
        for rcpt in msg.recipients:
            extra = f"  attempts={rcpt.attempts}" if rcpt.attempts else ""
            reply = f'  last="{rcpt.last_reply}"' if rcpt.last_reply else ""
            print(f"    <{rcpt.address}>  {rcpt.state.value}{extra}{reply}")
    print(f"{len(messages)} message(s)" + (" (limit reached)" if len(messages) >= args.limit
                                         else ""))
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferrymail", description="A mail transfer agent for proxy tiers.")
    parser.add_argument("--version", action="version", version=f"ferrymail {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str,
            parent: argparse._SubParsersAction = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add("run", cmd_run, "run the MTA (embedded defaults without options)")
    p.add_argument("--startup", metavar="FILE", help="startup configuration (YAML)")
    p.add_argument("--running", metavar="FILE", help="running configuration (YAML)")

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    p = add("check", cmd_config_check, "validate configuration files", cfg_sub)
    p.add_argument("files", nargs="+", metavar="FILE")

    p = add("reload", cmd_reload, "make the running instance re-read its running config")
    p.add_argument("--startup", metavar="FILE", help="startup configuration (for the pidfile)")

    q = sub.add_parser("queue", help="inspect the spool")
    q_sub = q.add_subparsers(dest="queue_command", metavar="SUBCOMMAND", required=True)
    p = add("list", cmd_queue_list, "list pending messages", q_sub)
    p.add_argument("--startup", metavar="FILE", help="startup configuration (for the spool)")
    p.add_argument("--limit", type=int, default=1000, help="show at most this many")
    from ferrymail.send import add_parser as add_send_parser
    add_send_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
