"""Queue control for the SQLite spool: paging and per-message rescheduling (hold, release,
retry), kept apart from the store's own internals (`sqlite.py`) and mixed into `SqliteSpool`.

Writes go through the spool's writer thread like every other write (one op each, committed
with the next batch); reads through its reader connection.
"""

from __future__ import annotations

import asyncio
import builtins
import sqlite3
from typing import Any, ClassVar

from .base import HELD_AT, MessageNotFound, QueuedMessage, format_queue_id, parse_queue_id

_PENDING = "state IN ('queued', 'deferred')"


class _Reschedule:
    """Set ``next_attempt`` of a message's pending recipients matching ``where``.

    Duck-types the spool's write op (``future``, ``msg_id``, ``nbytes``, ``body_file_gone``,
    ``verb``, ``apply``); tests/unit/test_admin.py checks it against ``sqlite._Op``.
    """

    verb: ClassVar[str] = "reschedule"
    nbytes = 0
    body_file_gone = False  # it never removes a message

    def __init__(self, future: asyncio.Future[Any], msg_id: int, when: float, where: str,
                 params: tuple[Any, ...] = ()) -> None:
        self.future = future
        self.msg_id = msg_id
        self.when = when
        self.where = where
        self.params = params

    def apply(self, conn: sqlite3.Connection) -> int:
        if conn.execute("SELECT 1 FROM messages WHERE id = ?", (self.msg_id,)).fetchone() is None:
            raise MessageNotFound(f"no message {format_queue_id(self.msg_id)} in the spool")
        return conn.execute(
            f"UPDATE recipients SET next_attempt = ? WHERE msg = ? AND {_PENDING}"
            f" AND {self.where}", (self.when, self.msg_id, *self.params)).rowcount


class SqliteQueueControl:
    """The `QueueControl` methods of `SqliteSpool` (a mixin: uses its ``_read``/``_write``)."""

    _read: Any
    _write: Any
    _msg_id: Any
    _conn: Any
    _q_load: Any

    async def scan(self, after: str | None = None,
                   limit: int = 500) -> builtins.list[QueuedMessage]:
        if after is None:
            low = -1
        elif (low := parse_queue_id(after)) is None:  # type: ignore[assignment]
            raise ValueError(f"malformed queue id {after!r}")
        ids = await self._read(self._q_scan_ids, low, int(limit))
        return await self._read(self._q_load, ids)

    def _q_scan_ids(self, after: int, limit: int) -> builtins.list[int]:
        return [r[0] for r in self._conn().execute(
            "SELECT id FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after, limit))]

    async def hold(self, queue_id: str) -> int:
        msg_id = self._msg_id(queue_id)
        return await self._write(
            lambda fut: _Reschedule(fut, msg_id, HELD_AT, "next_attempt < ?", (HELD_AT,)))

    async def release(self, queue_id: str, now: float) -> int:
        msg_id = self._msg_id(queue_id)
        return await self._write(
            lambda fut: _Reschedule(fut, msg_id, float(now), "next_attempt >= ?", (HELD_AT,)))

    async def retry(self, queue_id: str, now: float) -> int:
        msg_id = self._msg_id(queue_id)
        return await self._write(lambda fut: _Reschedule(
            fut, msg_id, float(now), "next_attempt > ? AND next_attempt < ?", (now, HELD_AT)))

    async def queue_stats(self) -> dict[str, tuple[int, int, float | None]]:
        """Per state of pending recipients (``queued``, ``deferred``, ``held``): messages,
        recipients, and when the oldest message was stored (None if none).

        The time comes from the queue id (milliseconds since the epoch in its upper 48 bits,
        see `QueueIdGenerator`), so the query reads the recipients table alone."""
        return await self._read(self._q_stats)

    def _q_stats(self) -> dict[str, tuple[int, int, float | None]]:
        sql = ("SELECT CASE WHEN next_attempt >= ? THEN 'held' ELSE state END AS st,"
               f" COUNT(DISTINCT msg), COUNT(*), MIN(msg) FROM recipients WHERE {_PENDING}"
               " GROUP BY st")
        return {st: (m, n, None if first is None else (first >> 16) / 1000.0)
                for st, m, n, first in self._conn().execute(sql, (HELD_AT,))}
