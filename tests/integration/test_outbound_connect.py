"""The outbound connector: direct bind to a source IP, or the seed's HAProxy with a PROXY header."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from ferrymail.delivery import DeliveryError, ProxyRoute, Source, Timeouts, open_stream
from ferrymail.proxy import encode_v1, encode_v2, parse
from ferrymail.smtp.client import SMTPClient, TLSMode
from tests.integration.smtpscript import ScriptedSMTP, self_signed, server_context
from tests.realpeers import (
    free_port,
    haproxy,
    require_transparent_proxy,
    seed_outbound_haproxy,
    smtp_sink,
)

FAST = Timeouts(connect=2, banner=5, command=5, data=5)
MSG = b"Subject: via proxy\r\n\r\nhello\r\n"


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), 20)

    uvloop.run(bounded())


class Recorder:
    """A TCP server that records each peer address and the first bytes it sends."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.peers: list[tuple] = []
        self.first: list[bytes] = []
        self.got = asyncio.Event()

    async def __aenter__(self) -> Recorder:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername"))
        self.first.append(await reader.read(1024))
        self.got.set()
        writer.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- direct


def test_open_stream_direct_binds_the_source_ip():
    async def main() -> None:
        async with Recorder() as rec:
            reader, writer, local_ip = await open_stream(Source("127.0.0.7", "h"), "127.0.0.1",
                                                         rec.port, FAST)
            writer.write(b"hello\r\n")
            await asyncio.wait_for(rec.got.wait(), 5)
            writer.close()
            assert local_ip == "127.0.0.7"
            assert rec.peers[0][0] == "127.0.0.7" and rec.first == [b"hello\r\n"]

    run(main)


def test_open_stream_direct_without_source_ip_lets_the_os_choose():
    async def main() -> None:
        async with Recorder() as rec:
            _, writer, local_ip = await open_stream(Source(None, "h"), "127.0.0.1", rec.port,
                                                    FAST)
            writer.close()
            assert local_ip == "127.0.0.1"

    run(main)


def test_open_stream_direct_ipv6():
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")

    async def main() -> None:
        async with Recorder("::1") as rec:
            _, writer, local_ip = await open_stream(Source("::1", "h"), "::1", rec.port, FAST)
            writer.write(b"x")
            await asyncio.wait_for(rec.got.wait(), 5)
            writer.close()
            assert local_ip == "::1" and rec.peers[0][0] == "::1"

    run(main)


def test_direct_bind_to_a_non_local_ip_names_the_source():
    async def main() -> None:
        with pytest.raises(DeliveryError) as ei:
            await open_stream(Source("192.0.2.77", "h"), "127.0.0.1", free_port(), FAST)
        e = ei.value
        assert e.kind == "config" and "192.0.2.77" in e.message
        assert "not a local address" in e.message

    run(main)


def test_direct_connection_refused_names_source_and_destination():
    port = free_port("127.0.0.3")

    async def main() -> None:
        with pytest.raises(DeliveryError) as ei:
            await SMTPClient.connect(Source("127.0.0.5", "h"), "127.0.0.3", port,
                                     mx_host="mx.example", timeouts=FAST)
        e = ei.value
        assert e.kind == "network" and e.temporary
        assert "127.0.0.5" in e.message and f"mx.example [127.0.0.3]:{port}" in e.message
        assert "refused" in e.message.lower()

    run(main)


def test_family_mismatch_is_permanent_for_the_pair():
    async def main() -> None:
        for src in (Source("127.0.0.5", "h"),
                    Source("127.0.0.5", "h", proxy=ProxyRoute("127.0.0.1", 9))):
            with pytest.raises(DeliveryError) as ei:
                await open_stream(src, "2001:db8::25", 25, FAST)
            e = ei.value
            assert e.kind == "config" and e.dns == "ipfamily" and not e.temporary
            assert "127.0.0.5" in e.message and "2001:db8::25" in e.message

    run(main)


