"""The embedded spool: one SQLite database in WAL mode, written with group commit.

One writer thread owns the write connection. Every write (`store`, `update`, `delete`) is
queued with an asyncio future; the thread takes whatever is pending (up to a batch cap),
applies it in one transaction, commits (one fsync of the WAL with `synchronous=FULL`) and
only then resolves the futures. Sessions that finish DATA while a commit is in progress thus
share the next fsync. A batch of new messages is one INSERT statement (into a temporary view
whose trigger fills the three tables), committed on its own. Reads use a second connection on
its own thread; a third, on a checkpointer thread, copies the WAL into the database file while
the writer goes on committing.

Layout: `messages` (queue id as integer key, envelope as JSON), `bodies` (the data, one BLOB
per message, kept apart so that scans over envelopes never touch message data) and
`recipients` (one row per distinct recipient with its delivery state). A large message has
no `bodies` row: its data is the file `bodies/<queue id>`, written in chunks while it
arrived and made durable before its rows are committed (see `body.py`).
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import errno
import fcntl
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Collection, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

from ferrymail.observe.log import log_event

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
from .body import BODIES_DIR, PART_SUFFIX, BodyWriter, SpooledBody
from .recent import RecentBodies
from .reserve import RESERVE_NAME, SpaceReserve
from .sqlite_control import SqliteQueueControl

DB_NAME = "spool.db"
APPLICATION_ID = 0x46455259  # "FERY", marks the file as a ferrymail spool
SCHEMA_VERSION = 2  # 2: a message without a `bodies` row has its body in bodies/<queue id>
BATCH_MAX_ITEMS = 512
BATCH_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MIN_FREE = 16 * 1024 * 1024
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
# Page size of new spools. SQLite's 4 KiB default means 25 WAL frames (50 writes) for a
# 100 KB body, then 25 reads and writes more to checkpoint it; 16 KiB pages cut that by four
# and took 100 KB reception from ~1,500 to ~1,850 msg/s, with no loss for 2 KB messages.
PAGE_SIZE = 16384

_PENDING_SQL = "state IN ('queued', 'deferred')"  # must match the partial index text
_FINAL_STATES = frozenset((RecipientState.DELIVERED, RecipientState.FAILED))
_PENDING_NAMES = frozenset(("queued", "deferred"))  # as _PENDING_SQL names them
SAVEPOINT_NEEDED = object()  # an op's apply_checked: "run my apply in a savepoint"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    envelope TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bodies (
    id INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients (
    msg INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt REAL NOT NULL,
    last_reply TEXT NOT NULL,
    transport TEXT,
    notified INTEGER NOT NULL,
    PRIMARY KEY (msg, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipients_pending ON recipients (next_attempt, msg)
    WHERE {_PENDING_SQL};
"""

_RECIPIENT_COLUMNS = "msg, address, state, attempts, next_attempt, last_reply, transport, notified"

_OPEN, _CLOSING, _CLOSED, _NEW = "open", "closing", "closed", "new"
_STOP = object()  # queued by close(): the writer finishes what precedes it, then exits

_Result = tuple["asyncio.Future[Any]", Any, BaseException | None]


# -- envelope <-> JSON -----------------------------------------------------------------------


# ensure_ascii (the default) keeps even lone surrogates intact through the TEXT column; one
# encoder for all (json.dumps with arguments would build a new one per call)
_encoder = json.JSONEncoder(separators=(",", ":"))
if json.encoder.c_make_encoder is not None:
    # JSONEncoder.encode builds a new C encoder on every call (a third of its time for an
    # envelope); this one is built once, with the same settings (ASCII, no NaN check, no
    # sorting, compact separators). No circular-reference check (markers=None): the
    # documents are our own flat dicts and lists.
    _c_encode = json.encoder.c_make_encoder(
        None, _encoder.default, json.encoder.encode_basestring_ascii, None, ":", ",",
        False, False, True,
    )

    def _encode_json(doc: object) -> str:
        return "".join(_c_encode(doc, 0))
else:  # pragma: no cover - CPython always has the _json accelerator
    _encode_json = _encoder.encode
_PROXY_FIELDS = tuple(f.name for f in fields(ProxyInfo))


def envelope_to_json(env: Envelope) -> str:
    proxy = env.proxy
    doc = {
        "sender": env.sender,
        "recipients": list(env.recipients),
        "client_ip": env.client_ip,
        "client_port": env.client_port,
        "helo": env.helo,
        "server_id": env.server_id,
        "transport": env.transport,
        "proxy": None if proxy is None else {name: getattr(proxy, name) for name in _PROXY_FIELDS},
        "tls": env.tls,
        "mail_params": [[key, value] for key, value in env.mail_params],
        "size": env.size,
        "received_at": env.received_at,
        "auth": env.auth,
    }
    return _encode_json(doc)


def envelope_from_json(text: str) -> Envelope:
    doc = json.loads(text)
    proxy = doc["proxy"]
    return Envelope(
        sender=doc["sender"],
        recipients=tuple(doc["recipients"]),
        client_ip=doc["client_ip"],
        client_port=doc["client_port"],
        helo=doc["helo"],
        server_id=doc["server_id"],
        transport=doc["transport"],
        proxy=None if proxy is None else ProxyInfo(**proxy),
        tls=doc["tls"],
        mail_params=tuple((key, value) for key, value in doc["mail_params"]),
        size=doc["size"],
        received_at=doc["received_at"],
        auth=doc.get("auth"),  # absent in envelopes stored before AUTH existed
    )


