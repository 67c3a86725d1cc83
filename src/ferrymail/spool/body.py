"""Message bodies kept as files of the spool, written and read in chunks.

Small messages travel as one ``bytes`` and are stored as a BLOB in the database (the fast
path). A message that outgrows ``SPILL_AT`` while it arrives is written, chunk by chunk, to
``bodies/<queue id>.part`` (a `BodyWriter`); at end of data the spool fsyncs it, renames it
to ``bodies/<queue id>``, fsyncs the directory, and only then commits the message's rows:
so a committed message always has its body on disk, and a crash leaves at most a file
without rows, which the next start removes. Delivery reads such a body through a
`SpooledBody`, in chunks, never whole.

Writes are plain ``os.write`` calls from the event loop (they go to the page cache; the
fsync happens at end of data, in a thread). A write error (disk full, file size limit) is
kept, the file removed, and further chunks dropped: the transaction is answered with a
temporary error at end of data, and nothing is lost that was acknowledged.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

BODIES_DIR = "bodies"
PART_SUFFIX = ".part"
SPILL_AT = 256 * 1024  # a body larger than this goes to a file as it arrives
CHUNK = 256 * 1024  # bytes per read when a spooled body is sent


class BodyWriter:
    """An incoming message body, appended to ``bodies/<queue id>.part`` (mode 0600).

    ``write()`` never raises: the first error is kept in ``error`` (``errno`` in
    ``error_errno``) and the file removed. ``size`` counts the bytes written.
    """

    __slots__ = ("_fd", "dir", "error", "error_errno", "path", "queue_id", "size")

    def __init__(self, directory: Path, queue_id: str) -> None:
        self.dir = directory
        self.queue_id = queue_id
        self.path = directory / (queue_id + PART_SUFFIX)
        self.size = 0
        self.error: str | None = None
        self.error_errno = 0
        self._fd: int | None = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o600)
        except OSError as exc:
            self._fail(exc)

    @property
    def final_path(self) -> Path:
        return self.dir / self.queue_id

    def write(self, data: bytes | bytearray | memoryview) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            with memoryview(data) as view:
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
        except OSError as exc:
            self._fail(exc)
            return
        self.size += done

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = f"cannot write {self.path}: {exc.strerror or exc}"
            self.error_errno = exc.errno or 0
        self.abort()

    @property
    def disk_full(self) -> bool:
        return self.error_errno in (errno.ENOSPC, errno.EDQUOT)

    def commit(self, fsync: bool = True) -> None:
        """Make the body durable under its final name (blocking: call it in a thread).
        `fsync=False` (the spool's benchmark mode) only renames it.

        OSError if the data cannot be made durable; the file is removed then.
        """
        fd = self._fd
        if fd is None:
            raise OSError(self.error_errno or errno.EIO, self.error or "body file is closed")
        try:
            if fsync:
                os.fsync(fd)
            os.close(fd)
            self._fd = None
            os.rename(self.path, self.final_path)
            if fsync:
                dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError:
            self.abort()
            with contextlib.suppress(OSError):
                os.unlink(self.final_path)
            raise

    def abort(self) -> None:
        """Drop the body (close and remove the part file); safe to call more than once."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    @property
    def closed(self) -> bool:
        return self._fd is None


class SpooledBody:
    """A stored message body kept in a file: its ``size`` and its bytes in chunks.

    What the delivery side needs of a body without holding it: ``len()``, ``chunks()``,
    ``head()`` (the start, e.g. for a DSN's copy of the header section) and ``isascii()``.
    ``OSError`` if the file cannot be read.
    """

    __slots__ = ("_ascii", "path", "size")

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._ascii: bool | None = None

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"<SpooledBody {self.path} {self.size} bytes>"

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        with open(self.path, "rb", buffering=0) as f:
            while chunk := f.read(size):
                yield chunk

    def head(self, limit: int) -> bytes:
        with open(self.path, "rb") as f:
            return f.read(limit)

    def isascii(self) -> bool:
        if self._ascii is None:
            self._ascii = all(chunk.isascii() for chunk in self.chunks())
        return self._ascii

    def read_all(self) -> bytes:
        """The whole body in memory (for tests and small tools, not for delivery)."""
        return self.path.read_bytes()


def body_bytes(data: bytes | SpooledBody) -> bytes:
    """``data`` as bytes, reading a spooled body whole (for the few places that need it)."""
    return data.read_all() if isinstance(data, SpooledBody) else data