def test_bad_addresses_and_proxy_without_source_ip():
    async def main() -> None:
        with pytest.raises(DeliveryError) as ei:
            await open_stream(Source("127.0.0.5", "h"), "mx.example", 25, FAST)
        assert ei.value.kind == "config" and "not an IP address" in ei.value.message
        with pytest.raises(DeliveryError) as ei:
            await open_stream(Source(None, "h", proxy=ProxyRoute("127.0.0.1", 9)),
                              "127.0.0.3", 25, FAST)
        assert ei.value.kind == "config" and "source IP is required" in ei.value.message
        assert not ei.value.temporary

    run(main)
    with pytest.raises(ValueError):
        ProxyRoute("127.0.0.1", 2525, version=3)


# --------------------------------------------------------------------------- proxied, no HAProxy


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_is_the_first_thing_written(version):
    async def main() -> None:
        async with Recorder() as rec:
            src = Source("127.0.0.5", "h", proxy=ProxyRoute("127.0.0.1", rec.port, version))
            _, writer, local_ip = await open_stream(src, "127.0.0.3", 25, FAST)
            writer.write(b"EHLO h\r\n")
            await asyncio.wait_for(rec.got.wait(), 5)
            writer.close()
            assert local_ip == "127.0.0.5"
            first = rec.first[0]
            enc = encode_v1 if version == 1 else encode_v2
            header = enc(("127.0.0.5", 0), ("127.0.0.3", 25))
            assert first.startswith(header)
            decoded, used = parse(first)
            assert decoded.source == ("127.0.0.5", 0) and decoded.destination == ("127.0.0.3", 25)
            assert first[used:] in (b"", b"EHLO h\r\n")

    run(main)


def test_proxy_down_is_a_temporary_proxy_error():
    port = free_port()

    async def main() -> None:
        src = Source("127.0.0.5", "h", proxy=ProxyRoute("127.0.0.1", port))
        with pytest.raises(DeliveryError) as ei:
            await SMTPClient.connect(src, "127.0.0.3", 25, timeouts=FAST)
        e = ei.value
        assert e.kind == "proxy" and e.temporary
        assert f"proxy 127.0.0.1:{port}" in e.message and "127.0.0.5" in e.message

    run(main)


def test_proxy_that_closes_at_once_is_eof_before_banner():
    async def main() -> None:
        async with Recorder() as rec:  # reads the header, then closes: like HAProxy failing
            src = Source("127.0.0.5", "h", proxy=ProxyRoute("127.0.0.1", rec.port, 2))
            with pytest.raises(DeliveryError) as ei:
                await SMTPClient.connect(src, "127.0.0.3", 25, timeouts=FAST)
            e = ei.value
            assert e.kind == "proxy" and e.temporary
            assert e.message == (f"EOF before banner via proxy 127.0.0.1:{rec.port} from source "
                                 "127.0.0.5 to 127.0.0.3:25: the proxy could not bind the "
                                 "source IP or reach the MX")

    run(main)


def test_proxy_that_stays_silent_is_a_proxy_timeout():
    async def main() -> None:
        async with ScriptedSMTP(banner=None) as silent:  # takes the header, says nothing
            src = Source("127.0.0.5", "h", proxy=ProxyRoute("127.0.0.1", silent.port, 1))
            with pytest.raises(DeliveryError) as ei:
                await SMTPClient.connect(src, "127.0.0.3", 25, mx_host="mx.test",
                                         timeouts=Timeouts(connect=2, banner=0.5))
            e = ei.value
            assert e.kind == "proxy" and e.temporary
            assert e.message.startswith(f"no banner within 0.5s via proxy 127.0.0.1:{silent.port}"
                                        " from source 127.0.0.5 to mx.test [127.0.0.3]:25")

    run(main)


# --------------------------------------------------------------------------- the seed's HAProxy


@pytest.fixture(scope="module")
def outbound_proxy():
    require_transparent_proxy()
    port = free_port()
    cfg = seed_outbound_haproxy("127.0.0.1", port, retries=0, connect_timeout="1s")
    with haproxy(cfg, [("127.0.0.1", port)]):
        yield port