def _check_envelope(envelope: object) -> None:
    """What ``store()`` refuses before writing: TypeError for a non-Envelope, ValueError for
    no recipients or a recipient that is not valid text."""
    if not isinstance(envelope, Envelope):
        raise TypeError(f"store() needs an Envelope, not {type(envelope).__name__}")
    if not envelope.recipients:
        raise ValueError("cannot store a message without recipients")
    for address in envelope.recipients:
        if not isinstance(address, str) or not _is_utf8(address):
            raise ValueError(f"recipient {address!r} is not valid text")


def _is_utf8(text: str) -> bool:
    """Whether SQLite can take `text` (no lone surrogates, e.g. from "surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8_text(text: str) -> str:
    """`text`, with what SQLite cannot take escaped (for diagnostics such as replies)."""
    if _is_utf8(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# -- write operations (run on the writer thread) ---------------------------------------------


class _Op:
    """One queued write; `apply` runs inside the batch transaction on the writer thread."""

    verb: ClassVar[str] = "write"

    def __init__(self, future: asyncio.Future[Any], msg_id: int, nbytes: int = 0) -> None:
        self.future = future
        self.msg_id = msg_id
        self.nbytes = nbytes
        self.body_file_gone = False  # removed a message whose body is a file: unlink it

    def apply(self, conn: sqlite3.Connection) -> Any:
        raise NotImplementedError


class _Store(_Op):
    """A new message, encoded on the caller's side so that bad input fails there, at once."""

    verb = "store"

    def __init__(
        self, future: asyncio.Future[Any], msg_id: int, envelope: Envelope, data: bytes | None
    ) -> None:
        # data None: the body is already a file of the spool (bodies/<queue id>)
        super().__init__(future, msg_id, 0 if data is None else len(data))
        # a recipient given twice is one recipient; json_each() hands out (index, address)
        rcpts = _encode_json(list(dict.fromkeys(envelope.recipients)))
        self.row = (msg_id, envelope_to_json(envelope), data, envelope.received_at,
                    envelope.transport, rcpts)


# One row inserted into this view stores a message in all three tables, so that a batch of
# messages is one INSERT statement. The sqlite3 module lets go of the GIL around every
# statement step, and every step handed back to a busy event loop costs a futex round trip
# and a wait for the loop's next switch: per-table `executemany` meant 6 of them per message.
_INCOMING = (
    """CREATE TEMP VIEW IF NOT EXISTS incoming (id, envelope, data, received_at, transport, rcpts)
    AS SELECT 0, '', x'', 0.0, NULL, '[]' WHERE 0""",
    """CREATE TEMP TRIGGER IF NOT EXISTS incoming_store INSTEAD OF INSERT ON incoming BEGIN
    INSERT INTO messages (id, envelope) VALUES (NEW.id, NEW.envelope);
    INSERT INTO bodies (id, data) SELECT NEW.id, NEW.data WHERE NEW.data IS NOT NULL;
    INSERT INTO recipients SELECT NEW.id, key, value, 'queued', 0, NEW.received_at, '',
        NEW.transport, 0 FROM json_each(NEW.rcpts);
END""",
)
_ROWS_PER_INSERT = 64  # stores per INSERT statement (6 parameters each)
_insert_sql: dict[int, str] = {}


def _insert_stores(conn: sqlite3.Connection, stores: builtins.list[_Store]) -> None:
    for start in range(0, len(stores), _ROWS_PER_INSERT):
        chunk = stores[start:start + _ROWS_PER_INSERT]
        sql = _insert_sql.get(len(chunk))
        if sql is None:
            sql = _insert_sql[len(chunk)] = "INSERT INTO incoming VALUES " + ",".join(
                ["(?,?,?,?,?,?)"] * len(chunk))
        conn.execute(sql, [value for op in chunk for value in op.row])


