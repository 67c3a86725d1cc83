"""PROXY protocol v1/v2 codec, sans-IO: bytes -> (header, consumed); addresses -> bytes.

Follows haproxy's ``doc/proxy-protocol.txt`` strictly and emits only what HAProxy 2.6 accepts
(v2 family byte 0x11/0x21, never 0x10; v1 ``UNKNOWN`` in its short form only). ``parse`` decides
as early as the bytes allow: garbage is refused at its first wrong byte, and nothing beyond the
protocol's limits is ever buffered.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ferrymail.abnf import decimal, is_digits

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # longest valid v1 line, CRLF included
DEFAULT_MAX_V2_LENGTH = 4096

# TLV types (PP2_TYPE_*) and SSL sub-TLV types (PP2_SUBTYPE_SSL_*)
TLV_ALPN = 0x01
TLV_AUTHORITY = 0x02
TLV_CRC32C = 0x03
TLV_NOOP = 0x04
TLV_UNIQUE_ID = 0x05
TLV_SSL = 0x20
TLV_NETNS = 0x30
SSL_VERSION = 0x21
SSL_CN = 0x22
SSL_CIPHER = 0x23
SSL_SIG_ALG = 0x24
SSL_KEY_ALG = 0x25
# bits of SSLInfo.client
CLIENT_SSL = 0x01
CLIENT_CERT_CONN = 0x02
CLIENT_CERT_SESS = 0x04

MAX_UNIQUE_ID = 128

_FAMILIES = {0: "UNSPEC", 1: "INET", 2: "INET6", 3: "UNIX"}
_PROTOCOLS = {0: "UNSPEC", 1: "STREAM", 2: "DGRAM"}
_ADDR_LEN = {0: 0, 1: 12, 2: 36, 3: 216}
_UNIX_PATH = 108
_V1_PROTOS = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_FIELDS = ("source address", "destination address", "source port", "destination port")
_HEX = b"0123456789abcdefABCDEF"


class ProxyError(ValueError):
    """An invalid PROXY header (or values that cannot be encoded); the message says what."""


# --------------------------------------------------------------------------- CRC32C


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (Castagnoli, RFC 4960 appendix B) of `data`."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class TLV:
    """One v2 type-length-value record."""

    type: int
    value: bytes

    def __post_init__(self) -> None:
        if isinstance(self.value, bytearray | memoryview):
            object.__setattr__(self, "value", bytes(self.value))
        if not isinstance(self.value, bytes):
            raise ProxyError(f"TLV value must be bytes, not {type(self.value).__name__}")
        if not isinstance(self.type, int) or not 0 <= self.type <= 0xFF:
            raise ProxyError(f"TLV type must be 0..255, got {self.type!r}")
        if len(self.value) > 0xFFFF:
            raise ProxyError(f"TLV 0x{self.type:02x} value is {len(self.value)} bytes (max 65535)")

    def encode(self) -> bytes:
        return bytes((self.type,)) + len(self.value).to_bytes(2, "big") + self.value


@dataclass(frozen=True)
class SSLInfo:
    """The PP2_TYPE_SSL TLV: client bits, verify result and the decoded sub-TLVs."""

    client: int
    verify: int
    version: str | None
    cn: str | None
    cipher: str | None
    sig_alg: str | None
    key_alg: str | None
    raw_subtlvs: tuple[TLV, ...]

    @property
    def client_ssl(self) -> bool:
        return bool(self.client & CLIENT_SSL)

    @property
    def verified(self) -> bool:
        """True when the client presented a certificate and it verified (verify == 0)."""
        return bool(self.client & (CLIENT_CERT_CONN | CLIENT_CERT_SESS)) and self.verify == 0


@dataclass(frozen=True)
class ProxyHeader:
    """A decoded PROXY header (v1 or v2)."""

    version: int
    command: str  # "PROXY" or "LOCAL"
    family: str  # "INET", "INET6", "UNIX", "UNSPEC"
    protocol: str  # "STREAM", "DGRAM", "UNSPEC"
    source: tuple[str, int] | str | None
    destination: tuple[str, int] | str | None
    tlvs: tuple[TLV, ...] = ()
    length: int = 0

    def tlv(self, type_: int) -> TLV | None:
        """The first TLV of `type_`, if any."""
        return next((t for t in self.tlvs if t.type == type_), None)

    @property
    def is_local(self) -> bool:
        """The header names no usable client: use the real peer addresses."""
        return self.command == "LOCAL" or self.family == "UNSPEC" or self.protocol == "UNSPEC"

    @property
    def stream_source(self) -> tuple[str, int] | None:
        """The client a TCP receiver may take from this header, or None for "use the real
        connection endpoints".

        Only a PROXY command for TCP over IPv4/IPv6 names one. LOCAL (the spec: "must use
        the real connection endpoints and discard the protocol block"), UNSPEC, and the
        valid combinations a TCP listener cannot carry (UDP: ``\\x12``/``\\x22``, UNIX)
        fall back to UNSPEC mode, whose address information "should" be ignored.
        """
        if (self.command != "PROXY" or self.protocol != "STREAM"
                or self.family not in ("INET", "INET6") or not isinstance(self.source, tuple)):
            return None
        return self.source

    @property
    def alpn(self) -> bytes | None:
        t = self.tlv(TLV_ALPN)
        return None if t is None else t.value

    @property
    def authority(self) -> str | None:
        t = self.tlv(TLV_AUTHORITY)
        return None if t is None else _text(t.value, "utf-8", "AUTHORITY TLV")

    @property
    def crc32c(self) -> int | None:
        t = self.tlv(TLV_CRC32C)
        return None if t is None else int.from_bytes(t.value, "big")

    @property
    def noop(self) -> bytes | None:
        t = self.tlv(TLV_NOOP)
        return None if t is None else t.value

    @property
    def unique_id(self) -> bytes | None:
        t = self.tlv(TLV_UNIQUE_ID)
        return None if t is None else t.value

    @property
    def netns(self) -> str | None:
        t = self.tlv(TLV_NETNS)
        return None if t is None else _text(t.value, "ascii", "NETNS TLV")

    @property
    def ssl(self) -> SSLInfo | None:
        t = self.tlv(TLV_SSL)
        return None if t is None else _parse_ssl(t.value)

    def tlv_hex(self) -> str:
        """All TLVs as they were on the wire, hex-encoded (Halon's `proxytlv`)."""
        return "".join(t.encode().hex() for t in self.tlvs)


# --------------------------------------------------------------------------- parsing


def parse(
    buf: bytes | bytearray | memoryview,
    *,
    verify_crc: bool = True,
    max_v2_length: int = DEFAULT_MAX_V2_LENGTH,
) -> tuple[ProxyHeader, int] | None:
    """Decode the PROXY header at the start of `buf`.

    Returns None while more bytes are needed, ``(header, consumed)`` once the header is
    complete (bytes after `consumed` are payload), and raises ProxyError as soon as the bytes
    seen so far cannot start a valid header.
    """
    n = len(buf)
    if n == 0:
        return None
    head = bytes(buf[:16])
    k = min(n, len(V1_PREFIX))
    if head[:k] == V1_PREFIX[:k]:
        return None if n < len(V1_PREFIX) else _parse_v1(buf)
    k = min(n, len(V2_SIGNATURE))
    if head[:k] == V2_SIGNATURE[:k]:
        return None if n <= len(V2_SIGNATURE) else _parse_v2(buf, head, verify_crc, max_v2_length)
    if head[0] not in (V1_PREFIX[0], V2_SIGNATURE[0]):
        raise ProxyError(
            f"not a PROXY header: first byte 0x{head[0]:02x} starts neither 'PROXY ' nor the v2 "
            "signature"
        )
    expected = V1_PREFIX if head[0] == V1_PREFIX[0] else V2_SIGNATURE
    bad = next(i for i in range(min(n, len(expected))) if head[i] != expected[i])
    what = "'PROXY '" if expected is V1_PREFIX else "the v2 signature"
    raise ProxyError(
        f"not a PROXY header: byte {bad} is 0x{head[bad]:02x} where {what} has "
        f"0x{expected[bad]:02x} (got {_show(head[: bad + 1])})"
    )


class ProxyDecoder:
    """Incremental wrapper around `parse` for bytes arriving in pieces.

    `feed` returns None until the header is complete, then the header; `rest` holds the bytes
    that followed it (later feeds append there). After an error every feed raises it again and
    `buffered` still holds everything received, so nothing is lost for logging.
    """

    def __init__(
        self, *, verify_crc: bool = True, max_v2_length: int = DEFAULT_MAX_V2_LENGTH
    ) -> None:
        self._verify_crc = verify_crc
        self._max_v2_length = max_v2_length
        self._buf = bytearray()
        self._error: ProxyError | None = None
        self.header: ProxyHeader | None = None
        self.rest = b""

    @property
    def buffered(self) -> bytes:
        """Bytes received but not yet decoded into a header."""
        return bytes(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyHeader | None:
        if self._error is not None:
            raise self._error
        if self.header is not None:
            self.rest += bytes(data)
            return self.header
        self._buf += data
        try:
            result = parse(self._buf, verify_crc=self._verify_crc,
                           max_v2_length=self._max_v2_length)
        except ProxyError as e:
            self._error = e
            raise
        if result is None:
            return None
        self.header, used = result
        self.rest = bytes(self._buf[used:])
        self._buf = bytearray()
        return self.header


def _show(b: bytes, limit: int = 60) -> str:
    return f"'{repr(b[:limit])[2:-1]}'" + ("..." if len(b) > limit else "")


def _text(value: bytes, encoding: str, what: str) -> str:
    try:
        return value.decode(encoding)
    except UnicodeDecodeError:
        raise ProxyError(f"v2: {what} is not valid {encoding.upper()}: {_show(value)}") from None


# --- v1


def _parse_v1(buf: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    view = bytes(buf[:V1_MAX_LENGTH])
    cr, lf = view.find(b"\r"), view.find(b"\n")
    if lf != -1 and (cr == -1 or lf < cr):
        raise ProxyError(f"v1: bare LF at byte {lf}, the line must end with CRLF")
    if cr == -1:
        # A CR at index >= 106 would make the line longer than 107 bytes.
        if len(view) >= V1_MAX_LENGTH - 1:
            raise ProxyError(f"v1: no CRLF within the first {V1_MAX_LENGTH} bytes")
        _v1_fields(view[len(V1_PREFIX):], complete=False)
        return None
    if cr + 1 >= V1_MAX_LENGTH:
        raise ProxyError(f"v1: no CRLF within the first {V1_MAX_LENGTH} bytes")
    fields = _v1_fields(view[len(V1_PREFIX):cr], complete=True)
    if cr + 1 == len(view):
        return None  # the content is final; only the LF is missing
    if view[cr + 1] != 0x0A:
        raise ProxyError(f"v1: CR at byte {cr} not followed by LF")
    used = cr + 2
    if fields is None:
        return ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", None, None, length=used), used
    family, src, dst = fields
    return ProxyHeader(1, "PROXY", family, "STREAM", src, dst, length=used), used


def _v1_fields(
    body: bytes, complete: bool
) -> tuple[str, tuple[str, int], tuple[str, int]] | None:
    """Check the line after 'PROXY ' (a prefix of it unless `complete`).

    Returns None for UNKNOWN or an incomplete line, else (family, source, destination).
    """
    fields = body.split(b" ")
    proto = fields[0]
    if len(fields) == 1 and not complete:
        if not any(p.startswith(proto) for p in _V1_PROTOS):
            raise _unknown_proto(proto)
        return None
    if proto == b"UNKNOWN":
        return None  # the rest of the line, if any, must be ignored
    if proto not in (b"TCP4", b"TCP6"):
        if not proto:
            raise ProxyError("v1: no protocol after 'PROXY ' (fields are separated by one space)")
        raise _unknown_proto(proto)
    v6 = proto == b"TCP6"
    rest = fields[1:]
    values: list[str | int] = []
    for i, f in enumerate(rest[:4]):  # left to right, so the first defect is the one reported
        partial = not complete and i == len(rest) - 1
        name = _V1_FIELDS[i]
        if not f and not partial:
            raise ProxyError(f"v1: empty {name} (fields are separated by exactly one space)")
        if i < 2:
            values.append(_v1_ip6(name, f, partial) if v6 else _v1_ip4(name, f, partial))
        else:
            values.append(_v1_port(name, f))
    if len(rest) > 4:
        extra = b" " + b" ".join(rest[4:])
        raise ProxyError(f"v1: unexpected data after the destination port: {_show(extra)}")
    if complete and len(rest) < 4:
        raise ProxyError(f"v1: {proto.decode()} line ends before the {_V1_FIELDS[len(rest)]}")
    if not complete:
        return None
    src_ip, dst_ip, sport, dport = values
    return ("INET6" if v6 else "INET"), (str(src_ip), int(sport)), (str(dst_ip), int(dport))


def _unknown_proto(proto: bytes) -> ProxyError:
    return ProxyError(f"v1: unknown protocol {_show(proto)} (expected TCP4, TCP6 or UNKNOWN)")


def _v1_ip4(name: str, f: bytes, partial: bool) -> str:
    if b":" in f:
        raise ProxyError(f"v1: {name} {_show(f)} is IPv6 but the protocol is TCP4")
    parts = f.split(b".")
    if any(p and not is_digits(p) for p in parts) or len(parts) > 4 or (
            not partial and len(parts) != 4):
        raise ProxyError(f"v1: {name} {_show(f)} is not a dotted-quad IPv4 address")
    for j, p in enumerate(parts):
        if not p:
            if partial and j == len(parts) - 1:
                continue
            raise ProxyError(f"v1: {name} {_show(f)} is not a dotted-quad IPv4 address")
        if len(p) > 1 and p[0] == 0x30:
            raise ProxyError(f"v1: leading zero in {name} {_show(f)}")
        octet = decimal(p, max_digits=3, leading_zero=False)
        if octet is None or octet > 255:
            raise ProxyError(f"v1: {name} {_show(f)} has an octet above 255")
    return f.decode("ascii")


def _v1_ip6(name: str, f: bytes, partial: bool) -> str:
    if f.strip(_HEX + b":."):
        raise ProxyError(f"v1: {name} {_show(f)} is not an IPv6 address")
    if b":" not in f and (b"." in f or not partial):
        raise ProxyError(
            f"v1: {name} {_show(f)} is IPv4 but the protocol is TCP6 (an IPv4-mapped "
            "::ffff:a.b.c.d address is fine)"
        )
    if len(f) > 45:
        raise ProxyError(f"v1: {name} {_show(f)} is too long for an IPv6 address")
    if partial:
        return ""
    try:
        return _v6_text(IPv6Address(f.decode("ascii")))
    except ValueError as e:
        raise ProxyError(f"v1: {name} {_show(f)} is not an IPv6 address ({e})") from None


def _v1_port(name: str, f: bytes) -> int:
    if not f:
        return 0  # partial, nothing yet
    if not is_digits(f):
        raise ProxyError(f"v1: {name} {_show(f)} is not a decimal number")
    if len(f) > 1 and f[0] == 0x30:
        raise ProxyError(f"v1: leading zero in {name} {_show(f)}")
    port = decimal(f, max_digits=5, leading_zero=False)
    if port is None or port > 0xFFFF:
        raise ProxyError(f"v1: {name} {_show(f)} is above 65535")
    return port


def _v6_text(ip: IPv6Address) -> str:
    # inet_ntop style for IPv4-mapped addresses (HAProxy sends those for mixed families)
    return f"::ffff:{ip.ipv4_mapped}" if ip.ipv4_mapped else ip.compressed


# --- v2


def _parse_v2(
    buf: bytes | bytearray | memoryview, head: bytes, verify_crc: bool, max_len: int
) -> tuple[ProxyHeader, int] | None:
    ver_cmd = head[12]
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"v2: version {ver_cmd >> 4} in byte 12 (0x{ver_cmd:02x}); only 2 exists")
    if ver_cmd & 0xF not in (0, 1):
        raise ProxyError(
            f"v2: command {ver_cmd & 0xF} in byte 12 (0x{ver_cmd:02x}); only LOCAL (0) and "
            "PROXY (1) exist"
        )
    if len(head) < 14:
        return None
    fam = head[13]
    if fam >> 4 not in _FAMILIES:
        raise ProxyError(f"v2: unknown address family {fam >> 4} in byte 13 (0x{fam:02x})")
    if fam & 0xF not in _PROTOCOLS:
        raise ProxyError(f"v2: unknown transport protocol {fam & 0xF} in byte 13 (0x{fam:02x})")
    if len(head) < 16:
        return None
    length = int.from_bytes(head[14:16], "big")
    if length > max_len:
        raise ProxyError(f"v2: header length {length} is above the limit of {max_len} bytes")
    family, protocol = _FAMILIES[fam >> 4], _PROTOCOLS[fam & 0xF]
    addr_len = _ADDR_LEN[fam >> 4]
    if length < addr_len:
        raise ProxyError(
            f"v2: length {length} is too short for the {family} address block ({addr_len} bytes)"
        )
    total = 16 + length
    if len(buf) < total:
        return None
    data = bytes(buf[:total])
    command = "PROXY" if ver_cmd & 0xF else "LOCAL"
    src: tuple[str, int] | str | None = None
    dst: tuple[str, int] | str | None = None
    if command == "PROXY":
        a = data[16 : 16 + addr_len]
        if family == "INET":
            src = (str(IPv4Address(a[0:4])), int.from_bytes(a[8:10], "big"))
            dst = (str(IPv4Address(a[4:8])), int.from_bytes(a[10:12], "big"))
        elif family == "INET6":
            src = (_v6_text(IPv6Address(a[0:16])), int.from_bytes(a[32:34], "big"))
            dst = (_v6_text(IPv6Address(a[16:32])), int.from_bytes(a[34:36], "big"))
        elif family == "UNIX":
            src = _unix_path(a[:_UNIX_PATH], "source")
            dst = _unix_path(a[_UNIX_PATH:], "destination")
    tlvs = _walk_tlvs(data, 16 + addr_len, total, "TLV")
    crc_at = [off for off, t in tlvs if t.type == TLV_CRC32C]
    for _, t in tlvs:
        _check_tlv(t)
    if len(crc_at) > 1:
        raise ProxyError(f"v2: {len(crc_at)} CRC32C TLVs; at most one is allowed")
    if crc_at and verify_crc:
        off = crc_at[0] + 3
        want = int.from_bytes(data[off : off + 4], "big")
        got = crc32c(data[:off] + b"\0\0\0\0" + data[off + 4 :])
        if want != got:
            raise ProxyError(f"v2: CRC32C mismatch: header says 0x{want:08x}, computed 0x{got:08x}")
    header = ProxyHeader(2, command, family, protocol, src, dst,
                         tuple(t for _, t in tlvs), length=total)
    return header, total


def _unix_path(raw: bytes, which: str) -> str:
    nul = raw.find(b"\0")
    if nul == -1:
        raise ProxyError(f"v2: UNIX {which} path is not NUL-terminated within 108 bytes")
    return raw[:nul].decode("utf-8", "surrogateescape")


def _walk_tlvs(data: bytes, pos: int, end: int, what: str) -> list[tuple[int, TLV]]:
    """Split data[pos:end] into TLVs, which must end exactly at `end`."""
    out = []
    while pos < end:
        left = end - pos
        if left < 3:
            raise ProxyError(
                f"v2: {left} stray byte(s) at offset {pos}, too short for a {what} header "
                f"(the {what}s must end exactly at offset {end})"
            )
        t, ln = data[pos], int.from_bytes(data[pos + 1 : pos + 3], "big")
        if ln > left - 3:
            raise ProxyError(
                f"v2: {what} 0x{t:02x} at offset {pos} declares {ln} bytes but only {left - 3} "
                f"remain before offset {end}"
            )
        out.append((pos, TLV(t, data[pos + 3 : pos + 3 + ln])))
        pos += 3 + ln
    return out


def _check_tlv(t: TLV) -> None:
    """Reject registered TLVs whose contents break the spec."""
    if t.type == TLV_CRC32C and len(t.value) != 4:
        raise ProxyError(f"v2: CRC32C TLV is {len(t.value)} bytes; it must be 4")
    elif t.type == TLV_UNIQUE_ID and len(t.value) > MAX_UNIQUE_ID:
        raise ProxyError(f"v2: UNIQUE_ID TLV is {len(t.value)} bytes (max {MAX_UNIQUE_ID})")
    elif t.type == TLV_AUTHORITY:
        _text(t.value, "utf-8", "AUTHORITY TLV")
    elif t.type == TLV_NETNS:
        _text(t.value, "ascii", "NETNS TLV")
    elif t.type == TLV_SSL:
        _parse_ssl(t.value)


_SSL_TEXT = {
    SSL_VERSION: ("version", "ascii"),
    SSL_CN: ("cn", "utf-8"),
    SSL_CIPHER: ("cipher", "ascii"),
    SSL_SIG_ALG: ("sig_alg", "ascii"),
    SSL_KEY_ALG: ("key_alg", "ascii"),
}


def _parse_ssl(value: bytes) -> SSLInfo:
    if len(value) < 5:
        raise ProxyError(f"v2: SSL TLV is {len(value)} bytes; it needs at least 5 (client, verify)")
    subs = tuple(t for _, t in _walk_tlvs(value, 5, len(value), "SSL sub-TLV"))
    text: dict[str, str] = {}
    for t in subs:
        if t.type in _SSL_TEXT:
            field, encoding = _SSL_TEXT[t.type]
            decoded = _text(t.value, encoding, f"SSL sub-TLV 0x{t.type:02x}")
            text.setdefault(field, decoded)
    return SSLInfo(client=value[0], verify=int.from_bytes(value[1:5], "big"),
                   version=text.get("version"), cn=text.get("cn"), cipher=text.get("cipher"),
                   sig_alg=text.get("sig_alg"), key_alg=text.get("key_alg"), raw_subtlvs=subs)


# --------------------------------------------------------------------------- encoding


def _endpoint(value: object, what: str) -> tuple[IPv4Address | IPv6Address, int]:
    try:
        host, port = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ProxyError(f"{what} must be (ip, port), got {value!r}") from None
    if not isinstance(host, str | IPv4Address | IPv6Address):
        raise ProxyError(f"{what} address must be an IP address string, got {host!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProxyError(f"{what} address {host!r} is not an IP address") from None
    if isinstance(ip, IPv6Address) and ip.scope_id:
        raise ProxyError(f"{what} address {host!r} has a scope id; PROXY cannot carry one")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ProxyError(f"{what} port must be an integer 0..65535, got {port!r}")
    return ip, port


def _pair(
    source: object, destination: object, v: str
) -> tuple[IPv4Address | IPv6Address, int, IPv4Address | IPv6Address, int]:
    sip, sport = _endpoint(source, "source")
    dip, dport = _endpoint(destination, "destination")
    if sip.version != dip.version:
        raise ProxyError(
            f"{v}: mixed address families (source IPv{sip.version}, destination IPv{dip.version});"
            " map the IPv4 one to ::ffff:a.b.c.d"
        )
    return sip, sport, dip, dport


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 line: TCP4 or TCP6 according to the addresses."""
    sip, sport, dip, dport = _pair(source, destination, "v1")
    if isinstance(sip, IPv6Address) and isinstance(dip, IPv6Address):
        line = f"PROXY TCP6 {_v6_text(sip)} {_v6_text(dip)} {sport} {dport}\r\n"
    else:
        line = f"PROXY TCP4 {sip} {dip} {sport} {dport}\r\n"
    return line.encode("ascii")


def encode_v1_unknown() -> bytes:
    """The short UNKNOWN line (HAProxy 2.6 rejects the long form)."""
    return b"PROXY UNKNOWN\r\n"


def encode_v2(
    source: tuple[str, int],
    destination: tuple[str, int],
    *,
    tlvs: Sequence[TLV] = (),
    crc32c: bool = False,
    protocol: str = "STREAM",
) -> bytes:
    """A v2 PROXY header (family byte 0x11/0x21, or 0x12/0x22 for DGRAM).

    With `crc32c` a CRC32C TLV is appended and filled in over the whole header.
    """
    proto = {"STREAM": 1, "DGRAM": 2}.get(protocol)
    if proto is None:
        raise ProxyError(f"v2: protocol must be STREAM or DGRAM, got {protocol!r}")
    sip, sport, dip, dport = _pair(source, destination, "v2")
    block = sip.packed + dip.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    fam = (1 if sip.version == 4 else 2) << 4 | proto
    return _build_v2(0x21, fam, block, tlvs, crc32c)


def encode_v2_local(tlvs: Sequence[TLV] = (), crc32c: bool = False) -> bytes:
    """A v2 LOCAL header (what a proxy's own health checks send)."""
    return _build_v2(0x20, 0x00, b"", tlvs, crc32c)


def encode(version: int, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A plain header of `version` 1 or 2 for source -> destination."""
    if version == 1:
        return encode_v1(source, destination)
    if version == 2:
        return encode_v2(source, destination)
    raise ProxyError(f"PROXY protocol version must be 1 or 2, got {version!r}")


def _build_v2(ver_cmd: int, fam: int, block: bytes, tlvs: Sequence[TLV], crc: bool) -> bytes:
    parts = [block]
    for t in tlvs:
        if not isinstance(t, TLV):
            raise ProxyError(f"v2: TLVs must be TLV instances, got {t!r}")
        if t.type == TLV_CRC32C:
            raise ProxyError("v2: pass crc32c=True instead of a CRC32C TLV")
        _check_tlv(t)
        parts.append(t.encode())
    if crc:
        parts.append(TLV(TLV_CRC32C, b"\0\0\0\0").encode())
    body = b"".join(parts)
    if len(body) > 0xFFFF:
        raise ProxyError(f"v2: addresses and TLVs take {len(body)} bytes (max 65535)")
    header = V2_SIGNATURE + bytes((ver_cmd, fam)) + len(body).to_bytes(2, "big") + body
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


def ssl_tlv(
    client: int,
    verify: int = 0,
    *,
    version: str | None = None,
    cn: str | None = None,
    cipher: str | None = None,
    sig_alg: str | None = None,
    key_alg: str | None = None,
    extra: Sequence[TLV] = (),
) -> TLV:
    """Build a PP2_TYPE_SSL TLV from its parts (sub-TLVs in type order, then `extra`)."""
    if not 0 <= client <= 0xFF or not 0 <= verify <= 0xFFFFFFFF:
        raise ProxyError(f"SSL TLV: client must fit 1 byte and verify 4 ({client!r}, {verify!r})")
    subs = []
    for sub, text in ((SSL_VERSION, version), (SSL_CN, cn), (SSL_CIPHER, cipher),
                      (SSL_SIG_ALG, sig_alg), (SSL_KEY_ALG, key_alg)):
        if text is not None:
            try:
                subs.append(TLV(sub, text.encode("utf-8" if sub == SSL_CN else "ascii")))
            except UnicodeEncodeError:
                raise ProxyError(f"SSL TLV: sub-TLV 0x{sub:02x} must be ASCII: {text!r}") from None
    value = bytes((client,)) + verify.to_bytes(4, "big")
    value += b"".join(t.encode() for t in (*subs, *extra))
    return TLV(TLV_SSL, value)
