"""RFC 3464 delivery status notifications: bounces (``failed``) and delay notices (``delayed``).

Pure functions: `build_dsn` turns the original message and per-recipient results into the
bytes of a ``multipart/report; report-type=delivery-status`` message (CRLF line endings),
ready to be stored in the spool with the null sender. Nothing here touches the network.
"""

from __future__ import annotations

import email.utils
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ferrymail.smtp.protocol import Reply

Action = Literal["failed", "delayed"]

MAX_ORIGINAL_HEADERS = 64 * 1024  # the text/rfc822-headers part is cut past this
_FOLD_AT = 76
_MAX_LINE = 990

MAILER_DAEMON = "MAILER-DAEMON"


@dataclass(frozen=True)
class RecipientStatus:
    """One per-recipient block of the report."""

    address: str
    action: Action
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str  # the Diagnostic-Code value: "smtp; 550 5.1.1 ..." or "X-Ferrymail; ..."
    remote_mta: str | None = None  # the MX host (or IP) that answered, if any
    last_attempt: float | None = None
    will_retry_until: float | None = None  # for "delayed"


# -- status codes and diagnostics --------------------------------------------------------------


def status_from_reply(reply: Reply, action: Action = "failed") -> str:
    """The enhanced status for a reply: its own code when it has one, else ``X.0.0``.

    A ``failed`` report about a temporary reply (a recipient that expired while 4xx) gets
    ``5.4.7`` (delivery time expired).
    """
    if action == "failed" and reply.code < 500:
        return "5.4.7"
    if reply.enhanced is not None:
        return ".".join(map(str, reply.enhanced))
    return f"{reply.code // 100}.0.0"


def smtp_diagnostic(reply: Reply) -> str:
    """``smtp; 550 5.1.1 <text>`` (multi-line replies joined with spaces)."""
    enh = ".".join(map(str, reply.enhanced)) + " " if reply.enhanced else ""
    text = " ".join(line.strip() for line in reply.lines if line.strip())
    return f"smtp; {reply.code} {enh}{text}".rstrip()


def local_diagnostic(text: str) -> str:
    """A diagnostic for a failure without an SMTP reply (DNS, configuration, hook)."""
    return f"X-Ferrymail; {text}"


