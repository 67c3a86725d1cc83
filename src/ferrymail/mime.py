"""A chainable message builder in the style of Halon's ``MIME()``, on top of :mod:`email`.

``MIME().add_header("Subject", "Hello").set_body("Hello World").to_bytes()`` gives an RFC 5322
message with CRLF line endings, a ``Date`` and ``Message-ID`` (unless given), ``MIME-Version``
and a transfer encoding chosen from the content: ``7bit`` for ASCII text with short lines,
otherwise the shorter of quoted-printable and base64 (base64 for anything not text). Text is
always UTF-8. Headers with non-ASCII text are RFC 2047 encoded, long ones folded.
"""

from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import io
import mimetypes
import quopri
import re
import socket
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from email.generator import BytesGenerator
from email.message import EmailMessage
from functools import lru_cache
from typing import Any

__all__ = ["MIME", "DowngradeError", "to_7bit"]

# 7bit: headers are RFC 2047 encoded and bodies never go out as raw 8bit, so any MTA takes it.
_POLICY = email.policy.SMTP.clone(cte_type="7bit")

_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII except ":" (RFC 5322 ftext)
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
_CTYPE = re.compile(rf"({_TOKEN})/({_TOKEN})")
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")  # RFC 2046
_DATE_HEADERS = {"date", "resent-date"}
_ADDRESS_HEADERS = {"from", "to", "cc", "bcc", "reply-to", "sender", "resent-from", "resent-to",
                    "resent-cc", "resent-bcc", "resent-sender"}
# Headers the builder writes itself from set_type/set_body/set_filename/set_disposition.
_MANAGED = {
    "content-type": "set_type()",
    "content-transfer-encoding": "nothing (it is chosen from the content)",
    "content-disposition": "set_disposition() / set_filename()",
    "mime-version": "nothing (it is always 1.0)",
}


@lru_cache(maxsize=1)
def _local_domain() -> str:
    name = socket.getfqdn()
    return name if "." in name else "localhost.localdomain"