class _Update(_Op):
    verb = "update"

    def __init__(
        self, future: asyncio.Future[Any], msg_id: int, updates: tuple[RecipientUpdate, ...]
    ) -> None:
        super().__init__(future, msg_id)
        self.updates = updates

    def apply_checked(self, conn: sqlite3.Connection) -> object:
        """The common last update (every recipient it names delivered or failed, none other
        pending) without a savepoint: it raises only before its first write, then removes
        the message (its recipients' new states would go with it). `SAVEPOINT_NEEDED` for
        any other update (then `apply` runs inside a savepoint)."""
        if not all(upd.state in _FINAL_STATES for upd in self.updates):
            return SAVEPOINT_NEEDED
        rows = conn.execute(
            "SELECT address, idx, state FROM recipients WHERE msg = ?", (self.msg_id,)
        ).fetchall()
        if not rows:
            raise MessageNotFound(f"no message {format_queue_id(self.msg_id)} in the spool")
        self._params({address: idx for address, idx, _ in rows})  # refuses what apply refuses
        named = {upd.address for upd in self.updates}
        if any(state in _PENDING_NAMES and address not in named for address, _, state in rows):
            return SAVEPOINT_NEEDED
        self.body_file_gone = _remove(conn, self.msg_id) == _GONE_WITH_FILE
        return None

    def apply(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute(
            "SELECT address, idx FROM recipients WHERE msg = ?", (self.msg_id,)
        ).fetchall()
        if not rows:
            raise MessageNotFound(f"no message {format_queue_id(self.msg_id)} in the spool")
        params = self._params(dict(rows))
        conn.executemany(
            "UPDATE recipients SET state = ?, attempts = ?, next_attempt = ?, last_reply = ?,"
            " notified = COALESCE(?, notified) WHERE msg = ? AND idx = ?",
            params,
        )
        pending = conn.execute(
            f"SELECT 1 FROM recipients WHERE msg = ? AND {_PENDING_SQL} LIMIT 1", (self.msg_id,)
        ).fetchone()
        if pending is None:
            self.body_file_gone = _remove(conn, self.msg_id) == _GONE_WITH_FILE

    def _params(self, index: dict[str, int]) -> builtins.list[tuple[Any, ...]]:
        """The UPDATE's rows; SpoolError for a recipient the message does not have, ValueError
        or TypeError for a bad value."""
        params = []
        for upd in self.updates:
            idx = index.get(upd.address)
            if idx is None:
                raise SpoolError(
                    f"message {format_queue_id(self.msg_id)} has no recipient {upd.address!r}"
                )
            params.append(
                (
                    RecipientState(upd.state).value,
                    int(upd.attempts),
                    float(upd.next_attempt),
                    _utf8_text(str(upd.last_reply)),
                    None if upd.notified is None else int(upd.notified),
                    self.msg_id,
                    idx,
                )
            )
        return params


class _Delete(_Op):
    verb = "delete"

    def apply_checked(self, conn: sqlite3.Connection) -> object:
        """No savepoint needed: `_remove` writes nothing when the message is not there."""
        self.apply(conn)
        return None

    def apply(self, conn: sqlite3.Connection) -> None:
        gone = _remove(conn, self.msg_id)
        if not gone:
            raise MessageNotFound(f"no message {format_queue_id(self.msg_id)} in the spool")
        self.body_file_gone = gone == _GONE_WITH_FILE


_GONE, _GONE_WITH_FILE = 1, 2


def _remove(conn: sqlite3.Connection, msg_id: int) -> int:
    """Delete a message's rows: 0 if there was none, _GONE_WITH_FILE if its body is a file."""
    gone = conn.execute("DELETE FROM messages WHERE id = ?", (msg_id,)).rowcount
    if not gone:
        return 0  # nothing written
    blob = conn.execute("DELETE FROM bodies WHERE id = ?", (msg_id,)).rowcount
    conn.execute("DELETE FROM recipients WHERE msg = ?", (msg_id,))
    return _GONE if blob else _GONE_WITH_FILE


def _resolve(results: list[_Result]) -> None:
    for future, value, exc in results:
        if future.done():  # cancelled by its caller meanwhile
            continue
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)


# -- the spool -------------------------------------------------------------------------------


