"""Structured logging: one logfmt line per event on stderr.

``log_event("smtp.transaction", client="1.2.3.4:5", qid="…")`` writes
``ts=2024-05-01T12:00:00.123Z level=info event=smtp.transaction client=1.2.3.4:5 qid=…``.
No ``logging`` module on the hot path: formatting is a few string operations and one write.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_ALIASES = {"warn": "warning", "fatal": "critical", "err": "error"}

_threshold = LEVELS["info"]
_stream: TextIO | None = None  # None: whatever sys.stderr is at write time (pytest swaps it)
_ts_cache: tuple[int, str] = (-1, "")
_end = "\n"  # what ends every line: set_context() puts its fields before the newline


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Set the minimum level (``debug``/``info``/``warning``/``error``) and the output stream."""
    global _threshold, _stream
    _threshold = LEVELS[normalise_level(level)]
    _stream = stream


def set_context(**fields: object) -> None:
    """Fields added to every line from now on (e.g. ``worker=1`` in a worker process, so
    the lines of N workers sharing one log can be told apart); none: clear them."""
    global _end
    extra = "".join(f" {key}={quote(value)}" for key, value in fields.items()
                    if value is not None)
    _end = extra + "\n"


def normalise_level(level: str) -> str:
    name = level.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
    return name


def enabled(level: str) -> bool:
    """Whether a line at ``level`` would be written (to skip building costly fields)."""
    return LEVELS.get(level, 20) >= _threshold


def quote(value: object) -> str:
    """A logfmt value: bare when safe, else double-quoted with ``\\`` escapes."""
    if value is None:
        return '""'
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return str(value)
    text = value if isinstance(value, str) else str(value)
    # isprintable() is False for \n, \r, \t and every other control character
    if text.isprintable():
        if '"' not in text and "\\" not in text:
            if text and " " not in text and "=" not in text:
                return text
            return f'"{text}"'
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    out = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
           .replace("\r", "\\r").replace("\t", "\\t"))
    if not out.isprintable():
        out = "".join(c if c.isprintable() else _escape(c) for c in out)
    return f'"{out}"'


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _timestamp() -> str:
    global _ts_cache
    now = time.time()
    sec = int(now)
    if _ts_cache[0] != sec:
        _ts_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_ts_cache[1]}.{int((now - sec) * 1000):03d}Z"


def format_event(event: str, level: str = "info", **fields: object) -> str:
    """The logfmt line (without newline); fields whose value is ``None`` are left out."""
    parts = [f"ts={_timestamp()} level={level} event={quote(event)}"]
    parts += [f"{key}={quote(value)}" for key, value in fields.items() if value is not None]
    return " ".join(parts)


def log_event(event: str, level: str = "info", **fields: object) -> None:
    """Write one event line to stderr if ``level`` passes the configured threshold."""
    if LEVELS.get(level, 20) < _threshold:
        return
    _write(format_event(event, level, **fields) + _end)


def log_formatted(event: str, level: str, fields: str) -> None:
    """``log_event`` for a hot path that formats its fields itself: ``fields`` is the
    ``key=value`` pairs, space-separated, each value already passed through ``quote``."""
    if LEVELS.get(level, 20) < _threshold:
        return
    _write(f"ts={_timestamp()} level={level} event={quote(event)} {fields}{_end}")


def _write(line: str) -> None:
    stream = _stream or sys.stderr
    try:
        stream.write(line)
        stream.flush()
    except (OSError, ValueError):
        pass  # a closed stderr must not take the server down
