"""``ferrymail queue …``: list, show, summary, retry, hold, release, delete, bounce.

Every subcommand goes through the daemon's admin API when it runs, so changes are applied by
the daemon and never race a delivery in progress. ``list``, ``show`` and ``summary`` fall back
to reading the spool (read-only, beside nothing or a stopped daemon) when no daemon answers;
the changing ones then refuse. Filters (all must match; actions apply to whole messages):
``--id`` (repeatable), ``--from`` and ``--to`` (address or domain), ``--transport``,
``--state queued|deferred|held|in-flight``, ``--older-than DURATION``, ``--last-error REGEX``.

Each worker has ``--timeout`` seconds to answer (READ_TIMEOUT for the read-only commands, a
stopped or wedged worker must not keep an operator waiting; DEFAULT_TIMEOUT for the changing
ones, which may touch many messages). A read-only command that falls back to the spool says
on stderr which worker did not answer within how long.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from ferrymail.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, print_config_error
from ferrymail.config import ConfigError, StartupConfig, load_startup

READ_ONLY = ("list", "show", "summary")
READ_TIMEOUT = 5.0  # seconds each worker has to answer list/show/summary before the spool
ACTIONS = ("retry", "hold", "release", "delete", "bounce")
STATES = ("queued", "deferred", "held", "in-flight")


def _age(seconds: float) -> str:
    """``42s``, ``7m``, ``3h``, ``2d``."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cluster_line(spool_dir: Path) -> str:
    """``cluster: shared, 3 instances (mta1)`` or ``cluster: redis unreachable: split 1/3
    since … (error)`` from the running instance's status file; "" without one.

    The file is rewritten on every change of state, not periodically, so its age says
    nothing; the process that wrote it (``pid``) must still run. A file left by a killed
    instance is marked: ``cluster: stale: pid 123 that wrote this is gone (written 5m
    ago): shared, …``."""
    import json

    from ferrymail.orchestrator.limiter import STATUS_FILE, iso

    path = spool_dir / STATUS_FILE
    try:
        st = json.loads(path.read_text())
        written = path.stat().st_mtime
    except (OSError, ValueError):
        return ""
    pid = st.get("pid")
    stale = ""
    if isinstance(pid, int) and pid > 0 and writer_gone(pid, written):
        stale = (f"stale: pid {pid} that wrote this is gone "
                 f"(written {_age(time.time() - written)} ago): ")
    since = iso(float(st.get("since", 0)))
    if st.get("state") == "fallback":
        mode = st.get("fallback")
        share = f" 1/{st.get('instances')}" if mode == "split" else ""
        return (f"cluster: {stale}redis unreachable: {mode}{share} since {since} "
                f"({st.get('error') or 'no answer'}); instance {st.get('instance')}")
    return (f"cluster: {stale}{st.get('state')}, {st.get('instances')} live instance(s), "
            f"instance {st.get('instance')}, since {since}")


