"""The durable spool: nothing is acknowledged before it is here and on disk."""

from .base import (
    Envelope,
    MessageNotFound,
    ProxyInfo,
    QueuedMessage,
    QueueIdGenerator,
    RecipientRecord,
    RecipientState,
    RecipientUpdate,
    Spool,
    SpoolError,
    SpoolFull,
    format_queue_id,
    parse_queue_id,
)
from .body import BodyWriter, SpooledBody, body_bytes
from .sqlite import SqliteSpool

__all__ = [
    "BodyWriter",
    "Envelope",
    "MessageNotFound",
    "ProxyInfo",
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
    "parse_queue_id",
]
