"""CPU per message of ferrymail's inbound Python code, without sockets or disk (a yardstick).

    .venv/bin/python bench/session_micro.py [--messages 20000] [--repeat 7] [--size 2048]
        [--only session,connection] [--profile N]

Replays the byte stream smtp-source sends (`-d -l SIZE -f a@bench.test -t b@example.com`:
HELO once, then per message MAIL, RCPT, DATA and the body with its terminator, each in its
own read as the client does not pipeline) and reports microseconds of process CPU per message
(the minimum over the repeats, so other load on the machine hardly matters):

* `session` — the sans-IO `ServerSession` alone: `receive`, `take_output`, `finish_delivery`;
* `connection` — `InboundConnection` on a uvloop loop, as `ferrymail run` builds it: per
  read `data_received`, the reply written to an in-memory transport, the delivery task with
  the Received: header, the envelope and the logfmt line (to /dev/null: one write per line,
  as to a log file). The spool is an in-memory stand-in that answers at once, so SQLite, the
  writer thread and the kernel's socket work are left out: they are measured under real load
  by `profile_inbound.py`.

`--profile N` runs cProfile over N messages of each variant and prints the top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # bench/ is not a package: found via sys.path
import uvloop

from ferrymail.config.loader import parse_running, parse_startup
from ferrymail.observe import log
from ferrymail.smtp.server import InboundConnection, ListenerInfo, SMTPServer
from ferrymail.smtp.session import Deliver, ServerSession, SessionLimits, SessionSettings
from ferrymail.spool import Envelope


def client_reads(size: int) -> tuple[bytes, list[bytes]]:
    """What smtp-source sends: the HELO read, then the four reads of one message."""
    head = (b"From: <a@bench.test>\r\nTo: <b@example.com>\r\n"
            b"Date: Wed, 25 Nov 2026 14:18:25 +0000 (UTC)\r\n"
            b"Message-Id: <1a65.0003.0002@vm>\r\n\r\n")
    lines = []
    n = 0
    while n < size:
        line = (str(len(lines) % 10).encode() + b"X" * 77)[: size - n]
        lines.append(line + b"\r\n")
        n += len(line)
    return b"HELO vm\r\n", [b"MAIL FROM:<a@bench.test>\r\n", b"RCPT TO:<b@example.com>\r\n",
                             b"DATA\r\n", head + b"".join(lines) + b".\r\n"]


# --------------------------------------------------------------------------- session


def run_session(messages: int, helo: bytes, reads: list[bytes]) -> int:
    """Drive one ServerSession through `messages` transactions; returns the bytes replied."""
    settings = SessionSettings("ferrymail.bench", SessionLimits(messages=1 << 62))
    session = ServerSession(settings, lambda domain, ip: True, "127.0.0.1")
    session.receive(helo)
    replied = len(session.take_output())
    reply = b"250 2.0.0 OK queued as 0123456789abcdef\r\n"
    mail, rcpt, data, body = reads
    receive, take = session.receive, session.take_output
    for _ in range(messages):
        receive(mail)
        replied += len(take())
        receive(rcpt)
        replied += len(take())
        receive(data)
        replied += len(take())
        event = receive(body)
        assert type(event) is Deliver
        session.finish_delivery(reply, queued=True)
        replied += len(take())
    return replied


# --------------------------------------------------------------------------- connection


class MemoryTransport:
    """Collects what the connection writes; the transport calls the server makes."""

    def __init__(self) -> None:
        self.writes = 0
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        raise AssertionError("paused: input piled up")

    def resume_reading(self) -> None:
        pass


class InstantSpool:
    """Answers `store` at once with the reserved id (keeps nothing but a count)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.stored = 0

    def new_queue_id(self) -> str:
        return f"{next(self._ids):016x}"

    async def store(self, envelope: Envelope, data: bytes, queue_id: str | None = None) -> str:
        assert queue_id is not None and envelope.recipients
        self.stored += 1
        return queue_id


def make_server(spool: InstantSpool) -> SMTPServer:
    ports = peers.FerrymailPorts(2525, 2526)
    startup = parse_startup(peers.ferrymail_startup_yaml("127.0.0.1", ports, Path("/tmp")))
    running = parse_running(peers.ferrymail_running_yaml("127.0.0.1", 2527))
    return SMTPServer(startup.servers[0], hostname="ferrymail.bench", spool=spool,  # type: ignore[arg-type]
                      running=lambda: running)


async def run_connection(messages: int, helo: bytes, reads: list[bytes]) -> int:
    """Drive one InboundConnection through `messages` transactions; returns the writes."""
    spool = InstantSpool()
    server = make_server(spool)
    conn = InboundConnection(server, ListenerInfo("127.0.0.1:2525", False))
    transport = MemoryTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(helo)
    mail, rcpt, data, body = reads
    received = conn.data_received
    pause = asyncio.sleep
    for _ in range(messages):
        received(mail)
        received(rcpt)
        received(data)
        received(body)
        await pause(0)  # the delivery task stores (at once), logs and replies
    assert spool.stored == messages, (spool.stored, messages)
    assert transport.writes == 2 + 4 * messages, transport.writes
    transport.closing = True
    conn.connection_lost(None)
    return transport.writes


def measure(name: str, messages: int, helo: bytes, reads: list[bytes]) -> float:
    """Process CPU seconds for `messages` messages of variant `name`."""
    t0 = time.process_time()
    if name == "session":
        run_session(messages, helo, reads)
    else:
        uvloop.run(run_connection(messages, helo, reads))
    return time.process_time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--only", default="session,connection")
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    args = ap.parse_args()
    variants = [v for v in args.only.split(",") if v]
    for v in variants:
        if v not in ("session", "connection"):
            ap.error(f"unknown variant {v!r}")
    helo, reads = client_reads(args.size)
    devnull = open(os.devnull, "w")  # noqa: SIM115 (open for the whole run)
    log.configure("info", devnull)
    try:
        for name in variants:
            measure(name, min(2000, args.messages), helo, reads)  # warm up
            runs = [measure(name, args.messages, helo, reads) for _ in range(args.repeat)]
            per = [1e6 * r / args.messages for r in runs]
            print(f"{name:12} {min(per):7.2f} us/msg  (median {sorted(per)[len(per) // 2]:.2f},"
                  f" {args.repeat} x {args.messages} messages of {args.size} B)")
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                measure(name, args.profile, helo, reads)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    finally:
        log.configure("info", None)
        devnull.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
