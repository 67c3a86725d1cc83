"""The PROXY spec's MUST/SHOULD sentences, one test per row of docs/proxy-conformance.md
(codec rows here; receiver rows that need a socket in tests/integration/
test_proxy_conformance.py). Test names carry the row id."""

from __future__ import annotations

import pytest

from ferrymail.config import ServerTimeouts
from ferrymail.delivery.pool import PoolKey
from ferrymail.proxy import (
    TLV,
    TLV_NOOP,
    V2_SIGNATURE,
    ProxyDecoder,
    ProxyError,
    crc32c,
    encode,
    encode_v1,
    encode_v2,
    encode_v2_local,
    parse,
)

V4 = (("192.0.2.1", 4000), ("198.51.100.2", 25))
V6 = (("2001:db8::1", 4000), ("2001:db8::2", 25))
ADDR4 = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + (4000).to_bytes(2, "big") + (25).to_bytes(2, "big")


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + len(body).to_bytes(2, "big") + body


def refused(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data)


# -- general


def test_g1_one_receiver_implements_both_formats():
    for header in (encode_v1(*V4), encode_v2(*V4)):
        hdr, used = parse(header + b"EHLO x\r\n")
        assert hdr.stream_source == V4[0] and used == len(header)


def test_g2_sender_builds_each_header_as_one_buffer_within_536_bytes():
    # The connector writes this one buffer before anything else (see
    # tests/integration/test_outbound_connect.py::test_proxy_header_is_the_first_thing_written).
    for version in (1, 2):
        for pair in (V4, V6):
            header = encode(version, *pair)
            assert isinstance(header, bytes) and len(header) <= 536


def test_g3_partial_headers_are_tolerated_byte_by_byte():
    for header in (encode_v1(*V6), encode_v2(*V6, tlvs=[TLV(0xE0, b"x" * 40)], crc32c=True)):
        dec = ProxyDecoder()
        for i in range(len(header) - 1):
            assert dec.feed(header[i:i + 1]) is None
        assert dec.feed(header[-1:] + b"EHLO") is not None and dec.rest == b"EHLO"


def test_g5_header_timeout_default_covers_a_tcp_retransmit():
    assert ServerTimeouts().proxy >= 3.0


def test_g8_pooled_outbound_connections_never_mix_sources():
    # A reused connection must keep carrying the client its PROXY header named: the pool
    # key holds the source (IP, HELO, proxy), so sessions of different sources never mix.
    assert "source" in PoolKey.__dataclass_fields__


# -- version 1


def test_v1a_fields_are_separated_by_exactly_one_space():
    refused(b"PROXY TCP4  192.0.2.1 198.51.100.2 4000 25\r\n")
    refused(b"PROXY TCP4 192.0.2.1 198.51.100.2 4000 25 \r\n")
    refused(b"PROXY\tTCP4 192.0.2.1 198.51.100.2 4000 25\r\n")


def test_v1b_unknown_ignores_the_rest_of_the_line():
    line = b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n"
    hdr, used = parse(line + b"EHLO")
    assert hdr.stream_source is None and used == len(line)


@pytest.mark.parametrize("src", ["192.0.2.01", "192.0.2.256", "192.0.2", "192.0.2.1.5",
                                 "192.0.2.\u0661", "0x7f.0.0.1", "192.0.2.-1"])
def test_v1c_ipv4_is_four_decimal_octets_without_leading_zeros(src):
    refused(f"PROXY TCP4 {src} 198.51.100.2 4000 25\r\n".encode())


@pytest.mark.parametrize("src", ["1:2:3", "1::2::3", "2001:db8::1::", "12345::1", "g::1"])
def test_v1d_ipv6_decodes_to_exactly_128_bits(src):
    refused(f"PROXY TCP6 {src} 2001:db8::2 4000 25\r\n".encode())


def test_v1e_both_addresses_match_the_announced_family():
    refused(b"PROXY TCP4 192.0.2.1 2001:db8::2 4000 25\r\n")
    refused(b"PROXY TCP6 2001:db8::1 198.51.100.2 4000 25\r\n")


@pytest.mark.parametrize("port", ["65536", "025", "-1", "\u00b25", "99999999", ""])
def test_v1f_ports_are_0_to_65535_without_leading_zeros(port):
    refused(f"PROXY TCP4 192.0.2.1 198.51.100.2 {port} 25\r\n".encode())
    assert parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 0 25\r\n")[0].source == ("192.0.2.1", 0)


def test_v1g_nothing_is_decoded_before_the_crlf():
    line = encode_v1(*V4)
    assert parse(line[:-1]) is None and parse(line[:-2]) is None


