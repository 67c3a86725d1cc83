"""Hostile SMTP peers on loopback, for the adversity tests and benchmark (one process).

    python bench/hostile.py [--tarpit HOST:PORT] [--drip HOST:PORT] [--silent-data HOST:PORT]
                            [--drip-interval SECONDS]

- tarpit: accepts every connection and never sends a byte (reads and discards input);
- drip: sends the banner ``220 drip.test ESMTP`` one byte every ``--drip-interval`` seconds;
- silent-data: a normal ESMTP server (PIPELINING) that answers ``354`` to DATA and then never
  answers the end of data.

Prints ``ready`` on stdout once every listener is bound; runs until SIGTERM/SIGINT. Each
listener keeps at most 10,000 connections open (then closes new ones at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

MAX_CONNECTIONS = 10_000
BANNER = b"220 drip.test ESMTP\r\n"


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Peers:
    def __init__(self, drip_interval: float) -> None:
        self.drip_interval = drip_interval
        self.open = 0

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        if self.open >= MAX_CONNECTIONS:
            writer.close()
            return False
        self.open += 1
        return True

    async def _done(self, writer: asyncio.StreamWriter) -> None:
        self.open -= 1
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def tarpit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            return
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            await self._done(writer)

    async def drip(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            return
        try:
            for i in range(len(BANNER)):
                writer.write(BANNER[i:i + 1])
                await writer.drain()
                await asyncio.sleep(self.drip_interval)
            while await reader.read(65536):  # then silence
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            await self._done(writer)

    async def silent_data(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            return
        try:
            writer.write(b"220 silent.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-silent.test\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    while await reader.read(65536):  # the body, then never an answer
                        pass
                    break
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            await self._done(writer)


async def main(args: argparse.Namespace) -> None:
    peers = Peers(args.drip_interval)
    servers = []
    for addrs, handler in ((args.tarpit, peers.tarpit), (args.drip, peers.drip),
                           (args.silent_data, peers.silent_data)):
        for addr in addrs:
            host, port = hostport(addr)
            servers.append(await asyncio.start_server(handler, host, port, backlog=1024))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tarpit", action="append", default=[], metavar="HOST:PORT")
    p.add_argument("--drip", action="append", default=[], metavar="HOST:PORT")
    p.add_argument("--silent-data", action="append", default=[], metavar="HOST:PORT")
    p.add_argument("--drip-interval", type=float, default=0.5)
    a = p.parse_args()
    if not (a.tarpit or a.drip or a.silent_data):
        p.error("give at least one listener")
    try:
        asyncio.run(main(a))
    except KeyboardInterrupt:
        sys.exit(0)
