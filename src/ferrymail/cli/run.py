"""``ferrymail run``, ``ferrymail config check`` and ``ferrymail reload``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from ferrymail.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, print_config_error
from ferrymail.config import ConfigError, check_files, load_startup
from ferrymail.config.models import MAX_WORKERS
from ferrymail.observe import log


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    from ferrymail.app import App
    from ferrymail.supervisor import (
        choose_workers,
        default_workers,
        run_workers,
        unserved_shards,
    )

    try:
        app = App.from_files(args.startup, args.running)
    except ConfigError as exc:
        print_config_error(exc)
        return EXIT_CONFIG
    lg = app.startup.environment.logging
    try:
        log.configure(lg.level, format=lg.format, destination=lg.destination, file=lg.file,
                      syslog_socket=lg.syslog_socket, syslog_facility=lg.syslog_facility)
    except OSError as exc:
        print(f"ferrymail run: cannot open the log file {lg.file}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_FAIL
    # Whatever the daemon creates (spool files, SQLite's WAL and shared-memory files) is
    # for its own user only.
    os.umask(0o077)
    log.batch_per_iteration()  # one write per event-loop iteration (workers inherit it)
    workers, why = choose_workers(args.workers, app.startup.environment.workers,
                                  default_workers())
    log.log_event("supervisor.workers", workers=workers, why=why,
                  limits="cluster (redis)" if app.startup.cluster is not None
                  else "host-wide (limiter service)" if workers > 1 else "in-process")
    for shard in unserved_shards(app.startup.spool.path, workers):
        log.log_event("spool.shard_unserved", "warning", shard=str(shard), workers=workers,
                      error="a spool shard of a larger worker count: its mail stays queued "
                            "until ferrymail runs with more workers again")
    if workers > 1:
        return run_workers(args.startup, args.running, app.startup, workers)
    try:
        uvloop.run(app.run())
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # startup failures: port in use, spool unusable, pidfile…
        log.log_event("app.start_failed", "error", error=f"{type(exc).__name__}: {exc}")
        return EXIT_FAIL
    finally:
        log.flush()
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    errors = check_files(list(args.files))
    bad = {e.file for e in errors}
    for err in errors:
        print(str(err))
    for name in args.files:
        if name not in bad:
            print(f"{name}: OK")
            _print_warnings(name)
    return EXIT_FAIL if errors else EXIT_OK


def _print_warnings(name: str) -> None:
    """What a valid startup file probably does not mean (see app.startup_warnings)."""
    from ferrymail.app import startup_warnings
    from ferrymail.config.loader import is_startup_data, parse_yaml

    try:
        if not is_startup_data(parse_yaml(Path(name).read_text(), name).data):
            return
        startup = load_startup(name)
    except (OSError, ConfigError):
        return
    for line in startup_warnings(startup, name):
        print(line)


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the daemon to reload through the admin API and report its verdict: exit 0 when
    the new running config is in force, 2 with ``FILE:LINE: KEYPATH: MESSAGE`` lines when it
    was refused. Without an admin API answering, SIGHUP (pidfile) and say no verdict came."""
    from ferrymail.admin.client import AdminClient, AdminError, AdminUnavailable, other_workers
    from ferrymail.app import read_pidfile

    try:
        startup = load_startup(args.startup)
    except ConfigError as exc:
        print_config_error(exc)
        return EXIT_CONFIG
    why = "the admin API is switched off"
    try:
        client = AdminClient.for_startup(startup, timeout=args.timeout)
        if client is not None:
            # every worker of `run --workers N` reloads on its own; the first refusal stops
            for worker in [client, *other_workers(startup, timeout=args.timeout)]:
                answer = worker.post("/v1/reload")
            try:
                pid = read_pidfile(Path(startup.environment.pidfile))
            except (OSError, ValueError):
                pid = answer.get("pid")
            print(f"reloaded ferrymail (pid {pid}): {answer.get('file')} is in force")
            return EXIT_OK
    except AdminError as exc:
        errors = exc.body.get("errors") if isinstance(exc.body, dict) else None
        if exc.status == 422 and errors:
            print("ferrymail reload: the daemon refused the new running configuration and "
                  "keeps the previous one:", file=sys.stderr)
            for err in errors:
                print(err.get("detail") or f"{err.get('file')}:{err.get('line')}: "
                      f"{err.get('key')}: {err.get('message')}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"ferrymail reload: the daemon answered {exc}", file=sys.stderr)
        return EXIT_FAIL
    except (AdminUnavailable, OSError) as exc:
        why = str(exc)
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
    print(f"sent SIGHUP to ferrymail (pid {pid}); no verdict: {why} (see the daemon's log "
          "for config.reloaded or config.reload_failed)")
    return EXIT_OK


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of workers")
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r}: at most {MAX_WORKERS} workers")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run``, ``config check`` and ``reload`` to the ``ferrymail`` subparsers."""
    p = sub.add_parser("run", help="run the MTA (embedded defaults without options)",
                       description="run the MTA (embedded defaults without options)")
    p.set_defaults(func=cmd_run)
    p.add_argument("--startup", metavar="FILE", help="startup configuration (YAML)")
    p.add_argument("--running", metavar="FILE", help="running configuration (YAML)")
    p.add_argument("--workers", metavar="N", type=_positive,
                   help="worker processes (default: environment.workers, else the number of CPUs)")

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    p = cfg_sub.add_parser("check", help="validate configuration files",
                           description="validate configuration files")
    p.set_defaults(func=cmd_config_check)
    p.add_argument("files", nargs="+", metavar="FILE")

    p = sub.add_parser("reload", help="make the running instance re-read its running config",
                       description="make the running instance re-read its running config")
    p.set_defaults(func=cmd_reload)
    p.add_argument("--startup", metavar="FILE",
                   help="startup configuration (for the admin socket and pidfile)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the daemon's verdict")
