"""The bodies of messages stored lately, kept in memory for their first delivery attempt.

A relayed message is read back from the spool moments after it was stored: without this, each
read is a round trip to the reader thread (queue, futex wake-ups, a SELECT of the blob, a
copy) on the relay path. The bodies are immutable once stored, so a kept copy is exact; the
spool drops it when the message goes (delete, or an update that finishes its last
recipients). Bounded by bytes and entries, oldest out first; a miss reads the database as
before, so nothing depends on an entry being here.
"""

from __future__ import annotations

MAX_BYTES = 8 * 1024 * 1024  # bodies kept at most, in bytes
MAX_ENTRIES = 4096


class RecentBodies:
    """``msg_id -> body`` for bodies stored in memory (not body files), FIFO-bounded by
    ``max_bytes`` and ``max_entries``. Used from the event loop's thread only."""

    def __init__(self, max_bytes: int = MAX_BYTES, max_entries: int = MAX_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evicted = 0  # dropped for room before they were read back or removed
        self._bodies: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._bodies)

    def put(self, msg_id: int, data: bytes) -> None:
        """Keep ``data`` (a body larger than ``max_bytes / 4`` is not kept: it would push
        out many others)."""
        self.discard(msg_id)  # never an outdated body, even if this one is not kept
        size = len(data)
        if size > self.max_bytes // 4:
            return
        bodies = self._bodies
        while bodies and (self.bytes + size > self.max_bytes
                          or len(bodies) >= self.max_entries):
            gone = bodies.pop(next(iter(bodies)))
            self.bytes -= len(gone)
            self.evicted += 1
        bodies[msg_id] = data
        self.bytes += size

    def get(self, msg_id: int) -> bytes | None:
        data = self._bodies.get(msg_id)
        if data is None:
            self.misses += 1
        else:
            self.hits += 1
        return data

    def discard(self, msg_id: int) -> None:
        data = self._bodies.pop(msg_id, None)
        if data is not None:
            self.bytes -= len(data)

    def clear(self) -> None:
        self._bodies.clear()
        self.bytes = 0
