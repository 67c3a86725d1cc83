"""The sans-IO PROXY protocol codec: spec vectors, HAProxy's regression vectors, strictness,
incremental decoding and property tests."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.proxy import (
    CLIENT_CERT_CONN,
    CLIENT_SSL,
    SSL_CIPHER,
    SSL_CN,
    SSL_KEY_ALG,
    SSL_SIG_ALG,
    SSL_VERSION,
    TLV,
    TLV_ALPN,
    TLV_AUTHORITY,
    TLV_CRC32C,
    TLV_NETNS,
    TLV_NOOP,
    TLV_SSL,
    TLV_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyDecoder,
    ProxyError,
    ProxyHeader,
    SSLInfo,
    crc32c,
    encode,
    encode_v1,
    encode_v1_unknown,
    encode_v2,
    encode_v2_local,
    parse,
    ssl_tlv,
)

SIG = V2_SIGNATURE.hex()


def h(text: str) -> bytes:
    """Hex with spaces allowed, as the reference writes it."""
    return bytes.fromhex(text.replace(" ", ""))


def parsed(data: bytes, **kw) -> ProxyHeader:
    result = parse(data, **kw)
    assert result is not None, "parse wanted more bytes"
    header, used = result
    assert used == header.length == len(data)
    return header


def fails(data: bytes, match: str, **kw) -> None:
    with pytest.raises(ProxyError, match=match):
        parse(data, **kw)


def fed_bytewise(data: bytes, **kw) -> tuple[ProxyHeader | None, bytes]:
    dec = ProxyDecoder(**kw)
    header = None
    for i in range(len(data)):
        got = dec.feed(data[i : i + 1])
        if header is None:
            header = got
    return header, dec.rest


# --------------------------------------------------------------------------- CRC32C


def test_crc32c_check_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of 0xff
    assert crc32c(bytearray(b"123456789")) == crc32c(memoryview(b"123456789"))


# --------------------------------------------------------------------------- §1.5 vectors: v1

V1_TCP4 = b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 25\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 25\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
FFFF = ":".join(["ffff"] * 8)
V1_WORST = f"PROXY UNKNOWN {FFFF} {FFFF} 65535 65535\r\n".encode()


def test_v1_tcp4_vector_both_ways():
    assert len(V1_TCP4) == 44
    assert encode_v1(("192.0.2.1", 40000), ("198.51.100.2", 25)) == V1_TCP4
    hdr = parsed(V1_TCP4)
    assert (hdr.version, hdr.command, hdr.family, hdr.protocol) == (1, "PROXY", "INET", "STREAM")
    assert hdr.source == ("192.0.2.1", 40000)
    assert hdr.destination == ("198.51.100.2", 25)
    assert hdr.tlvs == () and not hdr.is_local and hdr.tlv_hex() == ""


def test_v1_tcp6_vector_both_ways():
    assert len(V1_TCP6) == 45
    assert encode_v1(("2001:db8::1", 40000), ("2001:db8::2", 25)) == V1_TCP6
    hdr = parsed(V1_TCP6)
    assert (hdr.family, hdr.protocol) == ("INET6", "STREAM")
    assert hdr.source == ("2001:db8::1", 40000)
    assert hdr.destination == ("2001:db8::2", 25)


def test_v1_unknown_short_vector_both_ways():
    assert encode_v1_unknown() == V1_UNKNOWN
    hdr = parsed(V1_UNKNOWN)
    assert (hdr.version, hdr.command, hdr.family, hdr.protocol) == (1, "PROXY", "UNSPEC", "UNSPEC")
    assert hdr.source is None and hdr.destination is None and hdr.is_local
    assert hdr.length == 15


def test_v1_worst_case_107_bytes_is_spec_valid():
    assert len(V1_WORST) == 107
    hdr = parsed(V1_WORST)
    assert hdr.family == "UNSPEC" and hdr.source is None and hdr.length == 107


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (V1_TCP4[:-2] + b"\n", "bare LF"),
        (b"PROXY TCP4 192.0.2.01 198.51.100.2 40000 25\r\n",
         r"v1: leading zero in source address '192\.0\.2\.01'"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 040000 25\r\n",
         "v1: leading zero in source port '040000'"),
    ],
)
def test_v1_invalid_vectors(data, match):
    fails(data, match)


# --------------------------------------------------------------------------- §1.5 vectors: v2

V2_TCP4 = h(f"{SIG} 21 11 000c c0000201 c6336402 9c40 0019")
V2_TCP6 = h(f"{SIG} 21 21 0024 20010db8000000000000000000000001 "
            "20010db8000000000000000000000002 9c40 0019")
V2_LOCAL = h(f"{SIG} 20 00 0000")
V2_AUTH_CRC = h(f"{SIG} 21 11 0024 c0000201 c6336402 9c40 0019 02 000e "
                "6d782e6578616d706c652e6e6574 03 0004 1734ad84")
V2_ALPN_NOOP_UID = h(f"{SIG} 21 11 001f c0000201 c6336402 9c40 0019 01 0004 736d7470 "
                     "04 0003 000000 05 0003 616263")
V2_HAPROXY_OK = h(f"{SIG} 21 11 0026 7f000002 7f000003 0000 6dc5 02 0007 6d782e74657374 "
                  "e0 0006 637573746f6d 03 0004 3edca0c3")
V4 = (("192.0.2.1", 40000), ("198.51.100.2", 25))


def test_v2_tcp4_vector_both_ways():
    assert len(V2_TCP4) == 28
    assert encode_v2(*V4) == V2_TCP4
    assert encode(2, *V4) == V2_TCP4
    hdr = parsed(V2_TCP4)
    assert (hdr.version, hdr.command, hdr.family, hdr.protocol) == (2, "PROXY", "INET", "STREAM")
    assert (hdr.source, hdr.destination) == V4
    assert hdr.tlvs == () and not hdr.is_local


def test_v2_tcp6_vector_both_ways():
    assert len(V2_TCP6) == 52
    assert encode_v2(("2001:db8::1", 40000), ("2001:db8::2", 25)) == V2_TCP6
    hdr = parsed(V2_TCP6)
    assert (hdr.family, hdr.protocol) == ("INET6", "STREAM")
    assert hdr.source == ("2001:db8::1", 40000)
    assert hdr.destination == ("2001:db8::2", 25)


def test_v2_local_vector_both_ways():
    assert encode_v2_local() == V2_LOCAL == b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    hdr = parsed(V2_LOCAL)
    assert (hdr.command, hdr.family, hdr.protocol) == ("LOCAL", "UNSPEC", "UNSPEC")
    assert hdr.source is None and hdr.destination is None and hdr.is_local and hdr.length == 16


def test_v2_authority_and_crc_vector_both_ways():
    assert len(V2_AUTH_CRC) == 52
    assert encode_v2(*V4, tlvs=[TLV(TLV_AUTHORITY, b"mx.example.net")], crc32c=True) == V2_AUTH_CRC
    hdr = parsed(V2_AUTH_CRC)
    assert hdr.authority == "mx.example.net"
    assert hdr.crc32c == 0x1734AD84
    assert hdr.tlv_hex() == "02000e6d782e6578616d706c652e6e6574030004" "1734ad84"


def test_v2_alpn_noop_unique_id_vector_both_ways():
    assert len(V2_ALPN_NOOP_UID) == 47
    tlvs = [TLV(TLV_ALPN, b"smtp"), TLV(TLV_NOOP, b"\0\0\0"), TLV(TLV_UNIQUE_ID, b"abc")]
    assert encode_v2(*V4, tlvs=tlvs) == V2_ALPN_NOOP_UID
    hdr = parsed(V2_ALPN_NOOP_UID)
    assert hdr.tlvs == tuple(tlvs)
    assert (hdr.alpn, hdr.noop, hdr.unique_id) == (b"smtp", b"\0\0\0", b"abc")
    assert hdr.authority is None and hdr.crc32c is None and hdr.ssl is None and hdr.netns is None


def test_v2_haproxy_accepted_vector_with_custom_tlv_and_crc():
    tlvs = [TLV(TLV_AUTHORITY, b"mx.test"), TLV(0xE0, b"custom")]
    assert encode_v2(("127.0.0.2", 0), ("127.0.0.3", 28101), tlvs=tlvs, crc32c=True) \
        == V2_HAPROXY_OK
    hdr = parsed(V2_HAPROXY_OK)
    assert hdr.source == ("127.0.0.2", 0) and hdr.destination == ("127.0.0.3", 28101)
    assert hdr.tlv(0xE0) == TLV(0xE0, b"custom")
    assert hdr.tlv_hex() == "0200076d782e74657374e00006637573746f6d0300043edca0c3"


def test_v2_flipped_crc_byte_is_rejected_unless_verification_is_off():
    bad = V2_HAPROXY_OK[:-1] + bytes([V2_HAPROXY_OK[-1] ^ 0x01])
    fails(bad, r"v2: CRC32C mismatch: header says 0x3edca0c2, computed 0x3edca0c3")
    assert parsed(bad, verify_crc=False).crc32c == 0x3EDCA0C2


def test_v2_family_0x10_parses_as_unspec_transport_but_is_never_encoded():
    data = V2_TCP4[:13] + b"\x10" + V2_TCP4[14:]
    hdr = parsed(data)
    assert (hdr.family, hdr.protocol) == ("INET", "UNSPEC")
    assert hdr.is_local  # unspecified transport: use the real peer
    with pytest.raises(ProxyError, match="STREAM or DGRAM"):
        encode_v2(*V4, protocol="UNSPEC")


# --------------------------------------------------------------------------- HAProxy reg-tests

REG_PREFIX = f"{SIG} 21 11 0014 7f000001 7f000001 002a 0539"


def test_haproxy_regression_valid():
    hdr = parsed(h(f"{REG_PREFIX} 02 0005 3132333435"))
    assert hdr.source == ("127.0.0.1", 42) and hdr.destination == ("127.0.0.1", 1337)
    assert hdr.authority == "12345"


def test_haproxy_regression_tlv_overrun():
    fails(h(f"{REG_PREFIX} 02 000a 31323334353132333435"),
          "TLV 0x02 at offset 28 declares 10 bytes but only 5 remain")


def test_haproxy_regression_tlv_underrun():
    # the TLVs end one byte early; that byte (here the 'G' of the payload) is stray
    fails(h(f"{REG_PREFIX} 02 0004 31323334") + b"GET / HTTP/1.1\r\n",
          r"1 stray byte\(s\) at offset 35")


def test_haproxy_regression_bytes_after_header_are_payload():
    data = h(f"{REG_PREFIX} 02 0005 3132333435 02 0005 3534333231")
    hdr, used = parse(data)
    assert used == 36 and hdr.authority == "12345"
    assert data[used:] == h("02 0005 3534333231")
    dec = ProxyDecoder()
    assert dec.feed(data) == hdr
    assert dec.rest == h("02 0005 3534333231")


# --------------------------------------------------------------------------- v1 strictness

GOOD_V1 = [
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", ("0.0.0.0", 0), ("255.255.255.255", 65535)),
    (b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 4 25\r\n", ("::ffff:192.0.2.1", 4),
     ("2001:db8::2", 25)),
    (b"PROXY TCP6 2001:DB8:0:0::1 :: 1 2\r\n", ("2001:db8::1", 1), ("::", 2)),
]


@pytest.mark.parametrize(("data", "src", "dst"), GOOD_V1)
def test_v1_accepts(data, src, dst):
    hdr = parsed(data)
    assert (hdr.source, hdr.destination) == (src, dst)


def test_v1_unknown_ignores_the_rest_of_the_line():
    for line in (V1_WORST, b"PROXY UNKNOWN whatever \x01 goes\r\n", b"PROXY UNKNOWN \r\n"):
        assert parsed(line).family == "UNSPEC"


V1_BAD = [
    (b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n", "empty source address"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1  2\r\n", "empty destination port"),
    (b"PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n", "no protocol"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n", "unexpected data after the destination port"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n", "unexpected data after the destination port"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n", "ends before the destination port"),
    (b"PROXY TCP4\r\n", "ends before the source address"),
    (b"PROXY \r\n", "no protocol"),
    (b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n", "unknown protocol 'TCP5'"),
    (b"PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n", "unknown protocol 'tcp4'"),
    (b"PROXY UNKNOWNX\r\n", "unknown protocol"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.02 1 2\r\n", "leading zero in destination address"),
    (b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n", "octet above 255"),
    (b"PROXY TCP4 192.0.2 198.51.100.2 1 2\r\n", "not a dotted-quad"),
    (b"PROXY TCP4 192.0.2.1.5 198.51.100.2 1 2\r\n", "not a dotted-quad"),
    (b"PROXY TCP4 192.0..2 198.51.100.2 1 2\r\n", "not a dotted-quad"),
    (b"PROXY TCP4 0x7f.0.0.1 198.51.100.2 1 2\r\n", "not a dotted-quad"),
    (b"PROXY TCP4 2001:db8::1 2001:db8::2 1 2\r\n", "is IPv6 but the protocol is TCP4"),
    (b"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n", "is IPv4 but the protocol is TCP6"),
    (b"PROXY TCP6 2001:db8::1 198.51.100.2 1 2\r\n", "is IPv4 but the protocol is TCP6"),
    (b"PROXY TCP6 2001:db8:::1 ::2 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::2 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP6 ::ffff:192.0.2.01 ::2 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP6 g::1 ::2 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 00 2\r\n", "leading zero in source port '00'"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 025\r\n", "leading zero in destination port '025'"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n", "above 65535"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 100000\r\n", "above 65535"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n", "not a decimal number"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n", "not a decimal number"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n", "bare LF"),
    (b"PROXY UNKNOWN\n", "bare LF"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX", "CR at byte 37 not followed by LF"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\r\n", "not followed by LF"),
    (b"PROXY UNKNOWN\n\r\n", "bare LF"),
    (b"PROXY TCP4 192.0.2.1\t198.51.100.2 1 2\r\n", "not a dotted-quad"),
    (b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n", "not a PROXY header: first byte 0x70"),
    (b"PROXY\tTCP4", r"not a PROXY header: byte 5 is 0x09"),
]


@pytest.mark.parametrize(("data", "match"), V1_BAD)
def test_v1_rejects(data, match):
    fails(data, match)
    with pytest.raises(ProxyError):
        fed_bytewise(data)


# --------------------------------------------------------------------------- early decisions


def test_first_byte_that_starts_no_header_fails_at_once():
    for first in (b"G", b"E", b"\x16", b"\n", b"\x00", b" "):
        fails(first, "not a PROXY header: first byte")
    assert parse(b"") is None
    assert parse(b"P") is None and parse(b"\r") is None
    fails(b"PROXZ", r"byte 4 is 0x5a where 'PROXY ' has 0x59")
    fails(b"\r\n\r\n\x00\r\nQUIx", "byte 10 is 0x78 where the v2 signature has 0x54")
    fails(b"PR\r", "byte 2")


def test_v1_without_crlf_fails_once_107_bytes_cannot_hold_it():
    line = b"PROXY UNKNOWN " + b"x" * 200
    dec = ProxyDecoder()
    for i in range(105):
        assert dec.feed(line[i : i + 1]) is None
    # with 106 bytes and no CR yet the CRLF could end at byte 108 at the earliest
    with pytest.raises(ProxyError, match="no CRLF within the first 107 bytes"):
        dec.feed(line[105:106])
    assert dec.buffered == line[:106]  # kept for the log, nothing more read
    fails(line[:108], "no CRLF within the first 107 bytes")
    fails(line[:106] + b"\r", "no CRLF within the first 107 bytes")  # LF would be byte 108
    assert parse(line[:105] + b"\r") is None
    assert parse(line[:105] + b"\r\n")[1] == 107


def test_v1_rejects_a_bad_field_before_the_line_is_complete():
    for prefix, match in [
        (b"PROXY FOO", "unknown protocol 'FOO'"),
        (b"PROXY TCP4 192.0.2.01", "leading zero"),
        (b"PROXY TCP4 300", "octet above 255"),
        (b"PROXY TCP4 1.2.3.4.", "not a dotted-quad"),
        (b"PROXY TCP4 ::", "is IPv6 but the protocol is TCP4"),
        (b"PROXY TCP6 1.", "is IPv4 but the protocol is TCP6"),
        (b"PROXY TCP6 ::1%", "not an IPv6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 0", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01", "leading zero"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 70000", "above 65535"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", "unexpected data"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r", "ends before the destination port"),
    ]:
        if match is None:
            assert parse(prefix) is None
        else:
            fails(prefix, match)


def test_v2_fixed_part_is_judged_before_the_rest_arrives():
    fails(V2_SIGNATURE + b"\x11", r"v2: version 1 in byte 12 \(0x11\); only 2 exists")
    fails(V2_SIGNATURE + b"\x31", "v2: version 3")
    fails(V2_SIGNATURE + b"\x22", r"v2: command 2 in byte 12")
    fails(V2_SIGNATURE + b"\x2f", "v2: command 15")
    fails(V2_SIGNATURE + b"\x21\x41", "unknown address family 4")
    fails(V2_SIGNATURE + b"\x21\x13", "unknown transport protocol 3")
    assert parse(V2_SIGNATURE + b"\x21\x11\x10") is None
    fails(V2_SIGNATURE + b"\x21\x11\x10\x01", "length 4097 is above the limit of 4096")
    fails(V2_SIGNATURE + b"\x21\x11\x00\x0d", "above the limit of 12", max_v2_length=12)
    fails(V2_SIGNATURE + b"\x21\x11\x00\x0b", r"length 11 is too short for the INET address")
    fails(V2_SIGNATURE + b"\x21\x21\x00\x0c", "too short for the INET6 address block")
    fails(V2_SIGNATURE + b"\x21\x31\x00\xd7", r"too short for the UNIX address block \(216")
    fails(V2_SIGNATURE + b"\x20\x11\x00\x00", "too short for the INET address block")
    assert parse(V2_SIGNATURE + b"\x21\x11\x00\x0c") is None  # waits for the addresses
    assert parse(V2_SIGNATURE + b"\x21\x11\xff\xff", max_v2_length=65535) is None


# --------------------------------------------------------------------------- v2 strictness


def v2(fam: int, body: bytes, cmd: int = 0x21) -> bytes:
    return V2_SIGNATURE + bytes((cmd, fam)) + len(body).to_bytes(2, "big") + body


ADDR4 = h("c0000201 c6336402 9c40 0019")


def test_v2_tlv_walk_must_end_exactly():
    fails(v2(0x11, ADDR4 + b"\x02\x00"), r"2 stray byte\(s\) at offset 28")
    fails(v2(0x11, ADDR4 + b"\x02"), r"1 stray byte\(s\)")
    fails(v2(0x11, ADDR4 + b"\xe0\x00\x01"), "TLV 0xe0 at offset 28 declares 1 bytes but only 0")
    fails(v2(0x11, ADDR4 + b"\xe0\x00\x00\x02\x00\x02a"), "TLV 0x02 at offset 31 declares 2")
    assert parsed(v2(0x11, ADDR4 + b"\xe0\x00\x00")).tlvs == (TLV(0xE0, b""),)


def test_v2_crc32c_tlv_rules():
    fails(v2(0x11, ADDR4 + h("03 0005 0000000000")), "CRC32C TLV is 5 bytes; it must be 4")
    fails(v2(0x11, ADDR4 + h("03 0003 000000")), "CRC32C TLV is 3 bytes")
    fails(v2(0x11, ADDR4 + h("03 0004 00000000 03 0004 00000000")), "2 CRC32C TLVs",
          verify_crc=False)
    # a CRC over a LOCAL header is verified too
    local = encode_v2_local(crc32c=True)
    assert parsed(local).command == "LOCAL"
    fails(local[:-1] + bytes([local[-1] ^ 0x80]), "CRC32C mismatch")


def test_v2_tlv_contents_are_checked():
    fails(v2(0x11, ADDR4 + TLV(TLV_UNIQUE_ID, b"x" * 129).encode()),
          "UNIQUE_ID TLV is 129 bytes")
    assert parsed(v2(0x11, ADDR4 + TLV(TLV_UNIQUE_ID, b"x" * 128).encode())).unique_id == b"x" * 128
    fails(v2(0x11, ADDR4 + TLV(TLV_AUTHORITY, b"\xff\xfe").encode()),
          r"AUTHORITY TLV is not valid UTF-8: '\\xff\\xfe'")
    fails(v2(0x11, ADDR4 + TLV(TLV_NETNS, "ns\u00e9".encode()).encode()), "NETNS TLV is not valid")
    assert parsed(v2(0x11, ADDR4 + TLV(TLV_AUTHORITY, "mx.ex\u00e9.net".encode()).encode())
                  ).authority == "mx.ex\u00e9.net"
    assert parsed(v2(0x11, ADDR4 + TLV(TLV_NETNS, b"blue").encode())).netns == "blue"


def test_v2_ssl_tlv_and_sub_tlvs():
    value = (bytes([CLIENT_SSL | CLIENT_CERT_CONN]) + (0).to_bytes(4, "big")
             + TLV(SSL_VERSION, b"TLSv1.3").encode() + TLV(SSL_CN, "B\u00f6b".encode()).encode()
             + TLV(SSL_CIPHER, b"TLS_AES_256_GCM_SHA384").encode()
             + TLV(SSL_SIG_ALG, b"RSA-SHA256").encode() + TLV(SSL_KEY_ALG, b"RSA2048").encode()
             + TLV(0x2F, b"future").encode())
    hdr = parsed(v2(0x11, ADDR4 + TLV(TLV_SSL, value).encode()))
    info = hdr.ssl
    assert info == SSLInfo(client=3, verify=0, version="TLSv1.3", cn="B\u00f6b",
                           cipher="TLS_AES_256_GCM_SHA384", sig_alg="RSA-SHA256",
                           key_alg="RSA2048", raw_subtlvs=info.raw_subtlvs)
    assert info.client_ssl and info.verified
    assert [t.type for t in info.raw_subtlvs] == [0x21, 0x22, 0x23, 0x24, 0x25, 0x2F]
    assert ssl_tlv(3, 0, version="TLSv1.3", cn="B\u00f6b", cipher="TLS_AES_256_GCM_SHA384",
                   sig_alg="RSA-SHA256", key_alg="RSA2048",
                   extra=[TLV(0x2F, b"future")]) == TLV(TLV_SSL, value)
    bare = parsed(v2(0x11, ADDR4 + TLV(TLV_SSL, b"\x01\x00\x00\x00\x01").encode())).ssl
    assert bare == SSLInfo(1, 1, None, None, None, None, None, ())
    assert not bare.verified


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (b"\x01\x00\x00\x00", "SSL TLV is 4 bytes; it needs at least 5"),
        (b"\x01\x00\x00\x00\x00\x21\x00\x05TLS", "SSL sub-TLV 0x21 at offset 5 declares 5 bytes"),
        (b"\x01\x00\x00\x00\x00\x21\x00", r"2 stray byte\(s\) at offset 5, too short for a SSL"),
        (b"\x01\x00\x00\x00\x00\x21\x00\x01\xff", "SSL sub-TLV 0x21 is not valid ASCII"),
        (b"\x01\x00\x00\x00\x00\x22\x00\x01\xff", "SSL sub-TLV 0x22 is not valid UTF-8"),
    ],
)
def test_v2_ssl_tlv_rejects(value, match):
    fails(v2(0x11, ADDR4 + TLV(TLV_SSL, value).encode()), match)


def test_v2_local_ignores_addresses_but_honours_len():
    # LOCAL with an INET address block and a TLV: addresses skipped, TLV kept, payload untouched
    data = v2(0x11, ADDR4 + TLV(0xE1, b"hc").encode(), cmd=0x20)
    hdr, used = parse(data + b"EHLO x\r\n")
    assert used == len(data) == 16 + 12 + 5
    assert (hdr.command, hdr.family, hdr.source, hdr.destination) == ("LOCAL", "INET", None, None)
    assert hdr.is_local and hdr.tlvs == (TLV(0xE1, b"hc"),)
    hdr = parsed(v2(0x00, b"\x04\x00\x02ab", cmd=0x20))
    assert hdr.noop == b"ab" and hdr.length == 21


def test_v2_proxy_with_unspec_family_means_real_peer():
    hdr = parsed(v2(0x00, b"", cmd=0x21))
    assert hdr.command == "PROXY" and hdr.source is None and hdr.is_local


def test_v2_dgram_and_unix():
    hdr = parsed(encode_v2(*V4, protocol="DGRAM"))
    assert (hdr.family, hdr.protocol, hdr.source) == ("INET", "DGRAM", V4[0])
    assert encode_v2(*V4, protocol="DGRAM")[13] == 0x12
    src = b"/run/haproxy.sock".ljust(108, b"\0")
    dst = b"/var/spool/ferry/in\0garbage".ljust(108, b"\0")
    hdr = parsed(v2(0x31, src + dst))
    assert (hdr.family, hdr.protocol) == ("UNIX", "STREAM")
    assert (hdr.source, hdr.destination) == ("/run/haproxy.sock", "/var/spool/ferry/in")
    assert parsed(v2(0x32, bytes(216))).source == ""  # abstract / unnamed socket
    fails(v2(0x31, b"x" * 108 + dst), "UNIX source path is not NUL-terminated within 108 bytes")
    fails(v2(0x31, src + b"y" * 108), "UNIX destination path is not NUL-terminated")


def test_v2_ipv4_mapped_ipv6_is_shown_in_dotted_form():
    hdr = parsed(encode_v2(("::ffff:192.0.2.1", 1), ("2001:db8::2", 25)))
    assert hdr.source == ("::ffff:192.0.2.1", 1) and hdr.family == "INET6"


def test_v2_unknown_tlvs_are_kept_in_order():
    tlvs = [TLV(0xEE, b"\x01aws"), TLV(0xF0, b""), TLV(0x10, b"x" * 300)]
    hdr = parsed(encode_v2(*V4, tlvs=tlvs, crc32c=True))
    assert hdr.tlvs[:3] == tuple(tlvs) and hdr.tlvs[3].type == TLV_CRC32C
    assert hdr.tlv_hex().startswith("ee000401617773f0000010012c")


# --------------------------------------------------------------------------- incremental


ALL_VALID = [V1_TCP4, V1_TCP6, V1_UNKNOWN, V1_WORST, V2_TCP4, V2_TCP6, V2_LOCAL, V2_AUTH_CRC,
             V2_ALPN_NOOP_UID, V2_HAPROXY_OK]


@pytest.mark.parametrize("data", ALL_VALID)
def test_bytewise_feeding_equals_one_feed(data):
    payload = b"220 ready?\r\nEHLO x\r\n"
    one = ProxyDecoder()
    header = one.feed(data + payload)
    assert header is not None and one.rest == payload
    assert fed_bytewise(data + payload) == (header, payload)
    for i in range(len(data)):  # every strict prefix just asks for more
        assert parse(data[:i]) is None


def test_decoder_after_the_header_and_after_an_error():
    dec = ProxyDecoder()
    assert dec.feed(V1_TCP4[:10]) is None
    assert dec.rest == b""
    hdr = dec.feed(V1_TCP4[10:] + b"EHLO")
    assert dec.header == hdr and dec.rest == b"EHLO"
    assert dec.feed(b" x\r\n") == hdr and dec.rest == b"EHLO x\r\n"
    bad = ProxyDecoder()
    with pytest.raises(ProxyError, match="bare LF"):
        bad.feed(b"PROXY UNKNOWN\n")
    with pytest.raises(ProxyError, match="bare LF"):
        bad.feed(b"more")
    assert bad.header is None and bad.buffered == b"PROXY UNKNOWN\n"


def test_decoder_passes_its_limits_on():
    big = encode_v2(*V4, tlvs=[TLV(0xE0, b"x" * 5000)])
    with pytest.raises(ProxyError, match="above the limit of 4096"):
        ProxyDecoder().feed(big[:16])
    assert ProxyDecoder(max_v2_length=65535).feed(big).tlvs[0].value == b"x" * 5000
    bad_crc = V2_AUTH_CRC[:-1] + b"\x00"
    assert ProxyDecoder(verify_crc=False).feed(bad_crc) is not None
    with pytest.raises(ProxyError, match="CRC32C mismatch"):
        ProxyDecoder().feed(bad_crc)


# --------------------------------------------------------------------------- encoders


@pytest.mark.parametrize(
    ("src", "dst", "match"),
    [
        (("192.0.2.1", 1), ("2001:db8::2", 2), r"mixed address families \(source IPv4"),
        (("192.0.2.1", 65536), ("192.0.2.2", 2), "source port must be an integer 0..65535"),
        (("192.0.2.1", -1), ("192.0.2.2", 2), "source port"),
        (("192.0.2.1", True), ("192.0.2.2", 2), "source port"),
        (("192.0.2.1", "25"), ("192.0.2.2", 2), "source port"),
        (("192.0.2.1", 1), ("mx.example.net", 2), "destination address 'mx.example.net' is not"),
        (("192.0.2.01", 1), ("192.0.2.2", 2), "not an IP address"),
        ((3232235521, 1), ("192.0.2.2", 2), "must be an IP address string"),
        (("fe80::1%eth0", 1), ("fe80::2", 2), "scope id"),
        ("192.0.2.1:25", ("192.0.2.2", 2), r"source must be \(ip, port\)"),
    ],
)
def test_encoders_reject_bad_endpoints(src, dst, match):
    for enc in (encode_v1, encode_v2):
        with pytest.raises(ProxyError, match=match):
            enc(src, dst)


def test_encode_accepts_ipaddress_objects_and_dispatches():
    src = (ipaddress.ip_address("192.0.2.1"), 40000)
    dst = (ipaddress.ip_address("198.51.100.2"), 25)
    assert encode(1, src, dst) == V1_TCP4 and encode(2, src, dst) == V2_TCP4
    with pytest.raises(ProxyError, match="version must be 1 or 2"):
        encode(3, *V4)


def test_encode_v1_writes_mapped_addresses_as_haproxy_does():
    line = encode_v1(("::ffff:192.0.2.1", 4), ("::ffff:198.51.100.2", 25))
    assert line == b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:198.51.100.2 4 25\r\n"


def test_encode_v2_refuses_what_parse_would_refuse():
    with pytest.raises(ProxyError, match="pass crc32c=True"):
        encode_v2(*V4, tlvs=[TLV(TLV_CRC32C, b"\0\0\0\0")])
    with pytest.raises(ProxyError, match="UNIQUE_ID TLV is 129 bytes"):
        encode_v2(*V4, tlvs=[TLV(TLV_UNIQUE_ID, b"u" * 129)])
    with pytest.raises(ProxyError, match="SSL TLV is 2 bytes"):
        encode_v2_local(tlvs=[TLV(TLV_SSL, b"\x01\x00")])
    with pytest.raises(ProxyError, match="TLV instances"):
        encode_v2(*V4, tlvs=[(2, b"mx")])
    with pytest.raises(ProxyError, match=r"max 65535"):
        encode_v2(*V4, tlvs=[TLV(0xE0, b"x" * 65535)])
    with pytest.raises(ProxyError, match="must be ASCII"):
        ssl_tlv(1, version="TLSv1.3\u00e9")


def test_tlv_validation():
    with pytest.raises(ProxyError, match=r"type must be 0\.\.255"):
        TLV(256, b"")
    with pytest.raises(ProxyError, match="value must be bytes"):
        TLV(2, "mx.example.net")
    with pytest.raises(ProxyError, match="65536 bytes"):
        TLV(2, b"x" * 65536)
    assert TLV(2, bytearray(b"mx")) == TLV(2, b"mx")


def test_encode_v2_local_with_tlvs_and_crc():
    data = encode_v2_local(tlvs=[TLV(TLV_NOOP, b"pad")], crc32c=True)
    assert data[12:14] == b"\x20\x00" and int.from_bytes(data[14:16], "big") == 6 + 7
    hdr = parsed(data)
    assert hdr.command == "LOCAL" and hdr.noop == b"pad" and hdr.crc32c is not None


# --------------------------------------------------------------------------- properties

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4)
ipv6 = st.one_of(st.ip_addresses(v=6),
                 ipv4.map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")))
endpoint_pairs = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)
text_tlv = st.text(max_size=40)
tlv_items = st.one_of(
    st.builds(TLV, st.sampled_from([0x00, 0x01, 0x04, 0x06, 0x10, 0x31, 0xE0, 0xEF, 0xF0, 0xFF]),
              st.binary(max_size=120)),
    st.builds(TLV, st.just(TLV_AUTHORITY), text_tlv.map(lambda s: s.encode())),
    st.builds(TLV, st.just(TLV_UNIQUE_ID), st.binary(max_size=128)),
    st.builds(TLV, st.just(TLV_NETNS), st.text("abcdefgh-_0123", max_size=20).map(str.encode)),
    st.builds(lambda c, v, ver, cn: ssl_tlv(c, v, version=ver, cn=cn),
              st.integers(0, 255), st.integers(0, 2**32 - 1),
              st.none() | st.sampled_from(["TLSv1.2", "TLSv1.3"]), st.none() | text_tlv),
)


def as_endpoint(pair):
    ip, port = pair
    return (str(ip), port)


@given(endpoint_pairs, st.binary(max_size=20))
def test_v1_round_trip(pair, payload):
    src, dst = as_endpoint(pair[0]), as_endpoint(pair[1])
    data = encode_v1(src, dst)
    assert len(data) <= 107
    hdr, used = parse(data + payload)
    assert used == len(data)
    assert ipaddress.ip_address(hdr.source[0]) == pair[0][0] and hdr.source[1] == pair[0][1]
    assert ipaddress.ip_address(hdr.destination[0]) == pair[1][0]
    assert hdr.destination[1] == pair[1][1]
    assert hdr.family == ("INET" if pair[0][0].version == 4 else "INET6")
    assert encode_v1(hdr.source, hdr.destination) == data  # the encoder writes canonical text


@settings(max_examples=150)
@given(endpoint_pairs, st.lists(tlv_items, max_size=6), st.booleans(), st.booleans(),
       st.binary(max_size=20))
def test_v2_round_trip(pair, tlvs, with_crc, local, payload):
    src, dst = as_endpoint(pair[0]), as_endpoint(pair[1])
    data = (encode_v2_local(tlvs, crc32c=with_crc) if local
            else encode_v2(src, dst, tlvs=tlvs, crc32c=with_crc))
    hdr, used = parse(data + payload)
    assert used == len(data) == hdr.length
    body = hdr.tlvs[:-1] if with_crc else hdr.tlvs
    assert body == tuple(tlvs)
    if with_crc:
        assert hdr.tlvs[-1].type == TLV_CRC32C and hdr.crc32c is not None
    if local:
        assert hdr.command == "LOCAL" and hdr.source is None
    else:
        assert ipaddress.ip_address(hdr.source[0]) == pair[0][0]
        assert (hdr.source[1], hdr.destination[1]) == (pair[0][1], pair[1][1])
        assert ipaddress.ip_address(hdr.destination[0]) == pair[1][0]
        assert encode_v2(hdr.source, hdr.destination, tlvs=body, crc32c=with_crc) == data
    if any(t.type == TLV_SSL for t in tlvs):
        assert hdr.ssl is not None
    assert data.endswith(bytes.fromhex(hdr.tlv_hex()))


@settings(max_examples=150)
@given(endpoint_pairs, st.lists(tlv_items, max_size=3), st.data())
def test_v2_any_single_byte_change_is_caught_by_the_crc(pair, tlvs, data):
    raw = encode_v2(as_endpoint(pair[0]), as_endpoint(pair[1]), tlvs=tlvs, crc32c=True)
    i = data.draw(st.integers(0, len(raw) - 1))
    x = data.draw(st.integers(1, 255))
    bad = raw[:i] + bytes([raw[i] ^ x]) + raw[i + 1 :]
    try:
        result = parse(bad + bytes(300), max_v2_length=65535)
    except ProxyError:
        return
    # it can only get through by changing the extent or by un-making the CRC32C TLV itself
    assert result is None or result[1] != len(raw) or result[0].crc32c is None


garbage = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b"\x21" + b),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.text("PROXYTCP46UNKW :.0123456789abcdef\r\n", max_size=120).map(str.encode),
    st.sampled_from(ALL_VALID).flatmap(
        lambda v: st.tuples(st.integers(0, len(v) - 1), st.binary(min_size=1, max_size=3)).map(
            lambda t: v[: t[0]] + t[1] + v[t[0] + len(t[1]) :])),
)


@settings(max_examples=500)
@given(garbage)
def test_arbitrary_bytes_only_ever_raise_proxy_error(data):
    try:
        result = parse(data)
    except ProxyError:
        result = "error"
    if result not in (None, "error"):
        header, used = result
        assert 0 < used == header.length <= len(data)
    try:
        header, rest = fed_bytewise(data)
        bytewise = header
    except ProxyError:
        bytewise = "error"
    if result in (None, "error"):
        assert bytewise == result
    else:
        assert bytewise == result[0] and rest == data[result[1] :]
