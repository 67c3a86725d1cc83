"""The durable spool: nothing is acknowledged before it is here and on disk."""

from .base import (
    HELD_AT,
    Envelope,
    MessageNotFound,
    ProxyInfo,
    QueueControl,
    QueuedMessage,
    QueueIdGenerator,
    RecipientRecord,
    RecipientState,
    RecipientUpdate,
    Spool,
    SpoolError,
    SpoolFull,
    format_queue_id,
    is_held,
    parse_queue_id,
)
from .body import BodyWriter, SpooledBody, body_bytes
from .sqlite import SqliteSpool

__all__ = [
    "HELD_AT",
    "BodyWriter",
    "Envelope",
    "MessageNotFound",
    "ProxyInfo",
    "QueueControl",
    "QueueIdGenerator",
    "QueuedMessage",
    "RecipientRecord",
    "RecipientState",
    "RecipientUpdate",
    "Spool",
    "SpoolError",
    "SpoolFull",
    "SpooledBody",
    "SqliteSpool",
    "body_bytes",
    "format_queue_id",
    "is_held",
    "parse_queue_id",
]
