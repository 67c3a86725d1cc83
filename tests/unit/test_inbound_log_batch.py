"""The ``smtp.transaction`` lines of stores that end together go out in one log write, each
before its connection's 250 (log batching as ``ferrymail run`` turns it on)."""

from __future__ import annotations

import asyncio

from ferrymail.observe import log
from ferrymail.smtp.server import InboundConnection, ListenerInfo, SMTPServer
from tests.unit.test_inbound_connection_fuzz import _CONFIG, Spool, Transport

DIALOGUE = [b"EHLO client.example\r\n", b"MAIL FROM:<a@example.org>\r\n",
            b"RCPT TO:<b@example.com>\r\n", b"DATA\r\n"]
BODY = b"Subject: t\r\n\r\nhello\r\n.\r\n"


class Recording:
    """A log stream that keeps each write with the replies on the wire at that moment."""

    def __init__(self, transports: list[Transport]) -> None:
        self.transports = transports
        self.writes: list[tuple[str, list[bytes]]] = []

    def write(self, text: str) -> int:
        self.writes.append((text, [bytes(t.out) for t in self.transports]))
        return len(text)

    def flush(self) -> None:
        pass


async def _two_connections_storing_together() -> tuple[Recording, list[Transport], Spool]:
    spool = Spool()
    server = SMTPServer(_CONFIG[0], hostname="mx.example.com", spool=spool,  # type: ignore[arg-type]
                        running=lambda: _CONFIG[1])
    conns = [InboundConnection(server, ListenerInfo("127.0.0.1:2525", False)) for _ in range(2)]
    transports = [Transport(), Transport()]
    rec = Recording(transports)
    log.configure("info", rec)  # type: ignore[arg-type]
    log.batch_per_iteration(True)
    try:
        for conn, transport in zip(conns, transports, strict=True):
            conn.connection_made(transport)  # type: ignore[arg-type]
            for line in DIALOGUE:
                conn.data_received(line)
        for _ in range(3):
            await asyncio.sleep(0)
        assert all(b"\r\n354 " in t.out for t in transports)
        rec.writes.clear()
        for conn in conns:  # both messages end in one loop callback, as after a group commit
            conn.data_received(BODY)
        for _ in range(6):
            await asyncio.sleep(0)
    finally:
        log.batch_per_iteration(False)
        log.configure("info", None)
        for conn in conns:
            conn.connection_lost(None)
    return rec, transports, spool


def test_lines_of_stores_ending_together_share_one_write_before_the_replies():
    rec, transports, spool = asyncio.run(_two_connections_storing_together())
    assert len(spool.stored) == 2
    lines = [(text, wire) for text, wire in rec.writes if "event=smtp.transaction" in text]
    assert len(lines) == 1, rec.writes  # one write carries both lines
    text, wire_then = lines[0]
    assert text.count("event=smtp.transaction") == 2
    for qid in spool.stored:
        assert f"qid={qid}" in text
    # neither 250 had left when the lines were written; both have now
    assert not any(b"queued as" in out for out in wire_then)
    for qid, transport in zip(spool.stored, transports, strict=True):
        assert f"250 2.0.0 OK queued as {qid}\r\n".encode() in transport.out
