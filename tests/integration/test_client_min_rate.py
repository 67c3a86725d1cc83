"""The outbound client's deadlines and minimum-rate rule against real sockets on loopback:
a dripping banner is cut once the grace has passed, a Postscreen-style split banner (a
"220-" line, a pause shorter than the grace, then the rest) is not, and a silent peer is cut
at the banner deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from ferrymail.delivery.connect import Source, Timeouts
from ferrymail.delivery.errors import DeliveryError
from ferrymail.smtp.client import SMTPClient, TLSMode
from tests.integration.outbound_harness import run

SRC = Source(None, "client.test")


async def serve(script):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
            while await reader.read(4096):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def drip(reader, writer):
    for b in b"220 drip.test ESMTP\r\n":
        writer.write(bytes([b]))
        await writer.drain()
        await asyncio.sleep(0.15)


async def postscreen(reader, writer):
    writer.write(b"220-mx.test ESMTP\r\n")
    await asyncio.sleep(0.8)
    writer.write(b"220 mx.test ESMTP\r\n")
    while line := await reader.readline():
        if line.upper().startswith(b"QUIT"):
            writer.write(b"221 bye\r\n")
            return
        writer.write(b"250 mx.test\r\n")


async def silent(reader, writer):
    await asyncio.sleep(30)


@pytest.mark.parametrize("rate", [16, 0])
def test_dripping_banner_is_cut_after_the_grace(rate):
    async def main() -> None:
        srv = await serve(drip)
        port = srv.sockets[0].getsockname()[1]
        t = Timeouts(banner=8, command=1, min_rate=rate, min_rate_grace=1.0)
        t0 = time.monotonic()
        try:
            with pytest.raises(DeliveryError) as e:
                await SMTPClient.connect(SRC, "127.0.0.1", port, tls=TLSMode.DISABLED,
                                         timeouts=t)
        finally:
            srv.close()
        took = time.monotonic() - t0
        if rate:  # ~7 bytes/s < 16: cut soon after the 1 s grace, long before the deadline
            assert "banner from" in e.value.message and "cut off" in e.value.message
            assert "below the minimum rate of 16 bytes/s" in e.value.message
            assert took < 2.9
        else:  # rule off: the 21-byte banner completes in ~3.2 s, then EHLO gets no answer
            assert took > 3

    run(main)


def test_split_banner_within_the_grace_is_not_cut_and_silence_hits_the_deadline():
    async def main() -> None:
        srv = await serve(postscreen)
        port = srv.sockets[0].getsockname()[1]
        t = Timeouts(banner=5, command=5, min_rate=16, min_rate_grace=2.0)
        try:
            client = await SMTPClient.connect(SRC, "127.0.0.1", port, tls=TLSMode.DISABLED,
                                              timeouts=t)
            assert client.banner is not None and client.banner.code == 220
            await client.quit()
        finally:
            srv.close()
        srv = await serve(silent)
        port = srv.sockets[0].getsockname()[1]
        t0 = time.monotonic()
        try:
            with pytest.raises(DeliveryError, match=r"no banner .* within 1\.5s"):
                await SMTPClient.connect(SRC, "127.0.0.1", port, tls=TLSMode.DISABLED,
                                         timeouts=Timeouts(banner=1.5, min_rate=16,
                                                           min_rate_grace=0.5))
        finally:
            srv.close()
        assert 1.4 < time.monotonic() - t0 < 4

    run(main)
