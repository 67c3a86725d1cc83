"""The whole inbound connection (PROXY header, then the SMTP session, the store and the
Received: field) fed arbitrary bytes in arbitrary splits, on an in-memory transport: no
exception escapes, nothing is logged at error level, and every stored message's "250" is
written (issue 7 item 1, at the level of `InboundConnection`)."""

from __future__ import annotations

import asyncio
import io
import itertools
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ferrymail.config import parse_running, parse_startup
from ferrymail.observe import log
from ferrymail.proxy import encode_v1, encode_v2, encode_v2_local
from ferrymail.smtp.server import InboundConnection, ListenerInfo, SMTPServer
from tests.unit.test_inbound_hardening import _stream

STARTUP = """\
environment: {hostname: mx.example.com}
servers:
  - id: in
    listeners: [{port: 2525, proxyprotocol: true}]
    limits: {message_size: 300, recipients: 3, errors: 30}
    policy: {helo: accept}
"""
RUNNING = """\
servers: [{id: in, transport: mx, domains: [example.com], relay_networks: [192.0.2.0/24]}]
transportgroups: [{id: g, transports: [{id: mx}]}]
"""
_CONFIG = (parse_startup(STARTUP).servers[0], parse_running(RUNNING))
DST = ("127.0.0.1", 2525)


class Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Spool:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.stored: list[str] = []

    def new_queue_id(self) -> str:
        return f"{next(self._ids):016x}"

    async def store(self, envelope, data: bytes, queue_id: str | None = None) -> str:
        assert queue_id is not None and envelope.recipients
        assert data.count(b"\r\n\tby mx.example.com (ferrymail)") == 1
        self.stored.append(queue_id)
        return queue_id


_HEADERS = st.sampled_from([encode_v1(("192.0.2.1", 4000), DST),
                            encode_v2(("203.0.113.9", 1), DST), encode_v2_local(),
                            b"PROXY UNKNOWN\r\n",
                            encode_v2(("192.0.2.9", 53), DST, protocol="DGRAM"), b""])
_PREFIX = st.one_of(_HEADERS, _HEADERS, _HEADERS, st.binary(max_size=20))  # mostly valid


async def _drive(prefix: bytes, chunks: list[bytes]) -> tuple[Transport, Spool, list]:
    loop = asyncio.get_running_loop()
    errors: list = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    spool = Spool()
    server = SMTPServer(_CONFIG[0], hostname="mx.example.com", spool=spool,  # type: ignore[arg-type]
                        running=lambda: _CONFIG[1])
    conn = InboundConnection(server, ListenerInfo("127.0.0.1:2525", True))
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    for chunk in ([prefix] if prefix else []) + chunks:
        if transport.closing:
            break
        conn.data_received(chunk)
        for _ in range(3):
            await asyncio.sleep(0)  # let a store finish and its replies go out
    for _ in range(5):
        await asyncio.sleep(0)
    conn.connection_lost(None)
    if conn.timer is not None:
        conn.timer.cancel()
    assert server.limiter.total == 0 and server.limiter.per_client == {}
    return transport, spool, errors


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=_PREFIX, chunks=_stream())
def test_arbitrary_bytes_through_a_proxied_connection(prefix, chunks):
    buf = io.StringIO()
    log.configure("info", buf)
    try:
        transport, spool, errors = asyncio.run(_drive(prefix, chunks))
    finally:
        log.configure("info", None)
    event(f"stored {min(len(spool.stored), 1)}+")
    assert errors == []
    assert " level=error " not in buf.getvalue(), buf.getvalue()
    for qid in spool.stored:
        assert f"queued as {qid}\r\n".encode() in transport.out