class MIME:
    """One MIME entity: a whole message, or a part of one (``append_part``).

    Every setter returns ``self`` so calls chain. Nothing is encoded until ``to_bytes()``.
    """

    def __init__(self) -> None:
        self._headers: list[tuple[str, str]] = []
        self._body: str | bytes | None = None
        self._type = "text/plain"
        self._parts: list[MIME] = []
        self._filename: str | None = None
        self._disposition: str | None = None
        self._boundary: str | None = None
        self._date: str | None = None
        # Generated once, so that to_bytes() called twice gives the same message.
        self._auto_date: str | None = None
        self._auto_msgid: str | None = None

    # ----------------------------------------------------------------------------- setters

    def add_header(self, name: str, value: str) -> MIME:
        """Append a header (an existing one of the same name is kept: headers may repeat)."""
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"invalid header name {name!r} (printable ASCII, no ':' or space)")
        if not isinstance(value, str):
            raise ValueError(f"header {name}: value must be a string, got {type(value).__name__}")
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"header {name}: value must not contain CR, LF or NUL")
        low = name.lower()
        managed = _MANAGED.get(low)
        if managed is not None:
            raise ValueError(f"header {name} is managed by the builder: use {managed}")
        if low in _DATE_HEADERS:
            try:
                email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"header {name}: not an RFC 5322 date: {value!r}") from exc
        if low in _ADDRESS_HEADERS:
            for _, addr in email.utils.getaddresses([value]):
                if not addr.isascii():
                    raise ValueError(f"header {name}: {addr!r} is a non-ASCII address, which "
                                     "needs SMTPUTF8 headers; this builder writes 7-bit ones")
        self._headers.append((name, value))
        return self

    def set_body(self, body: str | bytes) -> MIME:
        """The content: text (str, or UTF-8 bytes for text/* types) or binary data (bytes)."""
        if not isinstance(body, (str, bytes, bytearray, memoryview)):
            raise ValueError(f"body must be str or bytes, got {type(body).__name__}")
        self._body = body if isinstance(body, str) else bytes(body)
        return self

    def set_type(self, ctype: str) -> MIME:
        """The content type, ``maintype/subtype`` (default ``text/plain``; text is UTF-8)."""
        m = _CTYPE.fullmatch(ctype.strip()) if isinstance(ctype, str) else None
        if m is None:
            raise ValueError(f"content type must look like 'text/html', got {ctype!r}")
        self._type = f"{m.group(1)}/{m.group(2)}".lower()
        return self

    def append_part(self, part: MIME) -> MIME:
        """Add a child entity; the message becomes multipart (see ``to_bytes``)."""
        if not isinstance(part, MIME):
            raise ValueError(f"append_part takes a MIME object, got {type(part).__name__}")
        if part is self or self in part._descendants():
            raise ValueError("a MIME part cannot contain itself")
        self._parts.append(part)
        return self

    def add_attachment(self, data: str | bytes, filename: str, ctype: str | None = None) -> MIME:
        """Append an attachment part; ``ctype`` defaults to a guess from the file name."""
        if ctype is None:
            ctype = mimetypes.guess_type(filename, strict=False)[0] or "application/octet-stream"
        part = MIME().set_type(ctype).set_body(data).set_filename(filename)
        return self.append_part(part.set_disposition("attachment"))

    def set_filename(self, filename: str) -> MIME:
        """The ``filename`` parameter of Content-Disposition (and ``name`` of Content-Type)."""
        if not isinstance(filename, str) or not filename or any(c in filename for c in "\r\n\0"):
            raise ValueError(f"invalid file name {filename!r}")
        self._filename = filename
        return self

    def set_disposition(self, disposition: str) -> MIME:
        """Content-Disposition type, normally ``inline`` or ``attachment``."""
        if not isinstance(disposition, str) or not re.fullmatch(_TOKEN, disposition):
            raise ValueError(f"invalid disposition {disposition!r} (e.g. 'attachment')")
        self._disposition = disposition.lower()
        return self

    def set_boundary(self, boundary: str) -> MIME:
        """The multipart boundary (otherwise a random one is made)."""
        if not isinstance(boundary, str) or not _BOUNDARY.fullmatch(boundary):
            raise ValueError(f"invalid multipart boundary {boundary!r} (RFC 2046: 1-70 chars)")
        self._boundary = boundary
        return self

    def set_date(self, when: datetime | float | str | None = None) -> MIME:
        """The Date header: a datetime (naive = local time), a Unix time, an RFC 5322 date
        string, or None for now."""
        if when is None:
            text = email.utils.formatdate(localtime=True)
        elif isinstance(when, datetime):
            text = email.utils.format_datetime(when if when.tzinfo else when.astimezone())
        elif isinstance(when, (int, float)) and not isinstance(when, bool):
            text = email.utils.formatdate(float(when), localtime=True)
        elif isinstance(when, str):
            try:
                email.utils.parsedate_to_datetime(when)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"not an RFC 5322 date: {when!r}") from exc
            text = when
        else:
            raise ValueError(f"set_date takes a datetime, a Unix time or a string, got {when!r}")
        self._date = text
        return self

    # ----------------------------------------------------------------------------- output

    def to_bytes(self) -> bytes:
        """The whole message, CRLF line endings, 7-bit clean."""
        return self._build(top=True).as_bytes(policy=_POLICY)

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def __str__(self) -> str:
        return self.to_bytes().decode("ascii", "replace")

    def __repr__(self) -> str:
        subject = next((v for n, v in self._headers if n.lower() == "subject"), None)
        return f"<MIME {self._type} subject={subject!r} parts={len(self._parts)}>"

    def send(self, sender: str, recipients: Sequence[str] | str,
             options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send this message now, without queuing: see :func:`ferrymail.send.send`."""
        from ferrymail.send import send

        return send(self, sender, recipients, options)

    async def send_async(self, sender: str, recipients: Sequence[str] | str,
                         options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The same as ``send`` for code that already runs an event loop."""
        from ferrymail.send import send_async

        return await send_async(self, sender, recipients, options)

    # ----------------------------------------------------------------------------- internals

    def _descendants(self) -> list[MIME]:
        out: list[MIME] = []
        for p in self._parts:
            out.append(p)
            out.extend(p._descendants())
        return out

    def _header(self, name: str) -> str | None:
        low = name.lower()
        return next((v for n, v in self._headers if n.lower() == low), None)

    def _build(self, *, top: bool) -> EmailMessage:
        msg = EmailMessage(policy=_POLICY)
        self._fill_content(msg)
        content = [(k, v) for k, v in msg.items()]
        for key in {k for k, _ in content}:
            del msg[key]
        for name, value in self._headers:
            msg[name] = value
        if top:
            if self._header("Date") is None:
                if self._date is None and self._auto_date is None:
                    self._auto_date = email.utils.formatdate(localtime=True)
                msg["Date"] = self._date or self._auto_date
            if self._header("Message-ID") is None:
                if self._auto_msgid is None:
                    self._auto_msgid = f"<{uuid.uuid4()}@{self._msgid_domain()}>"
                msg["Message-ID"] = self._auto_msgid
            msg["MIME-Version"] = "1.0"
        rank = {"content-type": 0, "content-transfer-encoding": 1, "content-disposition": 2}
        for key, value in sorted(content, key=lambda kv: rank.get(kv[0].lower(), 3)):
            if key.lower() != "mime-version":
                msg[key] = value
        return msg

    def _msgid_domain(self) -> str:
        addr = email.utils.parseaddr(self._header("From") or "")[1]
        domain = addr.rpartition("@")[2]
        return domain if re.fullmatch(r"[A-Za-z0-9.-]+\.[A-Za-z0-9-]+", domain) else _local_domain()

    def _fill_content(self, msg: EmailMessage) -> None:
        maintype, subtype = self._type.split("/", 1)
        if self._parts:
            if maintype != "multipart":
                kind, leaf = "multipart/mixed", self._leaf(self._type)
            else:
                kind, leaf = self._type, self._leaf("text/plain")
            children = ([leaf] if leaf is not None else []) + [
                p._build(top=False) for p in self._parts
            ]
            msg["Content-Type"] = kind
            if self._boundary:
                msg.set_boundary(self._boundary)
            msg.set_payload(children)
            self._set_disposition(msg)
            return
        if maintype == "multipart":
            raise ValueError(f"{self._type} needs at least one part: use append_part()")
        self._set_content(msg, self._type, self._body if self._body is not None else "")
        self._set_disposition(msg)

    def _leaf(self, ctype: str) -> EmailMessage | None:
        """The body of a multipart entity as its first part (None when there is no body)."""
        if self._body is None:
            return None
        leaf = EmailMessage(policy=_POLICY)
        self._set_content(leaf, ctype, self._body)
        del leaf["MIME-Version"]
        return leaf

    def _set_content(self, msg: EmailMessage, ctype: str, body: str | bytes) -> None:
        maintype, subtype = ctype.split("/", 1)
        params = {"name": self._filename} if self._filename else {}
        if maintype == "text":
            if isinstance(body, bytes):
                try:
                    body = body.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(
                        f"a {ctype} body must be UTF-8 (at byte {exc.start}); for binary data "
                        "use set_type('application/octet-stream')"
                    ) from exc
            msg.set_content(body, subtype=subtype, charset="utf-8", params=params)
        elif maintype == "message":
            # RFC 2046 5.2: message/* may only be 7bit, 8bit or binary, never base64/QP.
            data = body.encode("utf-8") if isinstance(body, str) else body
            if not data.isascii():
                raise ValueError(f"a {ctype} body must be 7-bit ASCII here")
            msg.set_content(data, maintype=maintype, subtype=subtype, cte="7bit", params=params)
        else:
            data = body.encode("utf-8") if isinstance(body, str) else body
            msg.set_content(data, maintype=maintype, subtype=subtype, params=params)
        del msg["MIME-Version"]

    def _set_disposition(self, msg: EmailMessage) -> None:
        disposition = self._disposition or ("attachment" if self._filename else None)
        if disposition is None:
            return
        if self._filename:
            msg.add_header("Content-Disposition", disposition, filename=self._filename)
        else:
            msg["Content-Disposition"] = disposition


# ------------------------------------------------------------------------------- 8-bit to 7-bit

# Content that a conversion would break: a signature covers the exact octets of its parts.
_UNCONVERTIBLE = {"multipart/signed", "multipart/encrypted", "application/pkcs7-mime",
                  "application/x-pkcs7-mime"}
_WIRE_POLICY = email.policy.compat32.clone(linesep="\r\n")


class DowngradeError(ValueError):
    """An 8-bit message that cannot be converted to 7-bit without damage; the text says why."""


def to_7bit(data: bytes) -> bytes:
    """Convert an 8-bit message for a server without 8BITMIME (RFC 6152 §3, as Postfix does).

    Each leaf part with 8-bit content is re-encoded: ``text/*`` (and a message with no MIME
    structure at all) as quoted-printable, anything else as base64; a ``message/*`` or
    ``multipart/*`` entity labelled ``8bit``/``binary`` is relabelled ``7bit`` once its parts
    are. Everything else (headers, boundaries, 7-bit parts) is written back as it was, with
    CRLF line endings. ASCII input is returned unchanged.

    Raises DowngradeError for a signed or encrypted message (``multipart/signed``,
    ``multipart/encrypted``, ``application/pkcs7-mime``: the signature would no longer
    verify), for 8-bit header fields (those need SMTPUTF8, not a body encoding) and for 8-bit
    text outside any part (preamble, epilogue).
    """
    if data.isascii():
        return data
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    parts = list(msg.walk())
    for part in parts:
        ctype = part.get_content_type()
        if ctype in _UNCONVERTIBLE:
            raise DowngradeError(f"the message is signed or encrypted ({ctype}), and "
                                 "converting its 8-bit content would break the signature")
        for name, value in part.items():
            if not (isinstance(value, str) and value.isascii()):
                raise DowngradeError(f"header field {name} has 8-bit characters, which only "
                                     "a server offering SMTPUTF8 may receive")
    if msg.get("MIME-Version") is None:
        msg["MIME-Version"] = "1.0"
        if msg.get("Content-Type") is None:
            msg["Content-Type"] = 'text/plain; charset="unknown-8bit"'  # RFC 1428
    for part in reversed(parts):  # leaves first, so containers see converted children
        cte = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
        if part.is_multipart():
            if cte in ("8bit", "binary"):
                part.replace_header("Content-Transfer-Encoding", "7bit")
            continue
        if cte not in ("7bit", "8bit", "binary"):
            continue  # already encoded; stray 8-bit octets there are caught below
        raw = part.get_payload(decode=True)  # the octets as received, for these encodings
        if not isinstance(raw, bytes) or raw.isascii():
            continue
        if part.get_content_maintype() == "text":
            encoded = quopri.encodestring(raw.replace(b"\r\n", b"\n")).decode("ascii")
            new_cte = "quoted-printable"
        else:
            encoded = base64.encodebytes(raw).decode("ascii")
            new_cte = "base64"
        if "Content-Transfer-Encoding" in part:
            part.replace_header("Content-Transfer-Encoding", new_cte)
        else:
            part["Content-Transfer-Encoding"] = new_cte
        part.set_payload(encoded)
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, maxheaderlen=0, policy=_WIRE_POLICY).flatten(msg)
    converted = out.getvalue()
    if not converted.isascii():
        raise DowngradeError("the message has 8-bit octets outside any convertible part "
                             "(preamble, epilogue, or a part already labelled "
                             "quoted-printable or base64)")
    return converted
