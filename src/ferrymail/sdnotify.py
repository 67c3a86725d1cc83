"""systemd's readiness protocol (``sd_notify``), without libsystemd.

With ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
socket) and waits for ``READY=1`` on that datagram socket before it considers the service
started; ``RELOADING=1`` (with ``MONOTONIC_USEC``, systemd >= 253) then ``READY=1`` brackets a
reload, and ``STOPPING=1`` announces the shutdown. ``STATUS=`` is free text shown by
``systemctl status``. See sd_notify(3). Without ``NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time

from ferrymail.observe.log import log_event


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]  # abstract namespace
    return addr


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` lines in one datagram; False if there is no socket or it failed
    (logged once per failure, never raised: a service manager going away must not stop us)."""
    addr = _address()
    if addr is None:
        return False
    payload = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(payload)
    except OSError as exc:
        log_event("sdnotify.failed", "warning", socket=os.environ.get("NOTIFY_SOCKET"),
                  error=str(exc), message=fields[0] if fields else None)
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")
