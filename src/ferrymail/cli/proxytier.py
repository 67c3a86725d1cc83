"""``ferrymail haproxy-config``, ``ferrymail keepalived-config`` and ``ferrymail proxy status``.

The generators read the same ``--startup``/``--running`` files as ``run`` and write to stdout
or ``-o FILE``. ``proxy status`` lists every proxy and (proxy, source) pair of the running
config with its health; the health comes from the cluster's Redis store (``cluster.redis``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from ferrymail.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, print_config_error
from ferrymail.config import ConfigError, cross_check, load_running, load_startup


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    startup = load_startup(args.startup)
    running = load_running(args.running)
    cross_check(startup, running, args.running or "<embedded running.yaml>")
    return startup, running


def _emit(text: str, output: str | None) -> None:
    if output is None or output == "-":
        sys.stdout.write(text)
    else:
        Path(output).write_text(text)


def _write_config(prog: str, args: argparse.Namespace, make) -> int:  # type: ignore[no-untyped-def]
    """Load the configs, ``make(startup, running)`` the text, write it (``-o`` or stdout):
    exit 2 with ``FILE:LINE: KEYPATH`` lines for a bad config, 1 for what ``make`` refuses."""
    try:
        startup, running = _load(args)
        text = make(startup, running)
    except ConfigError as exc:
        print_config_error(exc)
        return EXIT_CONFIG
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    _emit(text, args.output)
    return EXIT_OK


def cmd_haproxy_config(args: argparse.Namespace) -> int:
    from ferrymail.proxytier.haproxy import haproxy_config

    return _write_config("ferrymail haproxy-config", args, lambda startup, running: (
        haproxy_config(startup, running, proxy=args.proxy, instances=args.instance,
                       allowed=args.allow, inbound_bind=args.inbound_bind,
                       timeout_connect=args.timeout_connect, retries=args.retries,
                       pidfile=args.pidfile)))


def cmd_keepalived_config(args: argparse.Namespace) -> int:
    from ferrymail.proxytier.keepalived import keepalived_config

    return _write_config("ferrymail keepalived-config", args, lambda _startup, running: (
        keepalived_config(running, proxy=args.proxy, interface=args.interface,
                          router_id=args.router_id, priority=args.priority,
                          unicast_src=args.unicast_src, unicast_peers=args.unicast_peer,
                          check=args.check, name=args.name,
                          vip_interface=args.vip_interface)))


def cmd_proxy_status(args: argparse.Namespace) -> int:
    from ferrymail.delivery.health import HealthEntry, RedisHealthStore
    from ferrymail.proxytier.status import status_rows, status_table

    try:
        startup, running = _load(args)
    except ConfigError as exc:
        print_config_error(exc)
        return EXIT_CONFIG
    if startup.cluster is None:  # health lives in the daemon: ask it (every worker)
        from ferrymail.admin.client import AdminClient, AdminError, AdminUnavailable, other_workers

        try:
            client = AdminClient.for_startup(startup)
            if client is None:
                raise AdminUnavailable("the admin API is switched off (admin.socket: false)")
            found: dict[tuple[str, str | None], HealthEntry] = {}
            for worker in [client, *other_workers(startup)]:
                for d in worker.get("/v1/proxies")["entries"]:
                    e = HealthEntry(**d)
                    if e.key not in found or e.state != "up":  # a worker that saw it fail
                        found[e.key] = e
        except (AdminUnavailable, AdminError, OSError) as exc:
            print(f"ferrymail proxy status: {exc} (without cluster.redis the proxy health "
                  "lives in the running daemon)", file=sys.stderr)
            return EXIT_FAIL
        now = time.time()
        sys.stdout.write(status_table(status_rows(running, found.values(), now), now))
        return EXIT_OK
    c = startup.cluster

    async def read() -> list[HealthEntry]:
        store = RedisHealthStore(c.redis, prefix=f"{c.prefix}:proxyhealth:", timeout=c.timeout)
        try:
            return await store.entries()
        finally:
            await store.close()

    now = time.time()
    sys.stdout.write(status_table(status_rows(running, asyncio.run(read()), now), now))
    return EXIT_OK


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--startup", metavar="FILE", help="startup configuration (YAML)")
    p.add_argument("--running", metavar="FILE", help="running configuration (YAML)")
    p.add_argument("--proxy", metavar="HOST:PORT",
                   help="the proxy to write for (needed when the config has several)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``haproxy-config``, ``keepalived-config`` and ``proxy status``."""
    p = sub.add_parser("haproxy-config", help="write the proxy tier's haproxy.cfg",
                       description="write haproxy.cfg for one proxy host from the config")
    _common(p)
    p.add_argument("--instance", action="append", default=[], metavar="HOST",
                   help="a ferrymail host inbound mail goes to (repeat for each)")
    p.add_argument("--allow", action="append", default=[], metavar="NETWORK",
                   help="network whose MTAs may use the outbound listener (repeatable)")
    p.add_argument("--inbound-bind", default="0.0.0.0", metavar="HOST",
                   help="address the inbound frontends bind (default 0.0.0.0)")
    p.add_argument("--timeout-connect", default="10s", metavar="TIME")
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--pidfile", metavar="FILE", help="HAProxy's pidfile (global section)")
    p.set_defaults(func=cmd_haproxy_config)

    p = sub.add_parser("keepalived-config", help="write keepalived.conf for an "
                       "active/passive proxy pair",
                       description="write keepalived.conf for one node of a proxy pair")
    _common(p)
    p.add_argument("--interface", default="eth0", help="the interface VRRP talks on")
    p.add_argument("--vip-interface", metavar="IF",
                   help="the interface the virtual addresses go on (default: --interface)")
    p.add_argument("--router-id", type=int, default=51)
    p.add_argument("--priority", type=int, default=100)
    p.add_argument("--unicast-src", metavar="IP")
    p.add_argument("--unicast-peer", action="append", default=[], metavar="IP",
                   help="VRRP unicast peer (repeatable); without it VRRP uses multicast")
    p.add_argument("--check", default="/usr/bin/pgrep -x haproxy", metavar="COMMAND",
                   help="vrrp_script command: exit 0 while HAProxy is fine")
    p.add_argument("--name", default="ferrymail_proxy", help="vrrp_instance name")
    p.set_defaults(func=cmd_keepalived_config)

    p = sub.add_parser("proxy", help="proxy tier tools")
    proxy_sub = p.add_subparsers(dest="proxy_command", metavar="SUBCOMMAND", required=True)
    p = proxy_sub.add_parser("status", help="health of every proxy and (proxy, source)",
                             description="health of every proxy and (proxy, source) pair")
    p.add_argument("--startup", metavar="FILE", help="startup configuration (YAML)")
    p.add_argument("--running", metavar="FILE", help="running configuration (YAML)")
    p.set_defaults(func=cmd_proxy_status)
