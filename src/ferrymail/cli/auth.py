"""``ferrymail auth …``: SMTP AUTH credentials.

``ferrymail auth hash USER`` reads a password (from the terminal without echo, else one line
of standard input) and prints the ``USER:HASH`` line for ``servers[].auth.users`` (argon2id,
argon2-cffi's defaults).
"""

from __future__ import annotations

import argparse
import getpass
import sys

from ferrymail.cli.common import EXIT_FAIL, EXIT_OK


def cmd_hash(args: argparse.Namespace) -> int:
    from ferrymail.auth import hash_password

    user = args.user
    if not user or ":" in user or user != user.strip() or not user.isprintable():
        print("ferrymail auth hash: the user name may not be empty or contain ':', spaces "
              "around it or control characters", file=sys.stderr)
        return EXIT_FAIL
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {user}: ")
        if getpass.getpass("again: ") != password:
            print("ferrymail auth hash: the passwords differ", file=sys.stderr)
            return EXIT_FAIL
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("ferrymail auth hash: empty password", file=sys.stderr)
        return EXIT_FAIL
    print(f"{user}:{hash_password(password)}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``auth hash`` to the ``ferrymail`` subparsers."""
    a = sub.add_parser("auth", help="SMTP AUTH credentials")
    a_sub = a.add_subparsers(dest="auth_command", metavar="SUBCOMMAND", required=True)
    p = a_sub.add_parser("hash", help="print a user:hash line for servers[].auth.users",
                         description="read a password and print USER:ARGON2ID-HASH")
    p.set_defaults(func=cmd_hash)
    p.add_argument("user", metavar="USER")
