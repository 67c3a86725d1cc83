"""Mail loop detection (RFC 5321 §6.3): hop counting and "the next hop is myself".

Two checks, both before a connection is opened:

* `received_count`: the ``Received:`` header fields of a message are its hops. A message with
  ``hop_limit`` of them or more (Postfix ``hopcount_limit``, default 50) is failed with
  ``5.4.6`` instead of being relayed once more. This catches loops through other MTAs and
  proxies, e.g. two instances forwarding to each other.
* `OwnListeners`: an MX (or ``connection.server``) address and port that is one of this
  instance's own listeners would hand the message back to ourselves (Postfix: "mail for
  DOMAIN loops back to myself"); the engine then tries only better MX hosts. A wildcard
  listener matches any address of this host.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from ferrymail.delivery.ipparse import parse_ip

LOOP_STATUS = "5.4.6"  # RFC 3463: routing loop detected
DEFAULT_HOP_LIMIT = 50  # Postfix hopcount_limit


def header_block(data: bytes) -> bytes:
    """The header section of an RFC 5322 message: up to the first empty line (CRLF or LF
    endings), or the whole message if it has no body."""
    if data.startswith((b"\r\n", b"\n")):
        return b""
    crlf = data.find(b"\r\n\r\n")
    # an LF LF can only end the header earlier: search no further (a 100 KB body in CRLF
    # has none, and scanning it all cost more than the rest of the loop checks)
    lf = data.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(data))
    ends = [i for i in (crlf, lf) if i >= 0]
    return data[: min(ends)] if ends else data


def received_count(data: bytes) -> int:
    """How many ``Received:`` header fields (case-insensitive name, RFC 5322 §3.6.7) the
    header section of ``data`` has; folded continuation lines are not counted."""
    count = 0
    for line in header_block(data).split(b"\n"):
        if line[:9].lower() == b"received:":
            count += 1
    return count


def hop_limit_error(data: bytes, hop_limit: int) -> str | None:
    """None while the message may be relayed once more, else why not (for the DSN)."""
    hops = received_count(data)
    if hops < hop_limit:
        return None
    return (f"mail loop: the message has passed {hops} hops ({hops} Received: header "
            f"fields, hop_limit {hop_limit})")


def is_local_address(ip: str) -> bool:
    """Whether ``ip`` is an address of this host (bind() to it succeeds)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    if addr.is_unspecified:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((str(addr), 0))
        except OSError as e:
            if e.errno in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.EAFNOSUPPORT):
                return False
            raise
    return True


@dataclass(frozen=True)
class OwnListeners:
    """This instance's listening ``(address, port)`` pairs; address None = every address."""

    listeners: tuple[tuple[str | None, int], ...] = ()

    @classmethod
    def of(cls, pairs: Iterable[tuple[object | None, int]]) -> OwnListeners:
        return cls(tuple((None if a is None or ipaddress.ip_address(str(a)).is_unspecified
                          else str(ipaddress.ip_address(str(a))), int(p)) for a, p in pairs))

    def match(self, ip: str, port: int) -> str | None:
        """The listener ``ip:port`` would reach (``"[::]:25"`` style), or None."""
        try:
            target = parse_ip(ip)
        except ValueError:
            return None
        for address, lport in self.listeners:
            if lport != port:
                continue
            if address is None:
                if is_local_address(str(target)):
                    return f"*:{lport}"
            elif parse_ip(address) == target:
                return f"[{address}]:{lport}" if ":" in address else f"{address}:{lport}"
        return None
