"""Startup models for how strictly inbound SMTP judges its clients (``servers[].policy``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class InboundPolicy(BaseModel):
    """``servers[].policy``: what the grammar leaves to the operator.

    ``bare_newline``: a command line ending in a bare LF (Postfix
    ``smtpd_forbid_bare_newline``): ``reject`` (521 and close) or ``accept`` (LF ends the
    line). DATA content with a bare CR or LF is refused either way.
    ``helo``: a HELO/EHLO argument that is neither a domain nor an address literal:
    ``reject`` (501) or ``accept`` (kept, and written quoted in ``Received:``).
    ``routed_addresses``: recipients with sender-specified routing (``user%host@…``,
    ``host!user@…``, ``"user@host"@…``) from clients outside ``relay_networks`` (Postfix
    ``allow_untrusted_routing``): ``reject`` (550 5.7.1) or ``accept``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bare_newline: Literal["reject", "accept"] = "reject"
    helo: Literal["reject", "accept"] = "reject"
    routed_addresses: Literal["reject", "accept"] = "reject"