class SqliteSpool(SqliteQueueControl, Spool):
    """The `Spool` kept in `path/spool.db` (SQLite, WAL), with group commit.

    `fsync=False` (benchmarks only) turns commits into plain writes.

    Disk space: `min_free` bytes are kept allocated in the file `reserve` beside the database
    (see `reserve.py`). Delivery results and deletions that fail for lack of space give the
    reserve back and are retried, so they are written even on a full file system; stores are
    refused with `SpoolFull` while the reserve is not held, and while the space left besides
    it would not take a batch twice (WAL, then database) plus one WAL checkpoint interval.

    While open, the spool holds an exclusive lock on its directory: a second spool on the
    same directory fails at `start()`. `readonly=True` (for inspection, e.g. `queue list`
    beside a running daemon) takes no lock, needs an existing spool, and refuses writes.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fsync: bool = True,
        min_free: int = DEFAULT_MIN_FREE,
        readonly: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.path = Path(path)
        self.db_path = self.path / DB_NAME
        self.fsync = fsync
        self._min_free = max(0, min_free)
        self.readonly = readonly
        self.commits = 0  # transactions committed by the writer (one fsync each)
        self.refused = 0  # stores refused for lack of space (SpoolFull)
        self.reserve_releases = 0  # times the reserve was given back for delivery results
        self._reserve = SpaceReserve(self.path / RESERVE_NAME, max(0, min_free))
        self._wal_bytes = 0  # the WAL's size between automatic checkpoints
        self._reserve_unusable = False  # no file may be that big (RLIMIT_FSIZE)
        self._state = _NEW
        self._ids = QueueIdGenerator(*shard)  # (this spool, of how many): see supervisor.py
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._writer_done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None
        self._dir_fd: int | None = None
        self._closing: asyncio.Future[None] | None = None
        self._page_size = 4096
        # Background checkpoints (see _checkpointer_main): the writer counts roughly how many
        # pages it appended to the WAL and wakes the checkpointer every `_ckpt_every` pages.
        self._ckpt_wanted = threading.Event()
        self._ckpt_stop = False
        self._ckpt_pages = 0
        self._ckpt_every = 250
        self.recent = RecentBodies()  # bodies just stored, for the first delivery's read

    @property
    def min_free(self) -> int:
        """Bytes kept for delivery results (the reserve); applies from the next store on."""
        return self._min_free

    @min_free.setter
    def min_free(self, value: int) -> None:
        self._min_free = max(0, int(value))

    # -- lifecycle

    async def start(self) -> None:
        if self._state != _NEW:
            raise SpoolError(f"spool {self.path} was already started")
        self._state = _CLOSED  # until fully open
        self._loop = asyncio.get_running_loop()
        if not self.readonly:
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._writer = threading.Thread(
                target=self._writer_main,
                args=(ready,),
                name="ferrymail-spool-writer",
                daemon=True,
            )
            self._writer.start()
            try:
                await asyncio.wrap_future(ready)
            except BaseException:
                self._queue.put(_STOP)  # in case it was us being cancelled, not the writer
                raise
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ferrymail-spool-reader"
        )
        try:
            await self._loop.run_in_executor(self._reader, self._open_reader)
        except BaseException:
            self._reader.shutdown(wait=False)
            if self._writer is not None:
                self._queue.put(_STOP)
                await asyncio.wrap_future(self._writer_done)
            raise
        self._state = _OPEN

    async def close(self) -> None:
        if self._closing is None:
            if self._state != _OPEN:
                return
            self._state = _CLOSING  # refuses new writes; those already queued still run
            self._closing = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._closing)  # the shutdown completes even if we are cancelled

    async def _shutdown(self) -> None:
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.wrap_future(self._writer_done)
        assert self._loop is not None and self._reader is not None
        await self._loop.run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=False)
        self._state = _CLOSED

    async def __aenter__(self) -> SqliteSpool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- writes

    def new_queue_id(self) -> str:
        """Reserve a queue id now (e.g. to name it in a Received: header) for `store`."""
        return self._ids.next()

    def open_body(self, queue_id: str | None = None) -> BodyWriter:
        """A file for a body to be written in chunks as it arrives, then passed to `store`
        (or `abort()`-ed). Never raises: a failure to create or write it is kept in the
        writer and reported by `store`."""
        if queue_id is None or parse_queue_id(queue_id) is None:
            queue_id = self.new_queue_id()
        return BodyWriter(self.path / BODIES_DIR, queue_id)

    async def store(self, envelope: Envelope, data: bytes | BodyWriter,
                    queue_id: str | None = None) -> str:
        """Durably store a message. `data` is the message, or a `BodyWriter` from
        `open_body` holding it (then its queue id is the message's). `SpoolFull` when refused
        for lack of space, `SpoolError` for other failures; a body file is removed then."""
        if isinstance(data, BodyWriter):
            return await self._store_file(envelope, data)
        if queue_id is None:
            msg_id = self._ids.next_int()
        elif (msg_id := parse_queue_id(queue_id)) is None:  # type: ignore[assignment]
            raise ValueError(f"malformed queue id {queue_id!r}")
        _check_envelope(envelope)
        if not isinstance(data, bytes):
            data = bytes(data)  # a copy: the caller may reuse its buffer
        stored = await self._write(lambda fut: _Store(fut, msg_id, envelope, data))
        self.recent.put(msg_id, data)
        return stored

    async def _store_file(self, envelope: Envelope, body: BodyWriter) -> str:
        msg_id = parse_queue_id(body.queue_id)
        try:
            if msg_id is None:
                raise ValueError(f"malformed queue id {body.queue_id!r}")
            _check_envelope(envelope)
            if self._state != _OPEN or self.readonly:
                raise SpoolError(f"spool {self.path} is not open for writing")
            if body.error is not None:
                kind = SpoolFull if body.disk_full else SpoolError
                raise kind(f"spool {self.path}: {body.error}")
        except BaseException:
            body.abort()
            raise
        assert self._loop is not None
        try:
            await self._loop.run_in_executor(None, body.commit, self.fsync)
        except OSError as exc:
            kind = SpoolFull if exc.errno in (errno.ENOSPC, errno.EDQUOT) else SpoolError
            raise kind(f"spool {self.path}: cannot make {body.final_path} durable:"
                       f" {exc.strerror or exc}") from exc
        try:
            return await self._write(lambda fut: _Store(fut, msg_id, envelope, None))
        except SpoolError:
            # refused or rolled back: no row names the file
            with contextlib.suppress(OSError):
                os.unlink(body.final_path)
            raise
        # (cancelled: the rows may still be committed; a file without rows goes at the
        # next start)

    async def update(self, queue_id: str, updates: Sequence[RecipientUpdate]) -> None:
        msg_id = self._msg_id(queue_id)
        frozen = tuple(updates)
        if all(u.state in _FINAL_STATES for u in frozen):
            # the message may go with this update (no recipient left pending): its body must
            # not outlive it here (a read then says MessageNotFound, as the database would)
            self.recent.discard(msg_id)
        await self._write(lambda fut: _Update(fut, msg_id, frozen))

    async def delete(self, queue_id: str) -> None:
        msg_id = self._msg_id(queue_id)
        self.recent.discard(msg_id)
        await self._write(lambda fut: _Delete(fut, msg_id))

    async def _write(self, make: Any) -> Any:
        if self._state != _OPEN:
            raise SpoolError(f"spool {self.path} is not open")
        if self.readonly:
            raise SpoolError(f"spool {self.path} is open read-only")
        assert self._loop is not None
        future = self._loop.create_future()
        self._queue.put(make(future))
        return await future

    # -- reads

    async def read(self, queue_id: str) -> bytes | SpooledBody:
        """The message data: bytes, or for a large message a `SpooledBody` to read in
        chunks. MessageNotFound if there is no such message."""
        msg_id = self._msg_id(queue_id)
        if self._state == _OPEN and (kept := self.recent.get(msg_id)) is not None:
            return kept
        data = await self._read(self._q_read, msg_id)
        if data is None:
            raise MessageNotFound(f"no message {queue_id} in spool {self.path}")
        return data

    async def get(self, queue_id: str) -> QueuedMessage | None:
        msg_id = parse_queue_id(queue_id)
        if msg_id is None:
            return None
        found = await self._read(self._q_load, [msg_id])
        return found[0] if found else None

    async def due(
        self, now: float, limit: int = 1000, exclude: Collection[str] = (),
        after: str | None = None,
    ) -> builtins.list[QueuedMessage]:
        skip = [i for i in map(parse_queue_id, exclude) if i is not None]
        if after is None:
            low = None
        elif (low := parse_queue_id(after)) is None:
            raise ValueError(f"malformed queue id {after!r}")
        return await self._read(self._q_due, float(now), int(limit), json.dumps(skip), low)

    async def next_due(self) -> float | None:
        return await self._read(self._q_next_due)

    async def count(self) -> int:
        return await self._read(self._q_count)

    async def list(self, limit: int = 100) -> builtins.list[QueuedMessage]:
        return await self._read(self._q_list, int(limit))

    async def _read(self, fn: Any, *args: Any) -> Any:
        if self._state not in (_OPEN, _CLOSING):
            raise SpoolError(f"spool {self.path} is not open")
        assert self._loop is not None and self._reader is not None
        try:
            return await self._loop.run_in_executor(self._reader, fn, *args)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.db_path}: read failed: {_describe(exc)}") from exc

    def _msg_id(self, queue_id: str) -> int:
        msg_id = parse_queue_id(queue_id)
        if msg_id is None:
            raise MessageNotFound(f"{queue_id!r} is not a queue id (16 lowercase hex digits)")
        return msg_id

    # -- reader thread

    def _open_reader(self) -> None:
        if self.readonly:
            if not self.db_path.is_file():
                raise SpoolError(f"no spool database at {self.db_path}")
            # mode=ro: no lock taken, nothing created; works beside a running writer
            target, uri = f"{self.db_path.resolve().as_uri()}?mode=ro", True
        else:
            target, uri = str(self.db_path), False
        try:
            conn = sqlite3.connect(target, uri=uri, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open spool {self.db_path} for reading: {exc}") from exc
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA query_only = ON")
            conn.execute("PRAGMA temp_store = MEMORY")
            if self.readonly:
                self._check_schema(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise SpoolError(
                    f"cannot open spool {self.db_path} for reading: {_describe(exc)}"
                ) from exc
            raise
        self._rconn = conn

    def _close_reader(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    def _conn(self) -> sqlite3.Connection:
        if self._rconn is None:
            raise SpoolError(f"spool {self.path} is closed")
        return self._rconn

    def _q_read(self, msg_id: int) -> bytes | SpooledBody | None:
        conn = self._conn()
        row = conn.execute("SELECT data FROM bodies WHERE id = ?", (msg_id,)).fetchone()
        if row is not None:
            return row[0]
        if conn.execute("SELECT 1 FROM messages WHERE id = ?", (msg_id,)).fetchone() is None:
            return None
        path = self.path / BODIES_DIR / format_queue_id(msg_id)
        try:
            return SpooledBody(path, path.stat().st_size)
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: the body of message"
                             f" {format_queue_id(msg_id)} is missing: {exc.strerror}") from exc

    def _q_next_due(self) -> float | None:
        sql = f"SELECT MIN(next_attempt) FROM recipients WHERE {_PENDING_SQL}"
        return self._conn().execute(sql).fetchone()[0]

    def _q_count(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    def _q_due(
        self, now: float, limit: int, skip_json: str, after: int | None
    ) -> builtins.list[QueuedMessage]:
        conn = self._conn()
        with _read_transaction(conn):
            if after is None:
                # Walks the partial index in its own order and stops at `limit`: no sort, so
                # the cost follows what is returned (plus what is skipped), not the queue size.
                sql = ("SELECT DISTINCT msg FROM recipients INDEXED BY recipients_pending"
                       f" WHERE {_PENDING_SQL} AND next_attempt <= ?"
                       " AND msg NOT IN (SELECT value FROM json_each(?))"
                       " ORDER BY next_attempt, msg LIMIT ?")
                params: tuple[Any, ...] = (now, skip_json, limit)
            else:
                # Newer than `after`: a range of the primary key, walked in id order.
                sql = ("SELECT DISTINCT msg FROM recipients NOT INDEXED"
                       f" WHERE msg > ? AND {_PENDING_SQL} AND next_attempt <= ?"
                       " AND msg NOT IN (SELECT value FROM json_each(?))"
                       " ORDER BY msg LIMIT ?")
                params = (after, now, skip_json, limit)
            ids = [row[0] for row in conn.execute(sql, params)]
            return self._load(conn, ids)

    def _q_list(self, limit: int) -> builtins.list[QueuedMessage]:
        conn = self._conn()
        with _read_transaction(conn):
            ids = [
                r[0] for r in conn.execute("SELECT id FROM messages ORDER BY id LIMIT ?", (limit,))
            ]
            return self._load(conn, ids)

    def _q_load(self, ids: builtins.list[int]) -> builtins.list[QueuedMessage]:
        conn = self._conn()
        with _read_transaction(conn):
            return self._load(conn, ids)

    @staticmethod
    def _load(conn: sqlite3.Connection, ids: builtins.list[int]) -> builtins.list[QueuedMessage]:
        """The messages with these ids (in that order) with all their recipients."""
        if not ids:
            return []
        ids_json = json.dumps(ids)
        envelopes = dict(
            conn.execute(
                "SELECT id, envelope FROM messages WHERE id IN (SELECT value FROM json_each(?))",
                (ids_json,),
            )
        )
        recipients: dict[int, builtins.list[RecipientRecord]] = {}
        for (
            msg,
            address,
            state,
            attempts,
            next_attempt,
            last_reply,
            transport,
            notified,
        ) in conn.execute(
            f"SELECT {_RECIPIENT_COLUMNS} FROM recipients"
            " WHERE msg IN (SELECT value FROM json_each(?)) ORDER BY msg, idx",
            (ids_json,),
        ):
            recipients.setdefault(msg, []).append(
                RecipientRecord(
                    address=address,
                    state=RecipientState(state),
                    attempts=attempts,
                    next_attempt=next_attempt,
                    last_reply=last_reply,
                    transport=transport,
                    notified=notified,
                )
            )
        return [
            QueuedMessage(
                queue_id=format_queue_id(msg_id),
                envelope=envelope_from_json(envelopes[msg_id]),
                recipients=tuple(recipients.get(msg_id, ())),
            )
            for msg_id in ids
            if msg_id in envelopes
        ]

    # -- writer thread

    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        conn = None
        checkpointer = None
        try:
            try:
                conn = self._open_writer()
            except BaseException as exc:
                ready.set_exception(exc)
                return
            checkpointer = threading.Thread(
                target=self._checkpointer_main, name="ferrymail-spool-checkpointer", daemon=True
            )
            checkpointer.start()
            ready.set_result(None)
            stop = False
            while not stop:
                op = self._queue.get()
                if op is _STOP:
                    break
                batch = [op]
                nbytes = op.nbytes
                while len(batch) < BATCH_MAX_ITEMS and nbytes < BATCH_MAX_BYTES:
                    try:
                        op = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if op is _STOP:
                        stop = True
                        break
                    batch.append(op)
                    nbytes += op.nbytes
                self._run_batch(conn, batch)
        finally:
            self._ckpt_stop = True
            self._ckpt_wanted.set()
            if checkpointer is not None:
                checkpointer.join()
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._release_dir()
            self._writer_done.set_result(None)

    def _run_batch(self, conn: sqlite3.Connection, batch: builtins.list[_Op]) -> None:
        try:
            results = self._apply_batch(conn, batch)
        except Exception as exc:  # a bug rather than an I/O error (those are handled inside)
            err = SpoolError(f"spool {self.db_path}: internal error: {exc!r}")
            results = [(op.future, None, err) for op in batch]
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(_resolve, results)

    def _apply_batch(
        self, conn: sqlite3.Connection, batch: builtins.list[_Op]
    ) -> builtins.list[_Result]:
        results: builtins.list[_Result] = []
        stores: builtins.list[_Store] = []
        others: builtins.list[_Op] = []
        for op in batch:
            if not isinstance(op, _Store):
                others.append(op)
            elif not op.future.cancelled():
                # a store whose caller gave up is never acknowledged: skip it (best effort,
                # as the caller may give up at any time until the commit)
                stores.append(op)
        if stores:
            refusal = self._space_refusal(conn, stores)
            if refusal is not None:
                results += [(op.future, None, refusal) for op in stores]
                stores = []
        if not (stores or others):
            return results
        try:
            return results + self._transaction(conn, stores, others)
        except sqlite3.Error as exc:
            err = self._write_error(exc)
            self._after_write_error(conn)
            results += [(op.future, None, err) for op in stores]
            if not others:
                return results
            if not (_is_full(exc) and self._release_reserve()) and not stores:
                return results + [(op.future, None, err) for op in others]
        # Delivery results and deletions in a failed batch get a second chance without the
        # new messages (and, if space ran out, with the reserve given back): they free space,
        # and losing them would mean delivering twice.
        for _ in range(2):
            try:
                return results + self._transaction(conn, [], others)
            except sqlite3.Error as exc:
                err = self._write_error(exc)
                self._after_write_error(conn)
                if not (_is_full(exc) and self._release_reserve()):
                    break
        return results + [(op.future, None, err) for op in others]

    def _release_reserve(self) -> bool:
        """Free the reserve for delivery results; False if it was not held."""
        try:
            freed = self._reserve.release()
        except OSError:
            return False
        if freed:
            self.reserve_releases += 1
            log_event("spool.reserve.released", "warning", spool=str(self.path), bytes=freed,
                      error="file system full: the space reserve is used for delivery results;"
                            " new mail is refused until it can be allocated again")
        return freed > 0

    def _hold_reserve(self) -> bool:
        """Allocate the reserve if it is not held (space came back); whether it is held."""
        if self._reserve.held:
            return True
        if self._reserve_unusable:
            return True
        try:
            held = self._reserve.ensure()
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                # RLIMIT_FSIZE below min_free: no file can hold the reserve, and refusing
                # all mail for it would be worse than running without it
                self._reserve_unusable = True
                log_event("spool.reserve.unusable", "warning", spool=str(self.path),
                          error=f"cannot allocate {self._reserve.path}: {exc.strerror}"
                                " (file size limit below spool.min_free); running without"
                                " a reserve for delivery results")
                return True
            log_event("spool.reserve.error", "error", spool=str(self.path),
                      error=f"cannot allocate {self._reserve.path}: {exc}")
            return False
        if held and self.reserve_releases:
            log_event("spool.reserve.restored", "info", spool=str(self.path),
                      bytes=self._reserve.size)
        return held

    def _transaction(
        self, conn: sqlite3.Connection, stores: builtins.list[_Store], others: builtins.list[_Op]
    ) -> builtins.list[_Result]:
        """Write a batch in one transaction.

        An update's or delete's own error (unknown message or recipient, bad value) undoes that
        operation only; a database error (disk full, I/O) rolls everything back and is raised.
        """
        results: builtins.list[_Result] = []
        if not others and len(stores) <= _ROWS_PER_INSERT:
            # One statement: SQLite makes it a transaction of its own, committed (and the
            # WAL fsynced) before execute() returns, or rolled back entirely on an error.
            try:
                _insert_stores(conn, stores)
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            self._committed(stores, ())
            return [(op.future, format_queue_id(op.msg_id), None) for op in stores]
        conn.execute("BEGIN IMMEDIATE")
        try:
            if stores:
                _insert_stores(conn, stores)
                results += [(op.future, format_queue_id(op.msg_id), None) for op in stores]
            for op in others:
                checked = getattr(op, "apply_checked", None)
                if checked is not None:
                    # raises before any write, or a database error that fails the batch
                    try:
                        value = checked(conn)
                    except Exception as exc:
                        if isinstance(exc, sqlite3.Error):
                            raise
                        results.append((op.future, None, self._op_error(op, exc)))
                        continue
                    if value is not SAVEPOINT_NEEDED:
                        results.append((op.future, value, None))
                        continue
                conn.execute("SAVEPOINT op")
                try:
                    value = op.apply(conn)
                except Exception as exc:
                    if isinstance(exc, sqlite3.Error) and not isinstance(
                        exc, sqlite3.IntegrityError
                    ):
                        raise
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((op.future, None, self._op_error(op, exc)))
                else:
                    conn.execute("RELEASE op")
                    results.append((op.future, value, None))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        self._committed(stores, others)
        return results

    def _committed(self, stores: Sequence[_Store], others: Sequence[_Op]) -> None:
        self.commits += 1
        for op in others:
            if op.body_file_gone:
                # after the commit: a crash before this leaves a file without rows, removed
                # at the next start
                with contextlib.suppress(OSError):
                    os.unlink(self.path / BODIES_DIR / format_queue_id(op.msg_id))
        # a rough count of the WAL frames written: the pages of the data plus a few per row
        pages = sum(op.nbytes for op in stores) // self._page_size + 3 * (len(stores)
                                                                          + len(others)) + 2
        self._ckpt_pages += pages
        if self._ckpt_pages >= self._ckpt_every:
            self._ckpt_pages = 0
            self._ckpt_wanted.set()

    def _checkpointer_main(self) -> None:
        """Copy committed WAL frames into the database file, beside the writer.

        SQLite's own automatic checkpoint runs inside the commit that fills the WAL up to
        `wal_autocheckpoint` pages: every message waiting for that commit also waits for the
        copy and the fsync of the database file, and for 100 KB messages that doubles the
        time a commit takes. This thread, on its own connection, does passive checkpoints
        (they never block the writer, nor wait for it) as the WAL grows, so that the automatic
        checkpoint, kept as it was as the bound on the WAL's size, finds little left to copy.
        Durability does not depend on it: a commit is durable once the WAL is fsynced.
        """
        try:
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return  # the automatic checkpoint still does the work
        try:
            while True:
                self._ckpt_wanted.wait()
                self._ckpt_wanted.clear()
                if self._ckpt_stop:
                    return
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _space_refusal(
        self, conn: sqlite3.Connection, stores: builtins.list[_Store]
    ) -> SpoolError | None:
        if self._reserve.size != self._min_free:
            self._reserve.resize(self._min_free)
        if self._min_free <= 0:
            self._hold_reserve()  # removes the reserve file
            return None
        if not self._hold_reserve():
            self.refused += len(stores)
            return SpoolFull(
                f"spool {self.path}: not enough disk space to accept mail (the"
                f" {self.min_free}-byte reserve for delivery results is in use or cannot be"
                " allocated)"
            )
        # the batch lands in the WAL, then in the database; the WAL may take one checkpoint
        # interval more before it is reused
        need = 2 * sum(op.nbytes for op in stores) + self._wal_bytes
        try:
            st = os.statvfs(self.path)
        except OSError:
            return None  # let the write itself tell
        available = st.f_bavail * st.f_frsize
        if available >= need:
            return None
        # pages freed by delivered messages are reused before the file grows
        available += conn.execute("PRAGMA freelist_count").fetchone()[0] * self._page_size
        if available >= need:
            return None
        self.refused += len(stores)
        return SpoolFull(
            f"spool {self.path}: not enough disk space to accept mail"
            f" ({available} bytes available besides the {self.min_free}-byte reserve,"
            f" {need} needed)"
        )

    def _write_error(self, exc: sqlite3.Error) -> SpoolError:
        return SpoolError(f"spool {self.db_path}: write failed: {_describe(exc)}")

    def _op_error(self, op: _Op, exc: Exception) -> SpoolError:
        if isinstance(exc, SpoolError):
            return exc
        return SpoolError(
            f"spool {self.db_path}: cannot {op.verb} message {format_queue_id(op.msg_id)}: {exc}"
        )

    @staticmethod
    def _after_write_error(conn: sqlite3.Connection) -> None:
        # After "disk full" the WAL may hold frames that cannot be checkpointed into the
        # database yet; try now, so that space given back is used for it first.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _open_writer(self) -> sqlite3.Connection:
        path = self.path
        if path.exists() and not path.is_dir():
            raise SpoolError(f"spool path {path} exists and is not a directory")
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directory {path}: {exc.strerror}") from exc
        if not os.access(path, os.W_OK | os.X_OK):
            raise SpoolError(f"spool directory {path} is not writable")
        self._lock_dir()
        if self.db_path.exists() and not self.db_path.is_file():
            raise SpoolError(f"spool database {self.db_path} exists and is not a file")
        self._restrict_modes()
        try:
            (path / BODIES_DIR).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create {path / BODIES_DIR}: {exc.strerror}") from exc
        try:
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False,
                                   cached_statements=256)  # the multi-row INSERTs, by size
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open spool database {self.db_path}: {exc}") from exc
        try:
            self._prepare(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise SpoolError(
                    f"cannot open spool database {self.db_path}: {_describe(exc)}"
                ) from exc
            raise
        # Without the reserve the spool still opens (delivery frees space); stores wait.
        if self.min_free > 0 and not self._hold_reserve():
            log_event("spool.reserve.missing", "warning", spool=str(self.path),
                      bytes=self.min_free, error="not enough disk space for the reserve;"
                      " new mail is refused until there is")
        elif self.min_free <= 0:
            with contextlib.suppress(OSError):
                self._reserve.ensure()  # removes a reserve left by an earlier setting
        assert self._dir_fd is not None
        with contextlib.suppress(OSError):
            os.fsync(self._dir_fd)  # the directory entries of a new database
        return conn

    def _check_schema(self, conn: sqlite3.Connection, *, new_ok: bool = False) -> None:
        """SpoolError unless the database is a ferrymail spool this code can use (or, with
        `new_ok`, an empty database that is about to become one)."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id != APPLICATION_ID:
            tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
            if not (new_ok and app_id == 0 and tables == 0):
                raise SpoolError(f"{self.db_path} is not a ferrymail spool database")
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"spool {self.db_path} has schema version {version}, newer than this"
                f" ferrymail's ({SCHEMA_VERSION})"
            )

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA busy_timeout = 5000")
        self._check_schema(conn, new_ok=True)
        # Only takes effect while the database is still empty (before WAL mode is set).
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(
                f"spool {self.db_path}: the file system does not support SQLite WAL mode"
            )
        conn.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'OFF'}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        conn.execute("PRAGMA cache_size = -16384")
        # Debian's SQLite is built with SECURE_DELETE: removing a delivered 100 KB body would
        # zero its seven overflow pages, i.e. write them all to the WAL (and then to the
        # database) once more. FAST zeroes deleted content only where no extra page write is
        # needed; freed pages keep their old bytes until reused, as a deleted queue file would.
        conn.execute("PRAGMA secure_delete = FAST")
        self._page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        # Between checkpoints the WAL grows by every page each commit touches. Checkpointing
        # by a quarter of `min_free` keeps a full WAL cycle inside the space kept free, so
        # that deletions and delivery results can still be written when stores are refused.
        wal_pages = 1000  # SQLite's default (4 MiB)
        if self.min_free > 0:
            wal_pages = max(16, min(wal_pages, self.min_free // (4 * self._page_size)))
        conn.execute(f"PRAGMA wal_autocheckpoint = {wal_pages}")
        self._wal_bytes = wal_pages * self._page_size
        # Half the bound: each checkpoint has a fixed cost (two fdatasyncs, a thread wake-up
        # that contends for the GIL with the event loop), and small messages rewrite the
        # same pages, so rarer checkpoints copy less. A quarter cost 2 KB reception about
        # 8 % (bench/RESULTS.md); the whole bound would let the commit's own automatic
        # checkpoint win the race at 100 KB.
        self._ckpt_every = max(8, wal_pages // 2)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        for statement in _INCOMING:
            conn.execute(statement)
        highest = conn.execute("SELECT MAX(id) FROM messages").fetchone()[0]
        if highest is not None:
            self._ids.seed(highest)
        self._sweep_bodies(conn)

    def _sweep_bodies(self, conn: sqlite3.Connection) -> None:
        """Remove body files no message names: parts of bodies still arriving at a crash or
        stop, and files whose rows were never committed (or were deleted before a crash)."""
        folder = self.path / BODIES_DIR
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for name in names:
            msg_id = parse_queue_id(name)
            if msg_id is not None:
                if conn.execute("SELECT 1 FROM messages WHERE id = ?", (msg_id,)).fetchone():
                    self._ids.seed(msg_id)
                    continue
            elif not name.endswith(PART_SUFFIX):
                continue  # not ours
            with contextlib.suppress(OSError):
                os.unlink(folder / name)

    def _restrict_modes(self) -> None:
        """Messages are for the spool's owner only: directory 0700, files 0600.

        The database file is created here, 0600, before SQLite opens it: SQLite gives the WAL
        and shared-memory files it creates the database file's mode (less the umask). Modes
        left wider by an older version are narrowed.
        """
        try:
            fd = os.open(self.db_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
            os.close(fd)
            for file, mode in ((self.path, 0o700), (self.db_path, 0o600),
                               (self.path / (DB_NAME + "-wal"), 0o600),
                               (self.path / (DB_NAME + "-shm"), 0o600),
                               (self.path / RESERVE_NAME, 0o600)):
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(file, follow_symlinks=False).st_mode & 0o777 & ~mode:
                        os.chmod(file, mode, follow_symlinks=False)
        except OSError as exc:
            raise SpoolError(f"cannot restrict the modes of spool {self.path}:"
                             f" {exc.strerror}") from exc

    def _lock_dir(self) -> None:
        """Hold an exclusive lock on the directory while open: one process per spool."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise SpoolError(f"cannot open spool directory {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise SpoolError(
                f"spool directory {self.path} is in use by another process (or spool)"
            ) from exc
        self._dir_fd = fd

    def _release_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # also drops the lock
            self._dir_fd = None


@contextlib.contextmanager
def _read_transaction(conn: sqlite3.Connection) -> Any:
    """One snapshot for several SELECTs."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _is_full(exc: sqlite3.Error) -> bool:
    """SQLITE_FULL: the write failed for lack of disk space."""
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _describe(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc} ({name})" if name else str(exc)
