"""The spool interface: typed envelope and recipient records, queue ids, the `Spool` protocol.

A spool is the durable store between reception and delivery. `store()` returns only once the
message and its envelope are on disk; `update()` records per-recipient delivery results with
the same guarantee, and drops the message once no recipient is left to try.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from .body import BodyWriter, SpooledBody


class SpoolError(Exception):
    """The spool could not do what was asked (disk full, I/O error, bad directory, ...)."""


class SpoolFull(SpoolError):
    """A store was refused to keep the space delivery results need (``spool.min_free``).

    SMTP answers it with ``452 4.3.1`` (RFC 3463: mail system full), other spool errors with
    ``451 4.3.0``.
    """


class MessageNotFound(SpoolError):
    """No message with that queue id is in the spool."""


@dataclass(frozen=True)
class ProxyInfo:
    """What the PROXY header said, kept with the message for the record."""

    version: int
    proxy_ip: str
    proxy_port: int
    source_ip: str | None
    source_port: int | None
    dest_ip: str | None
    dest_port: int | None
    tlv_hex: str = ""


@dataclass(frozen=True)
class Envelope:
    """Everything known about a message at reception, besides its data."""

    sender: str  # "" for the null sender
    recipients: tuple[str, ...]
    client_ip: str  # the PROXY-reported client when proxied
    client_port: int
    helo: str
    server_id: str
    transport: str | None = None  # None: decide at delivery
    proxy: ProxyInfo | None = None
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"; None if plaintext
    mail_params: tuple[tuple[str, str], ...] = ()  # MAIL FROM parameters kept
    size: int = 0
    received_at: float = 0.0  # time.time()
    auth: str | None = None  # the SMTP AUTH user the client authenticated as


class RecipientState(StrEnum):
    QUEUED = "queued"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"

    @property
    def pending(self) -> bool:
        """True while delivery to this recipient is still to be tried."""
        return self in (RecipientState.QUEUED, RecipientState.DEFERRED)


@dataclass(frozen=True)
class RecipientRecord:
    address: str
    state: RecipientState
    attempts: int
    next_attempt: float
    last_reply: str
    transport: str | None
    notified: int = 0  # how many "delayed" DSNs were sent for it


@dataclass(frozen=True)
class QueuedMessage:
    queue_id: str
    envelope: Envelope
    recipients: tuple[RecipientRecord, ...]  # every recipient, whatever its state


@dataclass(frozen=True)
class RecipientUpdate:
    address: str
    state: RecipientState
    attempts: int
    next_attempt: float
    last_reply: str
    notified: int | None = None  # None: leave unchanged


class QueueIdGenerator:
    """Unique, time-ordered queue ids: 6 bytes of milliseconds then a 2-byte counter, as hex.

    Ids only grow: within one millisecond the counter part counts up, and an id is never
    below one already handed out or `seed()`-ed (so a clock stepping back cannot repeat one).

    `shard`/`shards`: with several spools written at once (one per worker, see
    `supervisor.py`), spool `shard` of `shards` hands out only ids equal to `shard` modulo
    `shards`, so no two spools ever share an id.
    """

    def __init__(self, shard: int = 0, shards: int = 1) -> None:
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
        self._last = 0
        self._shard = shard
        self._shards = shards

    def seed(self, value: int) -> None:
        """Never hand out an id at or below `value` (e.g. the highest id already stored)."""
        self._last = max(self._last, value)

    def next_int(self) -> int:
        value = max((time.time_ns() // 1_000_000) << 16, self._last + 1)
        if self._shards > 1:
            value += (self._shard - value) % self._shards
        self._last = value
        return value

    def next(self) -> str:
        return format_queue_id(self.next_int())

    def __iter__(self) -> QueueIdGenerator:
        return self

    def __next__(self) -> str:
        return self.next()


def format_queue_id(value: int) -> str:
    return f"{value:016x}"


def parse_queue_id(queue_id: str) -> int | None:
    """The integer behind a queue id, or None if `queue_id` is not 16 lowercase hex digits."""
    if not isinstance(queue_id, str) or len(queue_id) != 16 or queue_id.strip("0123456789abcdef"):
        return None
    return int(queue_id, 16)


class Spool(Protocol):
    """The store interface. Every method may raise `SpoolError`."""

    async def start(self) -> None:
        """Open (creating if needed) the store; SpoolError if it cannot be used."""

    async def close(self) -> None:
        """Finish every write already issued, then release the store."""

    def new_queue_id(self) -> str:
        """Reserve a fresh queue id to pass to `store` (ids are never reused)."""

    def open_body(self, queue_id: str | None = None) -> BodyWriter:
        """A writer for a body that arrives in chunks (a large message), for `store`."""

    async def store(self, envelope: Envelope, data: bytes | BodyWriter,
                    queue_id: str | None = None) -> str:
        """Durably store a message (its bytes, or a `BodyWriter` holding them); returns its
        queue id once it is on disk. `SpoolFull` when refused for lack of space."""

    async def due(
        self, now: float, limit: int = 1000, exclude: Collection[str] = (),
        after: str | None = None,
    ) -> builtins.list[QueuedMessage]:
        """Messages with a QUEUED/DEFERRED recipient whose next_attempt <= now, each with all
        its recipients: soonest due first (ties in the order stored). `exclude`: queue ids in
        flight. `after`: only messages stored after that queue id, in the order stored (new
        mail, at a cost that follows what is returned); ValueError if it is no queue id.
        """

    async def next_due(self) -> float | None:
        """The earliest next_attempt of any pending recipient; None if nothing is pending."""

    async def read(self, queue_id: str) -> bytes | SpooledBody:
        """The message data: bytes, or a `SpooledBody` (read in chunks) for a large message;
        MessageNotFound if there is no such message."""

    async def get(self, queue_id: str) -> QueuedMessage | None: ...

    async def update(self, queue_id: str, updates: Sequence[RecipientUpdate]) -> None:
        """Durably record recipient results; the message goes once none is pending."""

    async def delete(self, queue_id: str) -> None: ...

    async def count(self) -> int:
        """How many messages are still pending."""

    async def list(self, limit: int = 100) -> builtins.list[QueuedMessage]:
        """Pending messages, oldest first."""


# -- queue control (admin API and `ferrymail queue`) -------------------------------------------

# A held recipient is pending with its next attempt put this far away (about year 31,700,000):
# `due()` never returns it and no schema change is needed. `release` makes it due at once.
HELD_AT = 1e15


def is_held(record: RecipientRecord) -> bool:
    """Whether a pending recipient is on hold (``queue hold``)."""
    return record.state.pending and record.next_attempt >= HELD_AT


class QueueControl(Protocol):
    """What the queue commands need beyond `Spool`: paging and per-message rescheduling.

    Each ``reschedule`` touches only the message's pending recipients and returns how many it
    changed; MessageNotFound when the message is not in the spool.
    """

    async def scan(self, after: str | None = None,
                   limit: int = 500) -> builtins.list[QueuedMessage]:
        """Messages in queue-id order (oldest first) after ``after`` (None: from the start)."""

    async def hold(self, queue_id: str) -> int:
        """Put the pending recipients on hold (next_attempt = HELD_AT)."""

    async def release(self, queue_id: str, now: float) -> int:
        """Make held recipients due at ``now``."""

    async def retry(self, queue_id: str, now: float) -> int:
        """Make pending, not held recipients due at ``now`` (Postfix ``postqueue -i``)."""

    async def queue_stats(self) -> dict[str, tuple[int, int, float | None]]:
        """Per pending state (queued, deferred, held): messages, recipients, oldest
        received_at."""
