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
    format_queue_id,
    is_held,
    parse_queue_id,
)
from .sqlite import SqliteSpool

__all__ = [
    "HELD_AT",
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
    "SqliteSpool",
    "format_queue_id",
    "is_held",
    "parse_queue_id",
]