def test_v1h_no_crlf_within_107_bytes_is_invalid():
    refused(b"PROXY UNKNOWN " + b"x" * 93)  # 107 bytes, no CRLF
    assert parse(b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n")[1] == 107


@pytest.mark.parametrize("end", [b"\n", b"\r", b"\rX", b"\n\r"])
def test_v1i_a_lone_cr_or_lf_never_ends_the_line(end):
    refused(b"PROXY TCP4 192.0.2.1 198.51.100.2 4000 25" + end + b"EHLO x\r\n")


def test_v1k_we_never_send_unknown_as_the_initiator():
    for pair in (V4, V6):
        assert encode(1, *pair).startswith((b"PROXY TCP4 ", b"PROXY TCP6 "))


# -- version 2


@pytest.mark.parametrize("ver", [0x0, 0x1, 0x3, 0xF])
def test_v2a_only_version_2_is_accepted(ver):
    refused(v2(ver << 4 | 1, 0x11, ADDR4))


def test_v2b_local_uses_the_real_endpoints_and_discards_the_block_and_family():
    hdr, used = parse(v2(0x20, 0x11, ADDR4) + b"EHLO")
    assert hdr.command == "LOCAL" and hdr.source is None and hdr.stream_source is None
    assert used == 16 + 12


def test_v2c_proxy_uses_the_address_block():
    assert parse(encode_v2(*V4))[0].stream_source == V4[0]
    assert parse(encode_v2(*V6))[0].stream_source == V6[0]


@pytest.mark.parametrize("cmd", [0x2, 0x3, 0xF])
def test_v2d_unassigned_commands_are_dropped(cmd):
    refused(v2(0x20 | cmd, 0x11, ADDR4))


@pytest.mark.parametrize("fam", [0x41, 0x51, 0xF1])
def test_v2e_unspecified_families_are_rejected(fam):
    refused(v2(0x21, fam, bytes(216)))


@pytest.mark.parametrize("fam", [0x13, 0x1F, 0x03])
def test_v2f_unspecified_transport_protocols_are_rejected(fam):
    refused(v2(0x21, fam, bytes(216)))


@pytest.mark.parametrize("fam", [0x00, 0x01, 0x10])
def test_v2g_unspec_family_or_protocol_accepts_and_ignores_the_addresses(fam):
    hdr, _ = parse(v2(0x21, fam, ADDR4 if fam >> 4 else b""))
    assert hdr.command == "PROXY" and hdr.stream_source is None


def test_v2h_local_with_unspec_is_accepted_and_addresses_ignored():
    hdr, used = parse(encode_v2_local() + b"EHLO")
    assert hdr.command == "LOCAL" and hdr.stream_source is None and used == 16


@pytest.mark.parametrize("fam,block", [(0x12, ADDR4), (0x22, bytes(36)), (0x31, bytes(216)),
                                       (0x32, bytes(216))])
def test_v2i_combinations_a_tcp_listener_cannot_carry_fall_back_to_unspec(fam, block):
    hdr, _ = parse(v2(0x21, fam, block))
    assert hdr.command == "PROXY" and hdr.stream_source is None


def test_v2j_len_is_always_honoured_also_for_local():
    body = ADDR4 + TLV(0xE1, b"hc").encode()
    hdr, used = parse(v2(0x20, 0x11, body) + b"EHLO x\r\n")
    assert used == 16 + len(body) and hdr.stream_source is None


def test_v2k_partial_headers_parse_nothing_and_are_never_accepted():
    header = encode_v2(*V6, crc32c=True)
    for cut in range(len(header)):
        assert parse(header[:cut]) is None


def test_v2l_neither_signature_drops_the_connection_at_once():
    refused(b"EHLO x\r\n")
    refused(b"\r\n\r\n\x00\r\nQUIX\n")
    refused(b"PROXZ")


def test_v2m_crc32c_mismatch_makes_the_header_invalid():
    header = bytearray(encode_v2(*V4, crc32c=True))
    assert parse(bytes(header))[0].crc32c == crc32c(bytes(header[:-4]) + bytes(4))
    header[-1] ^= 0x01
    refused(bytes(header))


def test_v2n_noop_tlv_is_ignored():
    hdr, _ = parse(encode_v2(*V4, tlvs=[TLV(TLV_NOOP, b"\0\0\0")]))
    assert hdr.stream_source == V4[0] and hdr.noop == b"\0\0\0"


def test_v2o_senders_emit_only_assigned_values_and_no_address_for_local():
    for pair in (V4, V6):
        header = encode_v2(*pair)
        assert header[12] == 0x21 and header[13] in (0x11, 0x21)
    local = encode_v2_local()
    assert local[12:16] == b"\x20\x00\x00\x00"


def test_v2p_sender_crc_is_computed_over_the_header_with_the_field_zeroed():
    header = encode_v2(*V6, tlvs=[TLV(0xE0, b"abc")], crc32c=True)
    assert int.from_bytes(header[-4:], "big") == crc32c(header[:-4] + bytes(4))


def test_every_row_of_the_review_has_its_test_and_every_test_its_row():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "proxy-conformance.md").read_text()
    rows = re.findall(r"^\| (g\d+|v[12][a-z]) \|", doc, re.M)
    unit = (root / "tests" / "unit" / "test_proxy_conformance.py").read_text()
    integ = (root / "tests" / "integration" / "test_proxy_conformance.py").read_text()
    tests = set(re.findall(r"^def test_(g\d+|v[12][a-z])_", unit + integ, re.M))
    assert len(rows) == len(set(rows)) >= 30
    assert set(rows) == tests, (set(rows) ^ tests)
    for ref in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", doc):
        assert f"def {ref[1]}(" in (root / ref[0]).read_text(), ref