# -- building the report ------------------------------------------------------------------------


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    queue_id: str,
    arrival: float,
    recipients: Sequence[RecipientStatus],
    original: bytes,
    now: float | None = None,
    envid: str | None = None,
) -> bytes:
    """The DSN message (headers and body, CRLF) to send to ``original_sender``.

    ``recipients`` must all have the same action (one report is either a bounce or a delay
    notice). The third part holds the original message's header section.
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    actions = {r.action for r in recipients}
    if len(actions) != 1:
        raise ValueError(f"a DSN reports one action, got {sorted(actions)}")
    action = actions.pop()
    now = time.time() if now is None else now
    boundary = f"=_ferrymail_{uuid.uuid4().hex}"
    from_addr = f"{MAILER_DAEMON}@{reporting_mta}"
    subject = (
        "Undelivered Mail Returned to Sender"
        if action == "failed"
        else "Delayed Mail (still being retried)"
    )
    original_headers = header_section(original)
    msgid = _original_message_id(original_headers)

    head = [
        f"From: Mail Delivery System <{from_addr}>",
        f"To: <{original_sender}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(now, usegmt=True)}",
        f"Message-ID: {email.utils.make_msgid('dsn', domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
    ]
    if msgid:
        head += [f"In-Reply-To: {msgid}", f"References: {msgid}"]

    human = _human_text(reporting_mta, action, recipients)
    per_message = [
        _field("Reporting-MTA", f"dns; {reporting_mta}"),
        _field("X-Ferrymail-Queue-ID", queue_id),
    ]
    if envid:
        per_message.append(_field("Original-Envelope-Id", envid))
    per_message.append(_field("Arrival-Date", email.utils.formatdate(arrival, usegmt=True)))
    blocks = ["\r\n".join(per_message)]
    for r in recipients:
        addr_type = "rfc822" if r.address.isascii() else "utf-8"
        fields = [
            _field("Final-Recipient", f"{addr_type}; {r.address}"),
            _field("Action", r.action),
            _field("Status", r.status),
        ]
        if r.remote_mta:
            fields.append(_field("Remote-MTA", f"dns; {r.remote_mta}"))
        fields.append(_field("Diagnostic-Code", r.diagnostic))
        if r.last_attempt is not None:
            fields.append(
                _field("Last-Attempt-Date", email.utils.formatdate(r.last_attempt, usegmt=True))
            )
        if r.will_retry_until is not None:
            fields.append(
                _field("Will-Retry-Until", email.utils.formatdate(r.will_retry_until, usegmt=True))
            )
        blocks.append("\r\n".join(fields))
    status_body = "\r\n\r\n".join(blocks) + "\r\n"
    eight_bit = not status_body.isascii() or not original_sender.isascii()

    parts = [
        "\r\n".join(head) + "\r\n\r\n",
        "This is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n",
        "Content-Type: text/plain; charset=utf-8\r\n",
        "Content-Description: Notification\r\n",
        f"Content-Transfer-Encoding: {'8bit' if not human.isascii() else '7bit'}\r\n\r\n",
        human,
        f"\r\n--{boundary}\r\n",
        "Content-Type: message/delivery-status\r\n",
        "Content-Description: Delivery report\r\n",
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}\r\n\r\n",
        status_body,
        f"\r\n--{boundary}\r\n",
        "Content-Type: text/rfc822-headers\r\n",
        "Content-Description: Undelivered Message Headers\r\n\r\n",
    ]
    out = "".join(parts).encode("utf-8")
    return out + original_headers + f"\r\n--{boundary}--\r\n".encode()


def header_section(message: bytes) -> bytes:
    """The header section of ``message`` with CRLF line ends, cut at MAX_ORIGINAL_HEADERS."""
    end = len(message)
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = message.find(sep)
        if i >= 0:
            end = min(end, i)
    head = message[:end]
    if len(head) > MAX_ORIGINAL_HEADERS:
        cut = head.rfind(b"\n", 0, MAX_ORIGINAL_HEADERS)
        head = head[: cut if cut > 0 else MAX_ORIGINAL_HEADERS]
    head = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    # a line starting with "--" could be read as a boundary; indent it (it is only a record)
    lines = [b" " + ln if ln.startswith(b"--") else ln for ln in head.split(b"\r\n")]
    return b"\r\n".join(lines) + b"\r\n"


def _original_message_id(headers: bytes) -> str | None:
    msg = email.message_from_bytes(headers + b"\r\n")
    value = msg.get("Message-ID")
    if value is None:
        return None
    text = " ".join(str(value).split())
    if text.startswith("<") and text.endswith(">") and text.isascii() and len(text) < 900:
        return text
    return None


def _human_text(host: str, action: Action, recipients: Sequence[RecipientStatus]) -> str:
    if action == "failed":
        intro = (
            f"This is the mail system at host {host}.\r\n\r\n"
            "Your message could not be delivered to one or more recipients.\r\n"
            "It is attached below (headers only). The reasons follow.\r\n\r\n"
        )
    else:
        until = [r.will_retry_until for r in recipients if r.will_retry_until]
        retry = (
            f"Delivery will be retried until {email.utils.formatdate(max(until), usegmt=True)}."
            if until
            else "Delivery will be retried."
        )
        intro = (
            f"This is the mail system at host {host}.\r\n\r\n"
            "Your message could not be delivered yet to one or more recipients.\r\n"
            f"{retry} You do not need to send it again.\r\n\r\n"
        )
    lines = []
    for r in recipients:
        _, _, why = r.diagnostic.partition("; ")
        lines.append(f"<{r.address}>: {_clean(why or r.diagnostic)}")
    return intro + "\r\n".join(lines) + "\r\n"


def _clean(text: str) -> str:
    """One line: control characters become spaces."""
    return "".join(c if c.isprintable() else " " for c in text).strip()


def _field(name: str, value: str) -> str:
    """``Name: value`` folded at spaces to lines of about 76 octets (never over 990)."""
    text = f"{name}: {_clean(value)}"
    if len(text) <= _FOLD_AT:
        return text
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        while len(word) > _MAX_LINE:  # no space to fold at: cut hard
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:_MAX_LINE])
            word = word[_MAX_LINE:]
        if not line:
            line = word
        elif len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line = word
        else:
            line += " " + word
    if line:
        lines.append(line)
    return "\r\n\t".join(x for x in lines if x)
