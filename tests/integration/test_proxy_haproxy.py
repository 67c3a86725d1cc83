"""HAProxy 2.6 as the oracle for the PROXY codec.

Headers we encode go into `bind … accept-proxy`; HAProxy relays the advertised addresses with
`send-proxy` (v1) or `send-proxy-v2` to a small listener here, which decodes them with our
`parse`. Invalid headers must make HAProxy close the connection without forwarding anything.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from ferrymail.proxy import (
    TLV,
    TLV_AUTHORITY,
    TLV_NOOP,
    ProxyDecoder,
    ProxyError,
    ProxyHeader,
    encode_v1,
    encode_v1_unknown,
    encode_v2,
    encode_v2_local,
    parse,
)
from tests.realpeers import free_port, haproxy

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
PAYLOAD = b"EHLO client.example\r\n"
REPLY = b"250 backend saw it\r\n"


@dataclass
class Seen:
    """One connection HAProxy made to the backend listener."""

    header: ProxyHeader | None = None
    rest: bytes = b""
    error: ProxyError | None = None
    raw: bytes = b""
    done: threading.Event = field(default_factory=threading.Event)


class Backend:
    """A TCP listener that decodes the PROXY header of every connection it accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            s = Seen()
            with self.lock:
                self.seen.append(s)
            threading.Thread(target=self._serve, args=(conn, s), daemon=True).start()

    def _serve(self, conn: socket.socket, s: Seen) -> None:
        dec = ProxyDecoder()
        conn.settimeout(5)
        try:
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                s.raw += data
                if dec.header is None:
                    s.header = dec.feed(data)
                else:
                    dec.feed(data)
                if s.header is not None and dec.rest.endswith(b"\n"):
                    conn.sendall(REPLY)
                    break
        except ProxyError as e:
            s.error = e
        except OSError:
            pass  # health checks just close (or reset)
        finally:
            s.rest = dec.rest
            conn.close()
            s.done.set()

    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def get(self, index: int, timeout: float = 5.0) -> Seen:
        for _ in range(int(timeout / 0.01)):
            with self.lock:
                if len(self.seen) > index:
                    s = self.seen[index]
                    break
            threading.Event().wait(0.01)
        else:
            raise AssertionError(f"backend got no connection #{index}")
        assert s.done.wait(timeout), "backend connection never finished"
        return s

    def close(self) -> None:
        self.sock.close()


@dataclass
class Relay:
    v1_port: int  # accept-proxy -> send-proxy
    v2_port: int  # accept-proxy -> send-proxy-v2 with authority, crc32c, unique-id
    backend: Backend
    checks: Backend  # receives send-proxy-v2 health checks


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    backend, checks = Backend(), Backend()
    p1, p2 = free_port(), free_port()
    config = f"""
global
    log stderr format raw local0 info
defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 5s
    timeout server 5s
listen v1
    bind {HOST}:{p1} accept-proxy
    server s {HOST}:{backend.port} send-proxy
listen v2
    bind {HOST}:{p2} accept-proxy
    unique-id-format ferry-%ci
    server s {HOST}:{backend.port} send-proxy-v2 proxy-v2-options authority,crc32c,unique-id
backend health
    server s {HOST}:{checks.port} send-proxy-v2 check inter 200ms
"""
    try:
        with haproxy(config, [(HOST, p1), (HOST, p2)]):
            yield Relay(p1, p2, backend, checks)
    finally:
        backend.close()
        checks.close()


def through(relay: Relay, port: int, header: bytes) -> tuple[Seen, bytes, tuple[str, int]]:
    """Send header + PAYLOAD through HAProxy; return what the backend saw and our reply."""
    n = relay.backend.count()
    with socket.create_connection((HOST, port), timeout=5) as c:
        c.sendall(header + PAYLOAD)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            reply += chunk
        local = c.getsockname()
    seen = relay.backend.get(n)
    assert seen.error is None, f"our parser refused HAProxy's header {seen.raw!r}: {seen.error}"
    assert seen.rest == PAYLOAD
    return seen, reply, local


def refused(relay: Relay, port: int, header: bytes) -> None:
    """HAProxy closes on `header` and forwards nothing."""
    n = relay.backend.count()
    with socket.create_connection((HOST, port), timeout=5) as c:
        c.sendall(header + PAYLOAD)
        try:
            assert c.recv(4096) == b""
        except ConnectionResetError:
            pass
    # the next connection the backend sees must be this marker, not the refused one
    marker = (("192.0.2.250", 4242), ("192.0.2.251", 25))
    seen, _, _ = through(relay, relay.v1_port, encode_v1(*marker))
    assert relay.backend.seen[n] is seen
    assert (seen.header.source, seen.header.destination) == marker


V4 = (("192.0.2.1", 40000), ("198.51.100.2", 25))
V6 = (("2001:db8::1", 40000), ("2001:db8::2", 25))


