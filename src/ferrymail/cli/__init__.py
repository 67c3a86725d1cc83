"""The ``ferrymail`` command: one module per command family, each with ``register(sub)``.

``ferrymail run [--startup FILE] [--running FILE] [--workers N]``
                                                     serve (no options: embedded defaults;
                                                     one worker process per CPU)
``ferrymail config check FILE…``                     validate configuration files
``ferrymail reload [--startup FILE]``                 reload; prints the daemon's verdict
``ferrymail queue list|show|summary|retry|hold|release|delete|bounce``  queue control
``ferrymail top [--startup FILE]``                    live view of the running daemon
``ferrymail suspend add|list|remove``                hold deliveries on a key (shaping)
``ferrymail dkim keygen DOMAIN SELECTOR``           a DKIM key file and its DNS record
``ferrymail auth hash USER``                       a user:hash line for AUTH (password on stdin)
``ferrymail send …``                                  one message now, without queuing
``ferrymail haproxy-config|keepalived-config …``      the proxy tier's configs
``ferrymail proxy status``                            proxy and (proxy, source) health
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ferrymail import __version__
from ferrymail.cli import auth, dkim, proxytier, queue, run, suspend, top
from ferrymail.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK

__all__ = ["EXIT_CONFIG", "EXIT_FAIL", "EXIT_OK", "build_parser", "main"]

# Each family registers its subcommands; a new family is one line here.
FAMILIES = [
    run.register,
    queue.register,
    top.register,
    suspend.register,
    dkim.register,
    auth.register,
    proxytier.register,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferrymail", description="A mail transfer agent for proxy tiers.")
    parser.add_argument("--version", action="version", version=f"ferrymail {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in FAMILIES:
        register(sub)
    from ferrymail.send import add_parser as add_send_parser
    add_send_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
