"""The admin API in the daemon: HTTP/JSON on a Unix socket, optionally on loopback TCP.

The Unix socket (``admin.socket``, default ``ferrymail.sock`` beside the pidfile) is created
mode 0600, and each request's peer credentials (``SO_PEERCRED``) must be root or the daemon's
own user: a second check that holds even if the socket's mode is widened. The TCP listener
(``admin.listen``, loopback only) requires ``Authorization: Bearer TOKEN``.

Paths are versioned (``/v1/...``). Components add their own routes with one call, before or
after start: ``app.admin.routes.add("GET", "/v1/proxies", handler)``.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferrymail import __version__
from ferrymail.admin.http import HTTPError, HTTPServer, Request, RouteTable
from ferrymail.config.operations import admin_socket_path, parse_listen
from ferrymail.observe.log import log_event

if TYPE_CHECKING:
    import asyncio

    from ferrymail.app import App

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
SUN_PATH_MAX = 108  # Linux sockaddr_un.sun_path, including the terminating NUL


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a Unix socket's peer (Linux ``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


class AdminServer:
    """An App component serving the admin API; ``routes`` is the table to extend."""

    name = "admin"

    def __init__(self, app: App) -> None:
        self.app = app
        cfg = app.startup.admin
        self.socket_path = admin_socket_path(cfg, app.startup.environment.pidfile)
        self.listen = parse_listen(cfg.listen) if cfg.listen else None
        self._token: str | None = None
        self._bound = False
        self._created = False
        self.routes = RouteTable()
        self.started_at = time.time()
        self._http = HTTPServer(self.routes, name="admin", authorize=self._authorize)
        self.routes.add("GET", "/v1/status", self._status)
        self.routes.add("GET", "/v1/routes", self._list_routes)
        self.routes.add("POST", "/v1/reload", self._reload)

    async def bind(self, owner: tuple[int, int] | None = None) -> None:
        """Create the socket (and TCP listener) without serving yet: the App calls this
        before dropping privileges, so the socket's folder may be root's; ``owner`` (uid,
        gid) then gets the socket, so that the daemon's user can use it too."""
        if self._bound:
            return
        self._bound = True
        if self.socket_path is not None and len(os.fsencode(
                os.path.abspath(self.socket_path))) >= SUN_PATH_MAX:
            log_event("admin.socket_unusable", "warning", socket=self.socket_path,
                      reason=f"a Unix socket path must be shorter than {SUN_PATH_MAX} bytes; "
                      "set admin.socket to a shorter path", effect="no admin socket")
            self.socket_path = None
        if self.socket_path is not None:
            path = Path(self.socket_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_socket(path)
            old = os.umask(0o177)  # the socket is born 0600: no window where others connect
            try:
                await self._http.start_unix(str(path), start_serving=False)
                self._created = True
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            if owner is not None:
                os.chown(path, *owner)
        if self.listen is not None:
            self._token = self.app.startup.admin.bearer_token()
            if not self._token:
                raise ValueError("admin.listen: the bearer token is empty")
            try:
                await self._http.start_tcp(*self.listen, start_serving=False)
            except OSError as exc:
                host, port = self.listen
                raise OSError(exc.errno, f"admin.listen: cannot listen on {host}:{port}: "
                              f"{exc.strerror or exc}") from exc

    async def start(self) -> None:
        await self.bind()
        await self._http.serve()
        self.started_at = time.time()
        log_event("admin.started", socket=self.socket_path,
                  listen=self.app.startup.admin.listen)

    async def stop(self) -> None:
        await self._http.stop()
        if self.socket_path is not None and self._created:  # never another daemon's socket
            self._created = False
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)

    # -- access

    def _authorize(self, writer: asyncio.StreamWriter, headers: dict[str, str]) -> str:
        sock: socket.socket = writer.get_extra_info("socket")
        if sock.family == socket.AF_UNIX:
            pid, uid, _ = peer_credentials(sock)
            if uid not in (0, os.geteuid()):
                log_event("admin.refused", "warning", peer_pid=pid, peer_uid=uid,
                          reason="peer user is neither root nor the daemon's user")
                raise HTTPError(403, f"uid {uid} may not use the admin API")
            return f"uid={uid} pid={pid}"
        peer = writer.get_extra_info("peername")
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if (scheme.lower() != "bearer" or self._token is None
                or not hmac.compare_digest(token.strip().encode(), self._token.encode())):
            log_event("admin.refused", "warning", peer=f"{peer[0]}:{peer[1]}",
                      reason="missing or wrong bearer token")
            raise HTTPError(401, "missing or wrong bearer token")
        return f"{peer[0]}:{peer[1]}"

    # -- core routes

    async def _status(self, req: Request) -> dict[str, Any]:
        app = self.app
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "startup_file": app.startup_file,
            "running_file": app.running_file,
            "servers": [s.id for s in app.servers],
            "in_flight": len(app.delivery.scheduler.in_flight()),
            "hold": app.running.queues.hold,
            "last_reload": app.last_reload,
        }

    async def _list_routes(self, req: Request) -> list[str]:
        return self.routes.patterns()

    async def _reload(self, req: Request) -> Any:
        errors = self.app.reload_verdict()
        if errors:
            raise HTTPError(422, "the running configuration was refused; the previous one "
                                 "stays in force", errors=errors)
        return {"reloaded": True, "pid": os.getpid(),
                "file": self.app.running_file or "<embedded running.yaml>"}


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a crashed daemon; refuse to replace anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"admin socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(f"admin socket {path} is in use by another process")
