"""Suspensions: "deliver nothing on this key until T", by hand or from a reply.

A `Suspension` names field values (``localip=192.0.2.1``, ``grouping=&gmail``; the same
patterns as policy conditions: lists are not needed, one pattern per field) and an expiry in
Unix seconds. A delivery path whose `Attempt` matches every field waits; nothing bounces.

Without a cluster they live in ``suspensions.json`` in the spool directory (written
atomically; the running instance re-reads it when its modification time changes, so
``ferrymail suspend add`` acts within a second). With a cluster they live in Redis
(`ferrymail.orchestrator.redis`) and every instance obeys them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ferrymail.config.policies import FIELDS, pattern_problem
from ferrymail.orchestrator.limiter import iso
from ferrymail.orchestrator.policy import Attempt, value_matches

FILE_NAME = "suspensions.json"
MAX_SUSPENSIONS = 10000  # a bound on the store: adding beyond it is refused
RECHECK = 0.25  # seconds between looks at the file's mtime (`current` runs per message)


@dataclass(frozen=True)
class Suspension:
    id: str
    fields: dict[str, str]
    until: float  # Unix seconds
    reason: str = ""
    created: float = 0.0
    origin: str = "manual"  # or "reply" (dynamic, from a policy's suspend_on)

    def matches(self, attempt: Attempt) -> bool:
        return all(value_matches(f, p, attempt.value(f)) for f, p in self.fields.items())

    def describe(self) -> str:
        what = ", ".join(f"{k}={v}" for k, v in self.fields.items()) or "everything"
        return f"suspended until {iso(self.until)} ({self.reason or 'no reason given'}; {what})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Suspension:
        d = json.loads(text)
        return cls(str(d["id"]), {str(k): str(v) for k, v in d["fields"].items()},
                   float(d["until"]), str(d.get("reason", "")), float(d.get("created", 0.0)),
                   str(d.get("origin", "manual")))


def new_suspension(fields: dict[str, str], duration: float, reason: str, *,
                   origin: str = "manual", now: float | None = None) -> Suspension:
    """A suspension from ``field=value`` pairs; ValueError naming a bad field or value."""
    for f, v in fields.items():
        if f not in FIELDS:
            raise ValueError(f"unknown field {f!r} (expected one of: {', '.join(FIELDS)})")
        problem = pattern_problem(f, v)
        if problem:
            raise ValueError(f"{f}: {problem}")
    if not duration > 0:
        raise ValueError(f"duration must be more than 0 seconds, got {duration!r}")
    now = time.time() if now is None else now
    return Suspension(secrets.token_hex(4), dict(fields), now + duration, reason, now, origin)


def first_match(suspensions: list[Suspension], attempt: Attempt, now: float
                ) -> Suspension | None:
    for s in suspensions:
        if s.until > now and s.matches(attempt):
            return s
    return None


class SuspensionFile:
    """Suspensions in one JSON file (the spool directory's), for an instance without Redis."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._items: list[Suspension] = []
        self._checked = -RECHECK  # time.monotonic() of the last stat

    def load(self) -> list[Suspension]:
        """The stored suspensions (expired ones included); [] when there is no file."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: cannot read suspensions: {e}") from e
        return [Suspension.from_json(json.dumps(d)) for d in data]

    def save(self, items: list[Suspension]) -> None:
        self._checked = -RECHECK  # our own change: the next `current` reads it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps([json.loads(s.to_json()) for s in items], indent=1))
        os.replace(tmp, self.path)

    def add(self, s: Suspension, now: float | None = None) -> None:
        now = time.time() if now is None else now
        items = [x for x in self.load() if x.until > now]
        if len(items) >= MAX_SUSPENSIONS:
            raise ValueError(f"{MAX_SUSPENSIONS} suspensions are active; remove some first")
        items.append(s)
        self.save(items)

    def remove(self, ident: str) -> bool:
        items = self.load()
        kept = [x for x in items if x.id != ident]
        if len(kept) == len(items):
            return False
        self.save(kept)
        return True

    def current(self) -> list[Suspension]:
        """The cached list, re-read when the file changed: one stat, at most every
        `RECHECK` seconds (a change by another process counts within that; by this one at
        once)."""
        now = time.monotonic()
        if now - self._checked < RECHECK:
            return self._items
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._items, self._mtime = [], None
            return self._items
        if mtime != self._mtime:
            with contextlib.suppress(ValueError):
                self._items = self.load()
                self._mtime = mtime
        return self._items