def writer_gone(pid: int, written: float) -> bool:
    """Whether the process ``pid`` that wrote a file at ``written`` (Unix time) no longer
    runs: no such process, a zombie (killed, not yet reaped), or a process that started
    after the file was written (the pid was reused, e.g. after a reboot: the spool keeps the
    file). A process of another user counts as running."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    try:  # the fields after "(comm)", which may itself hold spaces: state, ..., starttime
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        btime = next(float(line.split()[1]) for line in Path("/proc/stat").read_text()
                     .splitlines() if line.startswith("btime "))
        started = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return False
    # btime is whole seconds: a margin so that a writer started just before is not taken
    return fields[0] == "Z" or started > written + 2


def host_limiter_lines(spool_dir: Path) -> list[str]:
    """``limiter: host-wide (limiter service), 2/2 worker(s) sharing``, or a line per worker
    that splits the limits because the service is unreachable, from each worker's status
    file (`ferrymail.orchestrator.host`); [] without workers."""
    import json

    from ferrymail.orchestrator.host import STATUS_FILE
    from ferrymail.orchestrator.limiter import iso
    from ferrymail.supervisor import shard_paths

    states = []
    for shard in shard_paths(spool_dir):
        try:
            states.append(json.loads((shard / STATUS_FILE).read_text()))
        except (OSError, ValueError):
            continue
    if not states:
        return []
    # the running count is worker 0's; a file of another count is a killed run's leftover
    states = [st for st in states if st.get("workers") == states[0].get("workers")]
    out = [f"limiter: service unreachable: worker {st.get('worker')} splits the limits "
           f"1/{st.get('workers')} since {iso(float(st.get('since', 0)))} "
           f"({st.get('error') or 'no answer'})"
           for st in states if st.get("state") == "fallback"]
    shared = sum(st.get("state") == "shared" for st in states)
    if shared:
        out.insert(0, f"limiter: host-wide (limiter service), {shared}/"
                      f"{states[0].get('workers')} worker(s) sharing")
    return out


def _seconds(text: str) -> float:
    """A ``--timeout``: a finite number of seconds above 0 (argparse names the option)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def _filter(args: argparse.Namespace) -> Any:
    from ferrymail.admin.queue import QueueFilter
    from ferrymail.config import parse_duration

    older = None if args.older_than is None else parse_duration(args.older_than)
    return QueueFilter(ids=tuple(args.id or ()), sender=args.sender, recipient=args.to,
                       transport=args.transport, state=args.state, older_than=older,
                       last_error=args.last_error)


def _spool_fallback(startup: StartupConfig, what: str, args: argparse.Namespace,
                    flt: Any, paths: list[Path] | None = None) -> Any:
    """Answer a read-only command from the spool itself (no daemon runs)."""
    from ferrymail.admin.queue import collect_views, message_content, message_view, summarize
    from ferrymail.spool import SqliteSpool
    from ferrymail.supervisor import shard_paths

    if not Path(startup.spool.path).exists():
        raise FileNotFoundError(f"no spool at {startup.spool.path}")

    async def one(path: Path) -> Any:
        spool = SqliteSpool(path, readonly=True)  # works beside a running daemon
        await spool.start()
        try:
            now = time.time()
            if what == "show":
                msg = await spool.get(args.queue_id)
                if msg is None:
                    return None
                view = message_view(msg, now=now)
                view.update(message_content(await spool.read(args.queue_id), args.body))
                return view
            return await collect_views(spool, flt, now=now, limit=args.limit)
        finally:
            await spool.close()

    async def run() -> Any:
        # every worker's shard (supervisor.py); ids are time-ordered across shards
        views: list[dict[str, Any]] = []
        for path in paths if paths is not None else shard_paths(startup.spool.path):
            if not (path / "spool.db").exists():
                continue
            found = await one(path)
            if what == "show":
                if found is not None:
                    return found
                continue
            views += found
        if what == "show":
            return None
        views.sort(key=lambda v: v["id"])
        views = views[:args.limit]
        if what == "summary":
            return {"queues": summarize(views, now=time.time()), "hold": None}
        return {"messages": views}

    return asyncio.run(run())


