"""Receiver rows of docs/proxy-conformance.md against a real ``ferrymail run``: what the
listener does with each kind of header. Test names carry the row id.

The client address a header makes ferrymail use is observed through relaying: only
192.0.2.0/24 may relay, so ``RCPT TO:<r@foreign.example>`` gets 250 when the PROXY-reported
client was taken and 554 when the real peer (127.0.0.1) was.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from ferrymail.proxy import V2_SIGNATURE, encode_v1, encode_v2, encode_v2_local
from ferrymail.smtp.protocol import ReplyParser
from tests.integration.conftest import (
    FerrymailProc,
    listener,
    running_yaml,
    server,
    start_ferrymail,
    startup_yaml,
)
from tests.realpeers import free_port

ADDR4 = bytes([192, 0, 2, 1, 127, 0, 0, 1]) + (4000).to_bytes(2, "big") + (25).to_bytes(2, "big")
PROBE = b"EHLO c.test\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<r@foreign.example>\r\nQUIT\r\n"


class Peer:
    def __init__(self, fm: FerrymailProc, proxied: int, plain: int, untrusted: int) -> None:
        self.fm, self.proxied, self.plain, self.untrusted = fm, proxied, plain, untrusted


@pytest.fixture(scope="module")
def peer(tmp_path_factory) -> Iterator[Peer]:
    tmp = tmp_path_factory.mktemp("pp")
    proxied, plain, untrusted = free_port(), free_port(), free_port()
    cfg = startup_yaml(tmp, [
        server("proxied", [listener(proxied, proxy=True)], trusted_proxies=["127.0.0.0/8"]),
        server("plain", [listener(plain)]),
        server("untrusted", [listener(untrusted, proxy=True)],
               trusted_proxies=["198.51.100.0/24"]),
    ])
    fm = start_ferrymail(tmp, cfg, running_yaml(["proxied", "plain", "untrusted"],
                                                 relay_networks=["192.0.2.0/24"]),
                         wait=[("127.0.0.1", p) for p in (proxied, plain, untrusted)])
    try:
        yield Peer(fm, proxied, plain, untrusted)
    finally:
        fm.kill()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def read_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def codes(data: bytes) -> list[int]:
    return [r.code for r in ReplyParser().feed(data)]


def session(port: int, header: bytes) -> list[int]:
    """Send the header and the probe in one write; the reply codes (banner first)."""
    with connect(port) as s:
        s.sendall(header + PROBE)
        return codes(read_all(s))


def nothing_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        return s.recv(1) == b""  # closed without a word
    except TimeoutError:
        return True  # still silent


RELAYED = [220, 250, 250, 250, 221]  # the PROXY-reported client (192.0.2.x) was used
REAL_PEER = [220, 250, 250, 554, 221]  # the real endpoint (127.0.0.1) was used


def test_g1_v1_and_v2_on_one_listener(peer):
    dst = ("127.0.0.1", peer.proxied)
    assert session(peer.proxied, encode_v1(("192.0.2.1", 4000), dst)) == RELAYED
    assert session(peer.proxied, encode_v2(("192.0.2.1", 4000), dst)) == RELAYED


def test_g3_a_header_arriving_byte_by_byte_is_accepted(peer):
    header = encode_v2(("192.0.2.3", 4000), ("127.0.0.1", peer.proxied), crc32c=True)
    with connect(peer.proxied) as s:
        for i in range(len(header)):
            s.sendall(header[i:i + 1])
            time.sleep(0.005)
        s.sendall(PROBE)
        assert codes(read_all(s)) == RELAYED


def test_g4_no_banner_before_the_header_is_complete(peer):
    header = encode_v1(("192.0.2.4", 4000), ("127.0.0.1", peer.proxied))
    with connect(peer.proxied) as s:
        s.sendall(header[:-2])
        assert nothing_within(s, 0.5)
        s.sendall(header[-2:] + PROBE)
        assert codes(read_all(s)) == RELAYED


def test_g6_proxied_listener_never_guesses_and_plain_listener_never_decodes(peer):
    with connect(peer.proxied) as s:
        s.sendall(b"EHLO c.test\r\n")
        assert read_all(s) == b""  # closed, not a banner
    header = encode_v1(("192.0.2.1", 4000), ("127.0.0.1", peer.plain))
    assert session(peer.plain, header) == [220, 500, 250, 250, 554, 221]


def test_g7_a_peer_outside_trusted_proxies_is_refused_before_the_banner(peer):
    with connect(peer.untrusted) as s:
        s.sendall(encode_v1(("192.0.2.1", 4000), ("127.0.0.1", peer.untrusted)) + PROBE)
        assert read_all(s) == b""
    peer.fm.wait_log(r"event=smtp\.proxy\.untrusted .*peer=127\.0\.0\.1:")


def test_v1j_an_invalid_header_aborts_at_once(peer):
    for bad in (b"PROXY TCP4 192.0.2.1 127.0.0.1 04000 25\r\n", b"GET / HTTP/1.0\r\n",
                b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 25\n"):
        start = time.monotonic()
        with connect(peer.proxied) as s:
            s.sendall(bad)
            assert read_all(s) == b""
        assert time.monotonic() - start < 2.0  # well before the 5 s header timeout


def test_v1b_unknown_uses_the_real_connection(peer):
    assert session(peer.proxied, b"PROXY UNKNOWN\r\n") == REAL_PEER
    assert session(peer.proxied, b"PROXY UNKNOWN 192.0.2.1 127.0.0.1 4000 25\r\n") == REAL_PEER


def test_v2b_local_uses_the_real_endpoints_even_with_an_address_block(peer):
    local_with_block = V2_SIGNATURE + b"\x20\x11" + len(ADDR4).to_bytes(2, "big") + ADDR4
    assert session(peer.proxied, local_with_block) == REAL_PEER  # v2j: len honoured too
    assert session(peer.proxied, encode_v2_local()) == REAL_PEER  # v2h


def test_v2c_proxy_uses_the_address_block(peer):
    assert session(peer.proxied, encode_v2(("192.0.2.7", 1), ("127.0.0.1", 25))) == RELAYED


def test_v2d_an_unassigned_command_drops_the_connection(peer):
    bad = V2_SIGNATURE + b"\x22\x11" + len(ADDR4).to_bytes(2, "big") + ADDR4
    with connect(peer.proxied) as s:
        s.sendall(bad + PROBE)
        assert read_all(s) == b""


def test_v2i_udp_is_not_a_tcp_client_the_real_peer_is_used(peer):
    # A TCP listener cannot carry UDP: "falls back to the UNSPEC mode", the address block
    # is ignored. Taking the UDP source as the client would let it claim relay_networks.
    dgram = encode_v2(("192.0.2.9", 53), ("127.0.0.1", 25), protocol="DGRAM")
    assert dgram[13] == 0x12
    assert session(peer.proxied, dgram) == REAL_PEER


def test_v2k_a_partial_header_then_eof_is_rejected(peer):
    header = encode_v2(("192.0.2.1", 4000), ("127.0.0.1", peer.proxied))
    with connect(peer.proxied) as s:
        s.sendall(header[:20])
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b""
    peer.fm.wait_log(r"event=smtp\.proxy\.error .*within the PROXY header \(20 bytes")


def test_v2m_a_crc32c_mismatch_drops_the_connection(peer):
    header = bytearray(encode_v2(("192.0.2.1", 4000), ("127.0.0.1", peer.proxied),
                                 crc32c=True))
    header[-1] ^= 0xFF
    with connect(peer.proxied) as s:
        s.sendall(bytes(header) + PROBE)
        assert read_all(s) == b""
    peer.fm.wait_log(r"event=smtp\.proxy\.error .*CRC32C mismatch")
