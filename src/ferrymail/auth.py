"""SMTP AUTH on the server side: password checks and the per-address failure limit.

The exchange itself (PLAIN, LOGIN) is sans-IO in ``smtp/auth.py``; this module decides:

* ``verify(credentials_file, user, password)`` checks an argon2 (argon2-cffi) or bcrypt
  hash in a worker thread (they cost ~0.1-0.2 s of CPU each, by design), at most
  ``MAX_CONCURRENT_VERIFY`` at once per process; an unknown user costs the same as a wrong
  password, so the reply time does not tell which users exist;
* ``FailureLimiter`` counts failed attempts per client address in a sliding window
  (``servers[].auth.failures`` within ``window``); while over the limit, AUTH is answered
  454 without checking anything (a success does not clear the count: one known password
  must not reset the guessing of another). It keeps at most ``MAX_TRACKED`` addresses (the oldest
  are forgotten first) so that a flood of addresses cannot grow it without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from ferrymail.config.auth import CredentialsFile, hash_scheme

MAX_CONCURRENT_VERIFY = 4
MAX_TRACKED = 100_000

_hasher = PasswordHasher()
# Checked for unknown users so that they take as long as known ones.
_DUMMY = _hasher.hash("ferrymail: no such user")
_semaphore: asyncio.Semaphore | None = None


def hash_password(password: str) -> str:
    """An argon2id hash with argon2-cffi's defaults (for credentials files)."""
    return _hasher.hash(password)


def check_password(hashed: str, password: str) -> bool:
    """Whether ``password`` matches ``hashed`` (argon2 or bcrypt); False on a bad hash."""
    scheme = hash_scheme(hashed)
    if scheme == "argon2":
        try:
            return _hasher.verify(hashed, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
    if scheme == "bcrypt":
        try:
            return bcrypt.checkpw(password.encode("utf-8"), hashed.encode("ascii"))
        except ValueError:
            return False
    return False


async def verify(users: CredentialsFile, user: str, password: str) -> bool:
    """Check ``user``'s password off the event loop (bounded concurrency)."""
    global _semaphore
    if _semaphore is None:
        _semaphore = asyncio.Semaphore(MAX_CONCURRENT_VERIFY)
    hashed = users.users.get(user)
    async with _semaphore:
        ok = await asyncio.to_thread(check_password, hashed or _DUMMY, password)
    return ok and hashed is not None


class FailureLimiter:
    """Failed AUTH attempts per client address within a sliding window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def limited(self, ip: str, limit: int, window: float) -> bool:
        """Whether ``ip`` already failed ``limit`` times within the last ``window`` s."""
        times = self._failures.get(ip)
        if times is None:
            return False
        self._expire(times, window)
        if not times:
            del self._failures[ip]
            return False
        return len(times) >= limit

    def failed(self, ip: str, window: float) -> int:
        """Record a failure; returns the failures of ``ip`` within the window."""
        times = self._failures.get(ip)
        if times is None:
            if len(self._failures) >= MAX_TRACKED:
                self._failures.popitem(last=False)
            times = self._failures[ip] = deque(maxlen=1000)
        else:
            self._failures.move_to_end(ip)
        self._expire(times, window)
        times.append(self._clock())
        return len(times)

    def _expire(self, times: deque[float], window: float) -> None:
        edge = self._clock() - window
        while times and times[0] <= edge:
            times.popleft()
