"""Open the TCP path to an MX: a socket bound to the source IP, or a proxy plus PROXY header.

Direct: a socket bound to ``source.address`` (port 0) connects to the MX. Proxied: connect to
the HAProxy (from any local address) and write the PROXY header naming
``(source.address, 0) -> (dest_ip, dest_port)`` in one send, before anything else can use the
connection; the proxy then binds the source IP (``usesrc clientip``) and connects to the MX.

The PROXY protocol has no error channel: when the proxy cannot bind the source IP or reach the
MX it just closes, so the caller sees EOF before the banner (see `SMTPClient.connect`).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass

from ferrymail.delivery.errors import DeliveryError, ErrorKind, ProxyConnectError
from ferrymail.proxy import ProxyError, encode_v1, encode_v2

# Linux: defer the source port choice to connect(), so a source IP can hold more than ~28k
# connections (one per 4-tuple rather than one per port). Not in the socket module before 3.12.
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


@dataclass(frozen=True)
class ProxyRoute:
    """The HAProxy to go through (its ``bind … accept-proxy`` address) and the header version."""

    server: str
    port: int
    version: int = 1

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"PROXY protocol version must be 1 or 2, got {self.version!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"proxy port must be 1..65535, got {self.port!r}")

    def __str__(self) -> str:
        return hostport(self.server, self.port)


@dataclass(frozen=True)
class Source:
    """Where a connection comes from: source IP, EHLO name and, optionally, the proxy.

    ``address`` None lets the OS choose (only without a proxy: the PROXY header must name one).
    """

    address: str | None
    helo: str
    address_id: str | None = None
    proxy: ProxyRoute | None = None


@dataclass(frozen=True)
class Timeouts:
    """Seconds: TCP connect (to MX or proxy), banner, each command reply, DATA (body + reply).

    Each is a deadline for the whole phase, not an idle timer. ``min_rate`` (bytes/s, 0 = off)
    cuts a reply that has started but drips: once ``min_rate_grace`` s have passed since its
    first byte, its bytes so far divided by that time must reach ``min_rate``.
    """

    connect: float = 30
    banner: float = 300
    command: float = 300
    data: float = 600
    min_rate: int = 16
    min_rate_grace: float = 10


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_path(source: Source, dest_ip: str, dest_port: int, mx_host: str = "") -> str:
    """``from source 127.0.0.5 to mx.example [127.0.0.3]:25 via proxy 127.0.0.1:2525``."""
    dest = hostport(dest_ip, dest_port)
    to = f"{mx_host} [{dest_ip}]:{dest_port}" if mx_host and mx_host != dest_ip else dest
    via = f" via proxy {source.proxy}" if source.proxy else ""
    return f"from source {source.address or '(any)'} to {to}{via}"


def _ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise DeliveryError("config", f"{what} {text!r} is not an IP address",
                            temporary=False) from None


def _family(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> socket.AddressFamily:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def proxy_header(source: Source, dest_ip: str, dest_port: int) -> bytes:
    """The PROXY header a proxied connection starts with (source port 0: the proxy picks one)."""
    proxy = source.proxy
    if proxy is None:
        raise DeliveryError("config", "no proxy configured for this source", temporary=False)
    if source.address is None:
        raise DeliveryError("config", f"a source IP is required to go through proxy {proxy}",
                            temporary=False)
    check_families(source, dest_ip)
    try:
        if proxy.version == 2:
            return encode_v2((source.address, 0), (dest_ip, dest_port))
        return encode_v1((source.address, 0), (dest_ip, dest_port))
    except ProxyError as e:
        raise DeliveryError("config", f"cannot encode PROXY header for proxy {proxy} "
                            f"{describe_path(source, dest_ip, dest_port)}: {e}",
                            temporary=False) from None


def check_families(source: Source, dest_ip: str) -> None:
    """Refuse a source/destination pair of different IP families (permanent for that pair)."""
    dest = _ip(dest_ip, "destination")
    if source.address is None:
        return
    src = _ip(source.address, "source IP")
    if src.version != dest.version:
        raise DeliveryError(
            "config",
            f"source IP {source.address} is IPv{src.version} but the MX address {dest_ip} is "
            f"IPv{dest.version}",
            temporary=False, dns="ipfamily",
        )


async def open_socket(source: Source, dest_ip: str, dest_port: int, timeouts: Timeouts, *,
                      mx_host: str = "") -> tuple[socket.socket, str]:
    """A connected non-blocking socket ready for SMTP, and the local IP the MX will see.

    For a proxied source the PROXY header has already been written. `mx_host` only names
    the MX in error messages.
    """
    if source.proxy is not None:
        try:
            return await _open_proxied(source, source.proxy, dest_ip, dest_port, timeouts,
                                       mx_host)
        except DeliveryError as e:
            if e.kind != "proxy" or isinstance(e, ProxyConnectError):
                raise
            raise ProxyConnectError(e.message) from None
    return await _open_direct(source, dest_ip, dest_port, timeouts, mx_host)


async def open_stream(source: Source, dest_ip: str, dest_port: int, timeouts: Timeouts, *,
                      mx_host: str = ""
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """`open_socket` as asyncio streams: ``(reader, writer, local_ip)``."""
    sock, local_ip = await open_socket(source, dest_ip, dest_port, timeouts, mx_host=mx_host)
    try:
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    return reader, writer, local_ip


async def _open_direct(source: Source, dest_ip: str, dest_port: int, timeouts: Timeouts,
                       mx_host: str) -> tuple[socket.socket, str]:
    check_families(source, dest_ip)
    dest = _ip(dest_ip, "destination")
    path = describe_path(source, dest_ip, dest_port, mx_host)
    sock = socket.socket(_family(dest), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source.address is not None:
            try:
                sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            except OSError:
                pass
            try:
                sock.bind((source.address, 0))
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:
                    msg = f"source IP {source.address} is not a local address (cannot bind it)"
                else:
                    msg = f"cannot bind source IP {source.address}: {e.strerror or e}"
                raise DeliveryError("config", msg, temporary=True) from None
        await _connect(sock, (dest_ip, dest_port), timeouts.connect, "network",
                       f"cannot connect {path}")
        local_ip = sock.getsockname()[0]
        _nodelay(sock)
        return sock, local_ip
    except BaseException:
        sock.close()
        raise


async def _open_proxied(source: Source, proxy: ProxyRoute, dest_ip: str, dest_port: int,
                        timeouts: Timeouts, mx_host: str) -> tuple[socket.socket, str]:
    header = proxy_header(source, dest_ip, dest_port)
    assert source.address is not None  # proxy_header checked it
    path = describe_path(source, dest_ip, dest_port, mx_host)
    loop = asyncio.get_running_loop()
    try:
        proxy_ip = str(ipaddress.ip_address(proxy.server))
    except ValueError:
        try:
            infos = await loop.getaddrinfo(proxy.server, proxy.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise DeliveryError("proxy", f"cannot resolve proxy {proxy}: {e}") from None
        proxy_ip = str(infos[0][4][0])
    sock = socket.socket(_family(ipaddress.ip_address(proxy_ip)), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        _nodelay(sock)
        await _connect(sock, (proxy_ip, proxy.port), timeouts.connect, "proxy",
                       f"cannot connect to proxy {proxy} ({path})")
        try:
            # The header goes first and whole (one send): nothing else owns the socket yet.
            async with asyncio.timeout(timeouts.connect):
                await loop.sock_sendall(sock, header)
        except (OSError, TimeoutError) as e:
            raise DeliveryError("proxy", f"cannot write the PROXY header to proxy {proxy} "
                                f"({path}): {_reason(e)}") from None
        return sock, source.address
    except BaseException:
        sock.close()
        raise


async def _connect(sock: socket.socket, addr: tuple[str, int], timeout: float, kind: ErrorKind,
                   what: str) -> None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, addr)
    except TimeoutError:
        raise DeliveryError(kind, f"{what}: no answer within {timeout:g}s") from None
    except OSError as e:
        raise DeliveryError(kind, f"{what}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)  # uvloop's own strerror is "Connect call failed (…)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