def cmd_queue(args: argparse.Namespace) -> int:
    from ferrymail.admin.client import AdminClient, AdminError, AdminUnavailable, other_workers
    from ferrymail.spool import SpoolError

    what = args.queue_command
    prog = f"ferrymail queue {what}"
    try:
        startup = load_startup(args.startup)
    except ConfigError as exc:
        print_config_error(exc)
        return EXIT_CONFIG
    try:
        flt = _filter(args) if what != "show" else None
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if what in ACTIONS and flt.empty and not args.all:
        print(f"{prog}: give a filter (e.g. --id, --to, --state) or --all", file=sys.stderr)
        return EXIT_FAIL
    from ferrymail.admin.client import DEFAULT_TIMEOUT

    timeout = args.timeout if args.timeout is not None else (
        READ_TIMEOUT if what in READ_ONLY else DEFAULT_TIMEOUT)
    try:
        client = AdminClient.for_startup(startup, timeout=timeout)
    except OSError as exc:
        print(f"{prog}: cannot read the admin token: {exc}", file=sys.stderr)
        return EXIT_FAIL
    source = "daemon"
    try:
        if client is None:
            raise AdminUnavailable("the admin API is switched off (admin.socket: false)")
        clients = [client, *other_workers(startup, timeout=timeout)]
        try:
            result = _ask_workers(clients, what, args, flt)
        except AdminError as exc:
            # a message in a shard no worker serves is listed (below), so it can be shown
            if what != "show" or exc.status != 404:
                raise
            extra = _unserved_shards(startup, len(clients))
            result = _spool_fallback(startup, what, args, flt, paths=extra) if extra else None
            if result is None:
                raise
        if what in ("list", "summary"):
            result = _with_unserved_shards(startup, result, len(clients), what, args, flt)
    except AdminError as exc:
        if what == "show" and exc.status == 404:
            print(f"{prog}: no message {args.queue_id} in the queue", file=sys.stderr)
        else:
            print(f"{prog}: the daemon refused: {exc.message}", file=sys.stderr)
        return EXIT_FAIL
    except AdminUnavailable as exc:
        if what not in READ_ONLY:
            print(f"{prog}: {exc}; changes are made by the running daemon: start it "
                  "(`ferrymail run`) and try again", file=sys.stderr)
            return EXIT_FAIL
        source = "spool"
        print(f"{prog}: {exc}; what follows was read from the spool (every shard)",
              file=sys.stderr)
        try:
            result = _spool_fallback(startup, what, args, flt)
        except (OSError, SpoolError) as err:
            print(f"{prog}: {err}", file=sys.stderr)
            return EXIT_FAIL
        if result is None:
            print(f"{prog}: no message {args.queue_id} in the queue", file=sys.stderr)
            return EXIT_FAIL
    if args.json:
        if isinstance(result, dict):
            result = {**result, "source": source}
        print(json.dumps(result, indent=1))
        return EXIT_OK
    _print(what, result, args, source, Path(startup.spool.path))
    return EXIT_OK


def _with_unserved_shards(startup: StartupConfig, result: dict[str, Any], served: int,
                          what: str, args: argparse.Namespace, flt: Any) -> dict[str, Any]:
    """Add what lies in shards no running worker serves (left by a larger ``--workers``),
    read from the spool, so ``list`` and ``summary`` never hide a queued message."""
    extra = _unserved_shards(startup, served)
    if not extra:
        return result
    found: list[dict[str, Any]] = []
    unserved = []  # said beside the list: no worker retries these, whatever "retry at" says
    for path in extra:
        mine = _spool_fallback(startup, "list", args, flt, paths=[path])["messages"]
        found += mine
        if mine:
            unserved.append({"shard": str(path), "messages": len(mine),
                             "workers_needed": int(path.name.rsplit("-", 1)[1]) + 1})
    result = {**result, "unserved": unserved}
    if what == "list":
        msgs = sorted([*result["messages"], *found], key=lambda m: m["id"])
        return {**result, "messages": msgs[:args.limit]}
    from ferrymail.admin.queue import merge_summaries, summarize

    return {**result, "queues": merge_summaries(result["queues"],
                                                summarize(found, now=time.time()))}


def _unserved_shards(startup: StartupConfig, served: int) -> list[Path]:
    """Shard directories numbered ``served`` or above: no running worker holds them."""
    from ferrymail.supervisor import shard_paths

    root = Path(startup.spool.path)
    return [p for p in shard_paths(root)
            if p != root and int(p.name.rsplit("-", 1)[1]) >= served]


def _print_unserved(result: dict[str, Any]) -> None:
    for u in result.get("unserved", ()):
        print(f"{u['messages']} message(s) in {u['shard']}: no running worker serves this "
              f"shard; they wait until ferrymail runs with at least {u['workers_needed']} "
              "workers")


