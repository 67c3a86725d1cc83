"""Structured logging: one logfmt (or JSON) line per event, on stderr, a file or syslog.

``log_event("smtp.transaction", client="1.2.3.4:5", qid="…")`` writes
``ts=2024-05-01T12:00:00.123Z level=info event=smtp.transaction client=1.2.3.4:5 qid=…``,
or with ``environment.logging.format: json`` the same as one JSON object per line.
No ``logging`` module on the hot path: formatting is a few string operations and one write.

Destinations (``environment.logging.destination``): ``stderr``; ``file`` (appended to,
reopened by `reopen`, which the daemon calls on SIGUSR1 after logrotate moved it); ``syslog``
(one datagram per line to ``/dev/log`` or the configured socket, RFC 3164 framing
``<PRI>ferrymail[PID]: LINE``, severity from the level).

Batching (`batch_per_iteration`, which ``ferrymail run`` turns on): a line logged on a thread
running an event loop is appended to a buffer, and the buffer is written in one ``write``
(and flushed) when the loop next gets to its ready callbacks, i.e. once per loop iteration
instead of once per line; lines of other threads, of no loop, and to syslog are written at
once. The SMTP and admin servers write the buffer before each reply they send
(`flush_before_reply`), so a line logged before a reply is never behind it; in a relay that is
about one write per message instead of one per line (the inbound server yields once
after a transaction's line, `lines_pending`, so that the stores of one group commit share
one write before their replies). A crash loses at most the buffer of that
moment (at most `BATCH_MAX_LINES`); `flush` runs at exit, before a reconfiguration and on a
reopen.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import socket
import sys
import threading
import time
from typing import TextIO

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_ALIASES = {"warn": "warning", "fatal": "critical", "err": "error"}

_threshold = LEVELS["info"]
_stream: TextIO | None = None  # None: whatever sys.stderr is at write time (pytest swaps it)
_ts_cache: tuple[int, str] = (-1, "")
_end = "\n"  # what ends every line: set_context() puts its fields before the newline
_context: dict[str, object] = {}  # the same fields, for JSON lines
_json = False
_file_path: str | None = None
_syslog: tuple[socket.socket, str, int] | None = None  # socket, address, facility code

BATCH_MAX_LINES = 256  # a fuller buffer is written at once, before the iteration ends
_batching = False
_pending: list[str] = []  # lines waiting for the end of the loop iteration
_flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on
_pending_thread = 0  # the thread whose loop batches (only it touches `_pending`)
_get_running_loop = asyncio._get_running_loop

SYSLOG_FACILITIES = {"daemon": 3, "mail": 2, **{f"local{i}": 16 + i for i in range(8)}}
_SEVERITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def configure(level: str = "info", stream: TextIO | None = None, *, format: str = "logfmt",
              destination: str = "stderr", file: str | None = None,
              syslog_socket: str = "/dev/log", syslog_facility: str = "mail") -> None:
    """Set the minimum level (``debug``/``info``/``warning``/``error``), the line format
    (``logfmt``/``json``) and where lines go: ``stream`` (None: stderr), a ``file`` (OSError
    if it cannot be opened) or ``syslog``."""
    global _threshold, _stream, _json, _file_path, _syslog
    flush()
    _threshold = LEVELS[normalise_level(level)]
    if format not in ("logfmt", "json"):
        raise ValueError(f"unknown log format {format!r} (logfmt or json)")
    _json = format == "json"
    _close_destination()
    _stream, _file_path, _syslog = stream, None, None
    if destination == "file":
        if file is None:
            raise ValueError("the file destination needs a file name")
        _file_path = file
        _stream = open(file, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    elif destination == "syslog":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        _syslog = (sock, syslog_socket, SYSLOG_FACILITIES[syslog_facility])
    elif destination != "stderr":
        raise ValueError(f"unknown log destination {destination!r}")


def reopen() -> None:
    """Reopen the log file (a no-op for other destinations): logrotate's ``postrotate``."""
    global _stream
    if _file_path is None:
        return
    flush()  # what was logged before the rotation goes to the rotated file
    new = open(_file_path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    old, _stream = _stream, new
    if old is not None:
        old.close()


def _close_destination() -> None:
    if _file_path is not None and _stream is not None:
        _stream.close()
    if _syslog is not None:
        _syslog[0].close()


def batch_per_iteration(on: bool = True) -> None:
    """Write the lines an event loop's thread logs once per loop iteration (see the module
    docstring); ``on=False`` writes every line at once again (after a `flush`)."""
    global _batching
    if on and not _batching:
        atexit.register(flush)
    if not on:
        flush()
    _batching = on


def flush() -> None:
    """Write the lines batched so far (a no-op when there are none)."""
    global _pending, _flush_on
    _flush_on = None
    if not _pending:
        return
    lines, _pending = _pending, []
    _write_now("".join(lines))


def lines_pending() -> bool:
    """Whether batched lines wait for this loop iteration's `flush` (then a coroutine that
    yields once lets that one write carry the lines of every task logging meanwhile)."""
    return bool(_pending)


def flush_before_reply() -> None:
    """Write the batched lines now, if there are any: the servers call it before a reply
    leaves, so that whoever sees a reply (an SMTP client, a test, an operator's CLI) finds
    every line logged before it, as without batching. Only on the event loop's thread."""
    if _pending:
        flush()


def set_context(**fields: object) -> None:
    """Fields added to every line from now on (e.g. ``worker=1`` in a worker process, so
    the lines of N workers sharing one log can be told apart); none: clear them."""
    global _end, _context
    _context = {key: value for key, value in fields.items() if value is not None}
    extra = "".join(f" {key}={quote(value)}" for key, value in _context.items())
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


def format_json(event: str, level: str, fields: dict[str, object]) -> str:
    """The event as one JSON object (without newline); ``None`` values left out."""
    doc: dict[str, object] = {"ts": _timestamp(), "level": level, "event": event}
    for key, value in fields.items():
        if value is not None:
            doc[key] = value if isinstance(value, (int, float, bool, str)) else str(value)
    return json.dumps(doc, ensure_ascii=False, default=str)


def parse_logfmt(text: str) -> dict[str, str]:
    """``key=value`` pairs as `quote` writes them (bare or double-quoted with escapes)."""
    out: dict[str, str] = {}
    i, n = 0, len(text)
    escapes = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
    while i < n:
        while i < n and text[i] == " ":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq]
        i = eq + 1
        if i < n and text[i] == '"':
            i += 1
            buf = []
            while i < n and text[i] != '"':
                c = text[i]
                if c == "\\" and i + 1 < n:
                    nxt = text[i + 1]
                    if nxt in "xuU":
                        width = {"x": 2, "u": 4, "U": 8}[nxt]
                        buf.append(chr(int(text[i + 2:i + 2 + width], 16)))
                        i += 2 + width
                        continue
                    buf.append(escapes.get(nxt, nxt))
                    i += 2
                    continue
                buf.append(c)
                i += 1
            i += 1
            out[key] = "".join(buf)
        else:
            end = text.find(" ", i)
            end = n if end < 0 else end
            out[key] = text[i:end]
            i = end
    return out


