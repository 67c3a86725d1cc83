"""aiosmtpd + uvloop as a benchmark peer: discard each message, or append it to a file and fsync.

    python bench/aiosmtpd_server.py --mode discard|fsync --port P [--host H] [--file PATH]

Runs in the foreground until SIGTERM or SIGINT. In fsync mode each message (envelope line plus
content) is appended to one file with a single O_APPEND write and fsynced before "250 OK"; the
write and fsync run in the default thread pool so the event loop keeps serving other sessions
meanwhile, the way one would write a durable handler for aiosmtpd.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session


class DiscardHandler:
    """Accepts every message and keeps nothing."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


class FsyncHandler:
    """Appends each message to `path` and fsyncs it before accepting."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _append(self, record: bytes) -> None:
        os.write(self.fd, record)
        os.fsync(self.fd)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        head = f"From {envelope.mail_from} to {','.join(envelope.rcpt_tos)} {len(content)}\n"
        await asyncio.get_running_loop().run_in_executor(
            None, self._append, head.encode() + content + b"\n"
        )
        return "250 OK"


async def serve(mode: str, host: str, port: int, path: str | None) -> None:
    handler: Any = DiscardHandler() if mode == "discard" else FsyncHandler(path or "")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench", ident="aiosmtpd-bench"),
        host, port, backlog=1024,
    )
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["discard", "fsync"], required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--file", help="append target in fsync mode")
    args = p.parse_args(argv)
    if args.mode == "fsync" and not args.file:
        p.error("--mode fsync needs --file")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    uvloop.run(serve(args.mode, args.host, args.port, args.file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
