"""In-process harness for outbound tests: a real spool and DeliveryEngine on this event loop,
a tiny authoritative DNS server (dnspython) for MX answers, and log capture.

The engine talks to real peers (smtp-sink, HAProxy, ScriptedSMTP); only the process is the
test's own, so tests can look at the spool, the pool and the engine's state directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from ferrymail.config import RunningConfig, parse_running
from ferrymail.delivery.engine import DeliveryEngine
from ferrymail.observe import log
from ferrymail.spool import Envelope, SqliteSpool

HOSTNAME = "mta.ferrymail.test"
MESSAGE = (b"From: sender@origin.test\r\nTo: rcpt@dest.test\r\nSubject: outbound test\r\n"
           b"Message-ID: <outbound-test@origin.test>\r\n\r\nHello from ferrymail.\r\n")


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 40.0) -> None:
    """Run an async test body with a hard time bound."""

    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await coro_fn()

    asyncio.run(bounded())


class LogCapture:
    """Collects ferrymail's logfmt lines (log.configure(stream=...)) for assertions."""

    def __init__(self) -> None:
        self.buf = io.StringIO()

    def __enter__(self) -> LogCapture:
        log.configure("debug", self.buf)
        return self

    def __exit__(self, *exc: object) -> None:
        log.configure("info", None)

    def lines(self, event: str | None = None) -> list[str]:
        out = self.buf.getvalue().splitlines()
        if event is not None:
            out = [ln for ln in out if f" event={event} " in ln + " "]
        return out

    def text(self) -> str:
        return self.buf.getvalue()

    async def wait(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [ln for ln in self.lines() if rx.search(ln)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {count} line(s) matching {pattern!r}; log:\n"
                                   f"{self.text()}")
            await asyncio.sleep(0.02)


def field_of(line: str, name: str) -> str | None:
    """The value of ``name=`` in a logfmt line (quotes removed)."""
    m = re.search(rf'(?:^| ){re.escape(name)}=("(?:[^"\\]|\\.)*"|\S*)', line)
    if m is None:
        return None
    value = m.group(1)
    return value[1:-1].replace('\\"', '"') if value.startswith('"') else value


@dataclass
class Harness:
    spool: SqliteSpool
    engine: DeliveryEngine
    config: list[RunningConfig] = field(default_factory=list)

    def set_config(self, yaml_text: str) -> None:
        self.config[0] = parse_running(yaml_text)

    async def submit(self, recipients: tuple[str, ...] = ("rcpt@dest.test",), *,
                     sender: str = "sender@origin.test", data: bytes = MESSAGE,
                     transport: str | None = None) -> str:
        env = Envelope(sender=sender, recipients=recipients, client_ip="127.0.0.1",
                       client_port=12345, helo="client.test", server_id="in",
                       transport=transport, size=len(data), received_at=time.time())
        qid = await self.spool.store(env, data)
        self.engine.wake()
        return qid

    async def drained(self, timeout: float = 15.0) -> None:
        """Wait until the spool is empty (every recipient delivered or failed)."""
        deadline = time.monotonic() + timeout
        while await self.spool.count():
            if time.monotonic() > deadline:
                left = await self.spool.list()
                raise TimeoutError(f"spool still holds {left}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def engine(tmp_path: Path, running_yaml: str) -> AsyncIterator[Harness]:
    """A started spool + engine for ``running_yaml``; stopped and closed afterwards."""
    spool = SqliteSpool(tmp_path / "spool", fsync=False)
    await spool.start()
    holder = [parse_running(running_yaml)]
    eng = DeliveryEngine(spool, lambda: holder[0], hostname=HOSTNAME)
    await eng.start()
    try:
        yield Harness(spool, eng, holder)
    finally:
        await eng.stop()
        await spool.close()


# -- a tiny authoritative DNS server -----------------------------------------------------------


class _DNSProtocol(asyncio.DatagramProtocol):
    def __init__(self, zone: dict[tuple[str, str], list[str]]) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None
        self.queries: list[tuple[str, str]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        q = query.question[0]
        name = q.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rdtype))
        answers = self.zone.get((name, rdtype))
        if answers:
            response.answer.append(dns.rrset.from_text_list(name, 60, "IN", rdtype, answers))
        elif not any(n == name for n, _ in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@contextlib.asynccontextmanager
async def dns_server(zone: dict[tuple[str, str], list[str]], port: int
                     ) -> AsyncIterator[_DNSProtocol]:
    """Answer ``zone`` (``{("name.", "MX"): ["0 ."]}``) on 127.0.0.1:port/udp."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _DNSProtocol(zone), local_addr=("127.0.0.1", port))
    try:
        yield proto
    finally:
        transport.close()