def log_event(event: str, level: str = "info", **fields: object) -> None:
    """Write one event line if ``level`` passes the configured threshold."""
    if LEVELS.get(level, 20) < _threshold:
        return
    if _json:
        _write(format_json(event, level, {**fields, **_context}) + "\n", level)
    else:
        _write(format_event(event, level, **fields) + _end, level)


def log_formatted(event: str, level: str, fields: str) -> None:
    """``log_event`` for a hot path that formats its fields itself: ``fields`` is the
    ``key=value`` pairs, space-separated, each value already passed through ``quote``."""
    if LEVELS.get(level, 20) < _threshold:
        return
    if _json:
        _write(format_json(event, level, {**parse_logfmt(fields), **_context}) + "\n", level)
    else:
        _write(f"ts={_timestamp()} level={level} event={quote(event)} {fields}{_end}", level)


def _write(line: str, level: str = "info") -> None:
    if _syslog is not None:
        sock, address, facility = _syslog
        pri = facility * 8 + _SEVERITY.get(level, 6)
        try:
            sock.sendto(f"<{pri}>ferrymail[{os.getpid()}]: {line.rstrip()}".encode(
                "utf-8", "backslashreplace"), address)
        except OSError:
            pass  # syslog away: nothing to write to (a full buffer drops the line)
        return
    global _flush_on, _pending_thread
    if _batching and (loop := _get_running_loop()) is not None:
        if not _pending:
            _pending_thread = threading.get_ident()
        _pending.append(line)
        if len(_pending) >= BATCH_MAX_LINES:
            flush()
        elif _flush_on is not loop:  # none scheduled yet (or on a loop that has gone)
            loop.call_soon(flush)
            _flush_on = loop
        return
    if _pending and _pending_thread == threading.get_ident():
        flush()  # keep the order of this thread's lines
    _write_now(line)


def _write_now(text: str) -> None:
    stream = _stream or sys.stderr
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        pass  # a closed stderr must not take the server down