def _ask_workers(clients: list[Any], what: str, args: argparse.Namespace, flt: Any) -> Any:
    """One command to every worker (each holds its own spool shard), answers combined:
    ``show`` from the worker that has the message, lists concatenated in id order, action
    counts added up. Raises the first worker's AdminUnavailable (naming the worker when
    there are several) / AdminError."""
    from ferrymail.admin.client import AdminError, AdminUnavailable

    def ask(k: int, method: str, path: str, query: Any = None, body: Any = None) -> Any:
        try:
            if method == "GET":
                return clients[k].get(path, query)
            return clients[k].post(path, body)
        except AdminUnavailable as exc:
            if len(clients) == 1:
                raise
            raise AdminUnavailable(f"worker {k}: {exc}") from None

    if what == "show":
        for k in range(len(clients)):
            try:
                return ask(k, "GET", f"/v1/queue/{args.queue_id}",
                           [("body", "1")] if args.body else None)
            except AdminError as exc:
                if exc.status != 404 or k == len(clients) - 1:
                    raise
    answers: list[dict[str, Any]] = []
    for k in range(len(clients)):
        if what == "list":
            answers.append(ask(k, "GET", "/v1/queue",
                               [*flt.to_query(), ("limit", str(args.limit))]))
        elif what == "summary":
            answers.append(ask(k, "GET", "/v1/queue/summary", flt.to_query()))
        else:
            body: dict[str, Any] = {"filter": dict(_grouped(flt.to_query()))}
            if args.all:
                body["all"] = True
            if what == "bounce":
                body["reason"] = args.reason
            answers.append(ask(k, "POST", f"/v1/queue/{what}", body=body))
    if len(answers) == 1:
        return answers[0]
    if what == "list":
        msgs = sorted((m for a in answers for m in a["messages"]), key=lambda m: m["id"])
        return {**answers[0], "messages": msgs[:args.limit]}
    if what == "summary":  # host totals: one row per transport x domain x source
        from ferrymail.admin.queue import merge_summaries

        return {**answers[0], "queues": merge_summaries(*(a["queues"] for a in answers))}
    total = dict(answers[0])
    for a in answers[1:]:
        for key, value in a.items():
            if isinstance(value, int) and not isinstance(value, bool):
                total[key] = int(total.get(key, 0)) + value
    return total


