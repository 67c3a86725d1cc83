"""Delivery failures with a kind and a name.

Every failure on the way out says what it is about (source IP, proxy, MX host and IP) and
whether retrying later can help. An SMTP reply that decides the outcome is not an error of this
kind but a result; `SMTPReplyError` only carries such a reply out of places where no
transaction result can be returned (banner, EHLO).
"""

from __future__ import annotations

from typing import Literal

from ferrymail.smtp.protocol import Reply

ErrorKind = Literal["config", "dns", "network", "proxy", "tls", "protocol", "smtp", "loop"]
DNSErrorKind = Literal["nxdomain", "nullmx", "nodata", "ipfamily", "other"]

KINDS: tuple[str, ...] = ("config", "dns", "network", "proxy", "tls", "protocol", "smtp",
                          "loop")
DNS_KINDS: tuple[str, ...] = ("nxdomain", "nullmx", "nodata", "ipfamily", "other")


class DeliveryError(Exception):
    """A delivery attempt failed without an SMTP reply deciding it (or see `SMTPReplyError`).

    ``kind``: config, dns, network, proxy, tls, protocol, loop (a mail loop: too many hops
    or the next hop is ourselves), or smtp for `SMTPReplyError`.
    ``temporary``: whether a later attempt may succeed. ``dns`` refines kind dns (and the
    config error for an address-family mismatch): nxdomain, nullmx, nodata, ipfamily, other.
    ``status``: the enhanced status code for a DSN, when the kind's default does not fit
    (e.g. 5.6.3 for 8-bit content that cannot be converted).
    """

    def __init__(self, kind: ErrorKind, message: str, *, temporary: bool = True,
                 dns: DNSErrorKind | None = None, status: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown delivery error kind {kind!r}")
        if dns is not None and dns not in DNS_KINDS:
            raise ValueError(f"unknown dns error kind {dns!r}")
        super().__init__(message)
        self.kind: str = kind
        self.message = message
        self.temporary = temporary
        self.dns: str | None = dns
        self.status = status  # RFC 3463 status for the DSN when the kind's default does not fit

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        extra = f", dns={self.dns!r}" if self.dns else ""
        return (f"{type(self).__name__}(kind={self.kind!r}, temporary={self.temporary}"
                f"{extra}, message={self.message!r})")

    def as_dict(self) -> dict[str, object]:
        """The ``error`` object of a send result: ``{temporary, message, type[, dns]}``."""
        out: dict[str, object] = {"temporary": self.temporary, "message": self.message,
                                  "type": self.kind}
        if self.dns:
            out["dns"] = self.dns
        return out


class SMTPReplyError(DeliveryError):
    """The peer answered the session setup with a refusal (banner or EHLO/HELO).

    It is an SMTP result, not a local failure: treat it per recipient like any reply
    (4xx temporary, 5xx permanent). ``state`` is ``"CONNECT"`` for the banner, ``"EHLO"``.
    """

    def __init__(self, reply: Reply, state: str, message: str = "") -> None:
        super().__init__("smtp", message or f"{state}: {reply}", temporary=reply.code < 500)
        self.reply = reply
        self.state = state


class ProxyConnectError(DeliveryError):
    """The proxy itself could not be reached: TCP connect refused or timed out, or the PROXY
    header could not be written (kind ``proxy``). Unlike EOF before the banner, this says the
    proxy is down, not that one of its source IPs is unusable (`ferrymail.delivery.health`)."""

    def __init__(self, message: str) -> None:
        super().__init__("proxy", message, temporary=True)
