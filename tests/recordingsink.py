"""A small SMTP sink that records every connection and message, for shaping tests.

It runs its own asyncio loop in a thread, so sync tests (driving ``ferrymail run``
processes) and async tests can both use it. Per connection it records the client IP, the
open time and the close time (the first of QUIT received or EOF: once the client said QUIT
the connection is over for it); per message the client IP and the time its end-of-data
arrived. Times are ``time.monotonic()``. It accepts everything (PIPELINING, 8BITMIME),
answers ``reject`` (a full reply line, e.g. ``421 4.7.0 try later``) to every MAIL when set.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Conn:
    ip: str
    opened: float
    closed: float | None = None
    messages: int = 0
    helo: str = ""


@dataclass
class Msg:
    ip: str
    at: float
    rcpts: int
    rcpt: str = ""  # the first recipient
    helo: str = ""
    conn: Conn | None = None  # the connection it came on


@dataclass
class Recording:
    conns: list[Conn] = field(default_factory=list)
    msgs: list[Msg] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reject: str | None = None
    delay: float = 0.0  # seconds before answering each end of data (a slower MX)

    def messages(self) -> list[Msg]:
        with self.lock:
            return list(self.msgs)

    def connections(self) -> list[Conn]:
        with self.lock:
            return list(self.conns)

    def max_concurrent(self, ip: str, helo: str | None = None, start: float = 0.0,
                       end: float = float("inf")) -> int:
        """Most connections from ``ip`` (and ``helo``) open at one time within
        [start, end] (a close before an open at the same instant counts first)."""
        events: list[tuple[float, int]] = []
        for c in self.connections():
            closed = c.closed if c.closed is not None else float("inf")
            if closed < start or c.opened > end:
                continue
            if c.ip == ip and (helo is None or c.helo == helo):
                events.append((c.opened, 1))
                events.append((c.closed if c.closed is not None else float("inf"), -1))
        events.sort()
        now = peak = 0
        for _, delta in events:
            now += delta
            peak = max(peak, now)
        return peak

    def open_now(self, ip: str) -> int:
        return sum(1 for c in self.connections() if c.ip == ip and c.closed is None)


class _Session(asyncio.Protocol):
    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.buf = b""
        self.in_data = False
        self.rcpts = 0
        self.rcpt = ""
        self.paused = False
        self.conn: Conn | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ip = transport.get_extra_info("peername")[0]
        self.conn = Conn(ip, time.monotonic())
        with self.rec.lock:
            self.rec.conns.append(self.conn)
        self.transport.write(b"220 sink.test ESMTP\r\n")

    def _end(self) -> None:
        if self.conn is not None and self.conn.closed is None:
            self.conn.closed = time.monotonic()

    def _late(self, reply: bytes) -> None:
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)
            self.data_received(b"")

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None and self.conn is not None
        self.buf += data
        if self.paused:
            return
        out = []
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    if self.buf.startswith(b".\r\n"):
                        end, skip = 0, 3
                    else:
                        break
                else:
                    skip = end + 5
                self.buf = self.buf[skip:]
                self.in_data = False
                with self.rec.lock:
                    self.rec.msgs.append(Msg(self.conn.ip, time.monotonic(), self.rcpts,
                                             self.rcpt, self.conn.helo, self.conn))
                    self.conn.messages += 1
                if self.rec.delay:
                    if out:
                        self.transport.write(b"".join(out))
                        out = []
                    self.paused = True  # the next commands wait for this reply
                    asyncio.get_running_loop().call_later(
                        self.rec.delay, self._late, b"250 2.0.0 ok\r\n")
                    return
                out.append(b"250 2.0.0 ok\r\n")
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl], self.buf[nl + 2:]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.conn.helo = line[5:].decode("ascii", "replace").strip()
                out.append(b"250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                self.rcpts, self.rcpt = 0, ""
                out.append((self.rec.reject + "\r\n").encode() if self.rec.reject
                           else b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                if not self.rcpts:
                    self.rcpt = line[8:].decode("ascii", "replace").strip(" <>")
                self.rcpts += 1
                out.append(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                self.in_data = True
                out.append(b"354 go\r\n")
                if self.buf.startswith(b".\r\n"):
                    continue
            elif verb == b"QUIT":
                self._end()
                out.append(b"221 2.0.0 bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"250 ok\r\n")
        if out:
            self.transport.write(b"".join(out))


@contextlib.contextmanager
def recording_sink(host: str = "127.0.0.1", port: int = 0) -> Iterator[tuple[int, Recording]]:
    """Run the sink on host:port (0: any free port); yields (port, recording)."""
    rec = Recording()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, object] = {}

    async def serve() -> None:
        server = await loop.create_server(lambda: _Session(rec), host, port, backlog=512)
        holder["server"] = server
        holder["port"] = server.sockets[0].getsockname()[1]
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    started.wait(10)
    try:
        yield int(holder["port"]), rec  # type: ignore[arg-type]
    finally:
        async def close() -> None:
            server = holder["server"]
            server.close()  # type: ignore[attr-defined]

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


SOURCE_IPS = ("127.0.0.2", "127.0.0.3")  # the two source addresses the shaping tests share


def shaping_running(sink: int, policies: list[dict], *, concurrency: int, reuse: int) -> str:
    """A running file for shaping tests: mail for ``dest.test`` relayed to the recording sink
    on ``sink`` from the two SOURCE_IPS, ``reuse`` messages per connection, ``policies``."""
    import yaml

    return yaml.safe_dump({
        "servers": [{"id": "in", "transport": "t", "domains": ["dest.test"],
                     "relay_networks": ["127.0.0.0/8"]}],
        "addresses": [{"id": f"s{i}", "address": ip} for i, ip in enumerate(SOURCE_IPS)],
        "transportgroups": [{
            "id": "g",
            "connection": {"server": "127.0.0.1", "port": sink,
                           "reuse": {"messages": reuse, "idle": "1s"},
                           "sourceip": {"ipv4": ["s0", "s1"]}},
            "retry": {"count": 5, "intervals": [{"interval": "1s"}]},
            "transports": [{"id": "t"}],
        }],
        "queues": {"concurrency": concurrency},
        "policies": policies,
    }, sort_keys=False)
