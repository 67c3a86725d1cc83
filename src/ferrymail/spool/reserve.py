"""The spool's disk-space reserve: a file holding ``spool.min_free`` bytes allocated.

A free-space check before each store cannot by itself promise that delivery results will
still fit later: other programs fill the same file system, the WAL and the database file
grow after the check (checkpoints copy WAL frames into the database), and pages freed by
delivered messages are only reusable through the WAL, which must grow first. So the space
that delivery results and deletions need is taken from the file system up front, as a file
of allocated blocks (``posix_fallocate``; written with zeros where the file system cannot
allocate). When a write of delivery results fails for lack of space, the reserve is given
back to the file system and the write retried; until the reserve can be allocated again
(space came back), stores are refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

RESERVE_NAME = "reserve"
_ZEROS = bytes(1 << 20)


class SpaceReserve:
    """``size`` bytes held in the file ``path`` (mode 0600) until `release()`.

    `ensure()` (re)allocates the whole size and says whether it is held; `release()` frees
    it. Both raise only for errors other than "no space" (``OSError``).
    """

    def __init__(self, path: str | Path, size: int) -> None:
        self.path = Path(path)
        self.size = max(0, int(size))
        self.held = False

    def resize(self, size: int) -> None:
        """Hold `size` bytes from the next `ensure()` on."""
        size = max(0, int(size))
        if size != self.size:
            self.size = size
            self.held = False

    def ensure(self) -> bool:
        """Allocate the reserve if it is not held; True once all of it is allocated."""
        if self.held:
            return True
        if self.size == 0:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a reserve left by an earlier run with another setting
            self.held = True
            return True
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstatvfs(fd)
            if st.f_bavail * st.f_frsize + os.fstat(fd).st_blocks * 512 < self.size:
                os.ftruncate(fd, 0)
                return False  # known to fail: no need to allocate (or write) what fits
            try:
                os.posix_fallocate(fd, 0, self.size)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    os.ftruncate(fd, 0)  # a part of it would only take space from results
                    return False
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                if not self._write_zeros(fd):
                    return False
            if os.fstat(fd).st_size > self.size:
                os.ftruncate(fd, self.size)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.held = True
        return True

    def _write_zeros(self, fd: int) -> bool:
        left = self.size
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            while left > 0:
                left -= os.write(fd, _ZEROS[:min(left, len(_ZEROS))])
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            os.ftruncate(fd, 0)
            return False
        return True

    def release(self) -> int:
        """Give the reserve back to the file system; the bytes freed (0 if none was held)."""
        if not self.held or self.size == 0:
            return 0
        self.held = False
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.path, 0)
        return self.size