@pytest.mark.parametrize("version", [1, 2])
def test_via_seed_haproxy_the_mx_sees_the_source_ip_and_helo(outbound_proxy, version):
    with smtp_sink("127.0.0.3") as sink:
        async def main() -> None:
            src = Source("127.0.0.5", "helo5.example", address_id="a5",
                         proxy=ProxyRoute("127.0.0.1", outbound_proxy, version))
            c = await SMTPClient.connect(src, "127.0.0.3", sink.port, mx_host="mx.test",
                                         timeouts=FAST)
            assert c.local_ip == "127.0.0.5" and c.proxied
            for i in range(2):
                r = await c.send("a@example.com", [f"b{i}@example.net"], MSG)
                assert r.state == "EOD" and r.reply.code == 250
            info = c.connection_info()
            assert info["localip"] == "127.0.0.5" and info["localipid"] == "a5"
            assert info["remoteip"] == "127.0.0.3" and info["remotemx"] == "mx.test"
            await c.quit()

        run(main)
        dumps = sink.wait_dumps(2)
    assert {d.client_addr for d in dumps} == {"127.0.0.5"}
    assert {d.helo for d in dumps} == {"helo5.example"}


def test_via_seed_haproxy_ipv6(outbound_proxy):
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    with smtp_sink("::1") as sink:
        async def main() -> None:
            src = Source("::1", "helo6.example",
                         proxy=ProxyRoute("127.0.0.1", outbound_proxy, 2))
            c = await SMTPClient.connect(src, "::1", sink.port, timeouts=FAST)
            r = await c.send("a@example.com", ["b@example.net"], MSG)
            assert r.state == "EOD"
            await c.quit()

        run(main)
        (d,) = sink.wait_dumps(1)
    assert d.client_addr in ("::1", "ipv6:::1") and d.helo == "helo6.example"


def test_via_seed_haproxy_starttls_end_to_end(outbound_proxy, tmp_path):
    ctx = server_context(*self_signed(tmp_path, "mx.test"))

    async def main() -> None:
        async with ScriptedSMTP(host="127.0.0.3", tls_context=ctx) as srv:
            src = Source("127.0.0.6", "helo6.example",
                         proxy=ProxyRoute("127.0.0.1", outbound_proxy, 1))
            c = await SMTPClient.connect(src, "127.0.0.3", srv.port, mx_host="mx.test",
                                         tls=TLSMode.REQUIRE, timeouts=FAST)
            assert c.tls_started
            assert (await c.send("a@example.com", ["b@example.net"], MSG)).state == "EOD"
            await c.quit()
            s = srv.sessions[0]
            assert s.peer[0] == "127.0.0.6" and s.messages[0].tls
            assert s.commands[0] == "EHLO helo6.example"

    run(main)


def test_via_seed_haproxy_non_local_source_is_eof_before_banner(outbound_proxy):
    with smtp_sink("127.0.0.3") as sink:
        async def main() -> None:
            src = Source("192.0.2.77", "h", proxy=ProxyRoute("127.0.0.1", outbound_proxy, 2))
            t0 = time.monotonic()
            with pytest.raises(DeliveryError) as ei:
                await SMTPClient.connect(src, "127.0.0.3", sink.port,
                                         timeouts=Timeouts(connect=2, banner=8))
            assert time.monotonic() - t0 < 6
            e = ei.value
            assert e.kind == "proxy" and e.temporary
            assert e.message.startswith(f"EOF before banner via proxy 127.0.0.1:{outbound_proxy}"
                                        f" from source 192.0.2.77 to 127.0.0.3:{sink.port}")

        run(main)
        assert sink.dumps() == []


def test_via_seed_haproxy_mx_down_is_eof_before_banner(outbound_proxy):
    port = free_port("127.0.0.3")

    async def main() -> None:
        src = Source("127.0.0.5", "h", proxy=ProxyRoute("127.0.0.1", outbound_proxy, 1))
        with pytest.raises(DeliveryError) as ei:
            await SMTPClient.connect(src, "127.0.0.3", port, mx_host="mx.down.test",
                                     timeouts=FAST)
        e = ei.value
        assert e.kind == "proxy" and e.temporary and "mx.down.test" in e.message

    run(main)