def _grouped(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return out


def _print(what: str, result: dict[str, Any], args: argparse.Namespace, source: str,
           spool_dir: Path) -> None:
    if what == "list":
        from ferrymail.delivery.scheduler import destination_lines

        msgs = result["messages"]
        cluster = cluster_line(spool_dir)
        if cluster:
            print(cluster)
        # the workers' files; from the spool (no daemon) they are a killed run's leftovers
        for line in host_limiter_lines(spool_dir) if source == "daemon" else ():
            print(line)
        for m in msgs:
            print(f"{m['id']}  {_age(m['age_s']):>4}  <{m['sender']}>  "
                  f"client={m['client_ip']}  size={m['size']}  server={m['server']}  "
                  f"{m['state']}")
            for r in m["recipients"]:
                extra = f"  attempts={r['attempts']}" if r["attempts"] else ""
                reply = f'  last="{r["last_reply"]}"' if r["last_reply"] else ""
                print(f"    <{r['address']}>  {r['state']}{extra}{reply}")
        from ferrymail.supervisor import shard_paths

        shards = shard_paths(spool_dir)
        for shard in shards:  # written by each worker's scheduler
            lines = destination_lines(shard, time.time())
            if lines and len(shards) > 1:
                lines[0] = f"{lines[0]} [{shard}]"
            for line in lines:
                print(line)
        print(f"{len(msgs)} message(s)" + (" (limit reached)" if len(msgs) >= args.limit
                                           else ""))
        _print_unserved(result)
    elif what == "show":
        m = result
        print(f"queue id:  {m['id']}  ({m['state']})")
        print(f"received:  {m['received_at']}  ({_age(m['age_s'])} ago) from "
              f"{m['client_ip']} helo={m['helo']} server={m['server']} tls={m['tls'] or 'no'}")
        print(f"sender:    <{m['sender']}>  size={m['size']}")
        for r in m["recipients"]:
            when = f"  next={r['next_attempt']}" if r["next_attempt"] else ""
            print(f"recipient: <{r['address']}>  {r['state']}  transport={r['transport']}  "
                  f"attempts={r['attempts']}{when}")
            if r["last_reply"]:
                print(f"           last reply: {r['last_reply']}")
        if m.get("pending_actions"):
            print(f"pending:   {', '.join(m['pending_actions'])} (when the attempt ends)")
        print("headers:")
        for h in m["headers"]:
            print(f"  {h}")
        if "message" in m:
            print("message:")
            sys.stdout.write(m["message"])
    elif what == "summary":
        rows = result["queues"]
        print(f"{'TRANSPORT':<14} {'DOMAIN':<24} {'SOURCE':<14} {'MSGS':>5} {'RCPTS':>5} "
              f"{'OLDEST':>6}  WHY / LAST ERROR")
        for g in rows:
            print(f"{g['transport']:<14} {g['domain']:<24} {g['source']:<14} "
                  f"{g['messages']:>5} {g['recipients']:>5} {_age(g['oldest_s']):>6}  "
                  f"{'; '.join(g['why']) or '-'}")
            if g["last_error"]:
                print(f"{'':>73}last: {g['last_error']}")
        if result.get("hold"):
            print("queues.hold is on: no delivery starts")
        _print_unserved(result)
        if source == "spool":
            print("(read from the spool: the daemon did not answer; wait reasons need it)")
    else:
        verb = {"retry": "made due now", "hold": "held", "release": "released",
                "delete": "deleted", "bounce": "bounced"}[what]
        print(f"{result['changed']} message(s) {verb}; {result['matched']} matched; "
              f"{result['in_flight']} in flight ({what} applies when the attempt ends); "
              f"{result['gone']} gone meanwhile")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``queue list|show|summary|retry|hold|release|delete|bounce``."""
    q = sub.add_parser("queue", help="inspect and control the queue",
                       description="inspect and control the queue (through the daemon)")
    q_sub = q.add_subparsers(dest="queue_command", metavar="SUBCOMMAND", required=True)
    helps = {
        "list": "list messages with their recipients' states",
        "show": "one message: envelope, recipients, attempts, last reply, headers",
        "summary": "per transport x domain x source: counts, oldest, why it waits",
        "retry": "make deferred mail due now (postqueue -f / -s)",
        "hold": "keep messages from delivery until released",
        "release": "release held messages (due now)",
        "delete": "remove messages without notice",
        "bounce": "fail messages with a DSN to the sender (RFC 3464)",
    }
    for name, text in helps.items():
        p = q_sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=cmd_queue)
        p.add_argument("--startup", metavar="FILE", help="startup configuration (spool, socket)")
        p.add_argument("--json", action="store_true", help="print the JSON answer")
        p.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                       help="how long each worker may take to answer (default "
                            + (f"{READ_TIMEOUT:g} s, then the spool is read)" if name in READ_ONLY
                               else "30 s)"))
        if name == "show":
            p.add_argument("queue_id", metavar="ID")
            p.add_argument("--body", action="store_true", help="print the whole message")
            continue
        p.add_argument("--id", action="append", metavar="ID", help="this queue id (repeatable)")
        p.add_argument("--from", dest="sender", metavar="ADDR|DOMAIN", help="sender")
        p.add_argument("--to", metavar="ADDR|DOMAIN", help="a pending recipient")
        p.add_argument("--transport", metavar="ID", help="a pending recipient's transport")
        p.add_argument("--state", choices=STATES, help="a pending recipient's state")
        p.add_argument("--older-than", metavar="DURATION", help="received longer ago (1h, 2d)")
        p.add_argument("--last-error", metavar="REGEX", help="a pending recipient's last reply")
        if name in ACTIONS:
            p.add_argument("--all", action="store_true", help="every message (no filter)")
        else:
            p.add_argument("--limit", type=int, default=1000, help="show at most this many")
        if name == "bounce":
            p.add_argument("--reason", default="bounced by the administrator",
                           help="text for the DSN's diagnostic")
