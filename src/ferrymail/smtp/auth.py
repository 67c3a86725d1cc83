"""SMTP AUTH exchanges (RFC 4954) for PLAIN (RFC 4616) and LOGIN, sans-IO.

``AuthExchange.start(mechanism, initial)`` begins one ``AUTH`` command; ``feed(line)`` takes
each client line after a ``334`` challenge. Both return a ``Challenge`` (send it, read the
next line), ``Credentials`` (verify them, then answer 235 or 535) or ``Refused`` (send the
reply; the exchange is over). The session owns the exchange; verifying is the I/O layer's
business (it is slow on purpose: argon2/bcrypt).
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass, field

MECHANISMS = ("PLAIN", "LOGIN")


def _r(text: str) -> bytes:
    return text.encode() + b"\r\n"


R_AUTH_OK = _r("235 2.7.0 authentication successful")
R_AUTH_FAILED = _r("535 5.7.8 authentication credentials invalid")
R_AUTH_CANCELLED = _r("501 5.7.0 authentication cancelled")
R_AUTH_BAD_B64 = _r("501 5.5.2 cannot decode the response (base64)")
R_AUTH_MECH = _r("504 5.5.4 unrecognized authentication mechanism (PLAIN and LOGIN are offered)")
R_AUTH_AUTHZID = _r("535 5.7.8 authorization identity differs from the user; not allowed")
R_AUTH_TEMP = _r("454 4.7.0 temporary authentication failure")
R_AUTH_LIMITED = _r("454 4.7.0 too many failed authentication attempts, try again later")
R_ENCRYPTION_REQUIRED = _r("538 5.7.11 encryption required for requested authentication "
                           "mechanism")
R_AUTH_REQUIRED = _r("530 5.7.0 authentication required")
R_TLS_REQUIRED = _r("530 5.7.0 must issue a STARTTLS command first")
R_ALREADY_AUTH = _r("503 5.5.1 already authenticated")
R_AUTH_IN_TXN = _r("503 5.5.1 AUTH not permitted during a mail transaction")

_CHALLENGE_EMPTY = _r("334 ")
_CHALLENGE_USER = _r("334 VXNlcm5hbWU6")  # "Username:"
_CHALLENGE_PASS = _r("334 UGFzc3dvcmQ6")  # "Password:"


@dataclass(frozen=True, slots=True)
class Challenge:
    reply: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    mechanism: str
    user: str
    password: str = field(repr=False)  # never in a log line or a traceback's repr


@dataclass(frozen=True, slots=True)
class Refused:
    reply: bytes


Step = Challenge | Credentials | Refused


class _Bad(Exception):
    def __init__(self, reply: bytes) -> None:
        self.reply = reply


def _decode(text: str | bytes) -> bytes:
    try:
        return b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _Bad(R_AUTH_BAD_B64) from None


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(R_AUTH_FAILED) from None


class AuthExchange:
    """One AUTH command from its first line to credentials (or refusal)."""

    __slots__ = ("_mechanism", "_user")

    def __init__(self, mechanism: str) -> None:
        self._mechanism = mechanism
        self._user: str | None = None

    @classmethod
    def start(cls, arg: str) -> tuple[AuthExchange | None, Step]:
        """``arg``: what followed ``AUTH``. The exchange (None once it is over) and the step."""
        parts = arg.split()
        if not parts or len(parts) > 2:
            return None, Refused(_r("501 5.5.4 syntax: AUTH mechanism [initial-response]"))
        mechanism = parts[0].upper()
        if mechanism not in MECHANISMS:
            return None, Refused(R_AUTH_MECH)
        exchange = cls(mechanism)
        if len(parts) == 1:
            first = _CHALLENGE_EMPTY if mechanism == "PLAIN" else _CHALLENGE_USER
            return exchange, Challenge(first)
        # RFC 4954 §4: "=" is an empty initial response
        return exchange._step(b"" if parts[1] == "=" else parts[1].encode())

    def feed(self, line: bytes) -> tuple[AuthExchange | None, Step]:
        """One client line (without CRLF) after a 334."""
        if line.strip() == b"*":
            return None, Refused(R_AUTH_CANCELLED)
        return self._step(line.strip())

    def _step(self, b64: bytes) -> tuple[AuthExchange | None, Step]:
        try:
            raw = _decode(b64)
            if self._mechanism == "PLAIN":
                return None, self._plain(raw)
            if self._user is None:
                self._user = _text(raw)
                return self, Challenge(_CHALLENGE_PASS)
            return None, Credentials("LOGIN", self._user, _text(raw))
        except _Bad as bad:
            return None, Refused(bad.reply)

    @staticmethod
    def _plain(raw: bytes) -> Step:
        parts = raw.split(b"\0")
        if len(parts) != 3:
            return Refused(R_AUTH_FAILED)
        authzid, user, password = (_text(p) for p in parts)
        if authzid and authzid != user:
            return Refused(R_AUTH_AUTHZID)
        return Credentials("PLAIN", user, password)