@pytest.mark.parametrize("pair", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("version", [1, 2])
def test_v1_relay_carries_our_addresses(relay, pair, version):
    header = encode_v1(*pair) if version == 1 else encode_v2(*pair)
    seen, reply, _ = through(relay, relay.v1_port, header)
    assert reply == REPLY
    h = seen.header
    assert h.version == 1 and h.family == ("INET" if pair is V4 else "INET6")
    assert (h.source, h.destination) == pair


@pytest.mark.parametrize("pair", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("crc", [False, True], ids=["plain", "crc32c"])
def test_v2_relay_carries_our_addresses_and_authority(relay, pair, crc):
    tlvs = [TLV(TLV_AUTHORITY, b"mx.example.net"), TLV(0xE0, b"custom"), TLV(TLV_NOOP, b"pad")]
    seen, reply, _ = through(relay, relay.v2_port, encode_v2(*pair, tlvs=tlvs, crc32c=crc))
    assert reply == REPLY
    h = seen.header
    assert (h.version, h.command, h.protocol) == (2, "PROXY", "STREAM")
    assert (h.source, h.destination) == pair
    assert h.authority == "mx.example.net"  # relayed by proxy-v2-options authority
    assert h.unique_id == f"ferry-{pair[0][0]}".encode()
    assert h.crc32c is not None  # HAProxy's own CRC, verified by our parser
    assert h.tlv(0xE0) is None  # HAProxy drops TLVs it does not know


def test_v2_relay_of_a_v1_header_and_mapped_addresses(relay):
    mixed = (("::ffff:192.0.2.1", 4), ("2001:db8::2", 25))
    seen, _, _ = through(relay, relay.v2_port, encode_v1(*mixed))
    assert seen.header.family == "INET6"
    assert (seen.header.source, seen.header.destination) == mixed
    seen, _, _ = through(relay, relay.v1_port, encode_v1(*mixed))
    assert seen.raw.startswith(b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 4 25\r\n")
    assert (seen.header.source, seen.header.destination) == mixed


@pytest.mark.parametrize("header", [encode_v1_unknown(), encode_v2_local()],
                         ids=["v1-unknown", "v2-local"])
def test_unknown_and_local_make_haproxy_use_the_real_peer(relay, header):
    assert parse(header)[0].is_local
    seen, _, local = through(relay, relay.v1_port, header)
    assert seen.header.source == local


INVALID = {
    "v2-corrupted-crc": (lambda b: b[:-1] + bytes([b[-1] ^ 0x01]))(
        encode_v2(*V4, tlvs=[TLV(TLV_AUTHORITY, b"mx.test")], crc32c=True)),
    # HAProxy's reg-tests/connection/proxy_protocol_tlv_validation.vtc
    "v2-tlv-overrun": bytes.fromhex(
        "0d0a0d0a000d0a515549540a 21 11 0014 7f000001 7f000001 002a 0539 02 000a 3132333435"),
    "v2-tlv-underrun": bytes.fromhex(
        "0d0a0d0a000d0a515549540a 21 11 0014 7f000001 7f000001 002a 0539 02 0004 31323334"),
    "v2-version-3": (lambda b: b[:12] + b"\x31" + b[13:])(encode_v2(*V4)),
    "v1-bare-lf": b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 25\n",
    "v1-ipv6-in-tcp4": b"PROXY TCP4 2001:db8::1 2001:db8::2 40000 25\r\n",
    "not-proxy": b"EHLO client.example\r\n",
}


@pytest.mark.parametrize("header", INVALID.values(), ids=INVALID.keys())
def test_invalid_headers_are_refused_by_haproxy_and_by_us(relay, header):
    with pytest.raises(ProxyError):
        parse(header + PAYLOAD)
    refused(relay, relay.v2_port, header)


SPEC_VALID_BUT_REFUSED = {
    "v2-family-0x10": (lambda b: b[:13] + b"\x10" + b[14:])(encode_v2(*V4)),
    "v1-unknown-long-form": b"PROXY UNKNOWN 192.0.2.1 198.51.100.2 40000 25\r\n",
}


@pytest.mark.parametrize("header", SPEC_VALID_BUT_REFUSED.values(),
                         ids=SPEC_VALID_BUT_REFUSED.keys())
def test_haproxy_26_refuses_what_the_spec_allows_so_we_never_send_it(relay, header):
    """Spec-valid, so our parser reads them as "use the real peer"; our encoders avoid them."""
    assert parse(header)[0].is_local
    refused(relay, relay.v2_port, header)
    assert encode_v2(*V4)[13] == 0x11 and encode_v1_unknown() == b"PROXY UNKNOWN\r\n"


@pytest.mark.parametrize(
    ("line", "canonical"),
    [
        (b"PROXY TCP4 192.0.2.01 198.51.100.2 40000 25\r\n",
         b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 25\r\n"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 040000 25\r\n",
         b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 25\r\n"),
    ],
    ids=["ip", "port"],
)
def test_haproxy_26_tolerates_leading_zeros_that_we_refuse(relay, line, canonical):
    """Measured on 2.6.12: leading zeros pass HAProxy (and leave it canonical); the spec and
    our parser refuse them, so such a header from a client never reaches us unrepaired."""
    with pytest.raises(ProxyError, match="leading zero"):
        parse(line)
    seen, _, _ = through(relay, relay.v1_port, line)
    assert seen.raw.startswith(canonical)


def test_send_proxy_v2_health_check_is_a_local_header(relay):
    s = relay.checks.get(0, timeout=5)
    assert s.error is None, s.error
    h = s.header
    assert h is not None, f"health check sent {s.raw!r}"
    assert (h.version, h.command, h.family) == (2, "LOCAL", "UNSPEC")
    assert h.is_local and h.source is None and h.length == 16
    assert s.raw == encode_v2_local()
