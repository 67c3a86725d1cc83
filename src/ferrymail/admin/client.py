"""The admin API's client, for the CLI: JSON over HTTP on the daemon's Unix socket (or on
loopback TCP with a bearer token).

``AdminClient.for_startup(startup)`` finds the socket from the startup config. A call returns
the decoded JSON; `AdminUnavailable` when nothing answers on the socket (no daemon: read-only
commands then read the spool) or no reply comes within the timeout, `AdminError` for an
error reply (its status and JSON body).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any
from urllib.parse import urlencode

from ferrymail.config.models import StartupConfig
from ferrymail.config.operations import admin_socket_path, parse_listen

DEFAULT_TIMEOUT = 30.0


class AdminUnavailable(Exception):
    """No daemon answers on the admin socket (not running, or the API is off)."""


class AdminError(Exception):
    """The daemon answered with an error status; ``body`` is its JSON reply."""

    def __init__(self, status: int, body: Any) -> None:
        message = body.get("error") if isinstance(body, dict) else str(body)
        super().__init__(f"{status}: {message}")
        self.status = status
        self.body = body
        self.message = str(message)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    def __init__(self, *, socket_path: str | None = None, tcp: tuple[str, int] | None = None,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        if (socket_path is None) == (tcp is None):
            raise ValueError("give exactly one of socket_path and tcp")
        self.socket_path = socket_path
        self.tcp = tcp
        self.token = token
        self.timeout = timeout

    @classmethod
    def for_startup(cls, startup: StartupConfig, timeout: float = DEFAULT_TIMEOUT
                    ) -> AdminClient | None:
        """The client for the daemon of ``startup`` (None if its admin API is switched off:
        no socket and no TCP listener)."""
        path = admin_socket_path(startup.admin, startup.environment.pidfile)
        if path is not None:
            return cls(socket_path=path, timeout=timeout)
        if startup.admin.listen is not None:
            return cls(tcp=parse_listen(startup.admin.listen),
                       token=startup.admin.bearer_token(), timeout=timeout)
        return None

    def _connection(self) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixConnection(self.socket_path, self.timeout)
        assert self.tcp is not None
        return http.client.HTTPConnection(self.tcp[0], self.tcp[1], timeout=self.timeout)

    def _where(self) -> str:
        return self.socket_path or f"{self.tcp}"

    def request(self, method: str, path: str, query: list[tuple[str, str]] | None = None,
                body: Any = None) -> Any:
        url = path + (("?" + urlencode(query)) if query else "")
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._connection()
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise AdminUnavailable(f"no ferrymail answers on {self._where()}: "
                                       f"{exc.strerror or exc}") from None
            try:
                conn.request(method, url, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except TimeoutError:  # accepted (the kernel's backlog) but wedged or stopped
                raise AdminUnavailable(f"ferrymail on {self._where()} did not answer within "
                                       f"{self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:  # died mid-request
                raise AdminUnavailable(f"ferrymail on {self._where()} did not answer: "
                                       f"{exc or type(exc).__name__}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = {"error": raw.decode("utf-8", "replace")}
        if resp.status >= 400:
            raise AdminError(resp.status, doc)
        return doc

    def get(self, path: str, query: list[tuple[str, str]] | None = None) -> Any:
        return self.request("GET", path, query)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body=body if body is not None else {})


def other_workers(startup: StartupConfig, timeout: float = DEFAULT_TIMEOUT) -> list[AdminClient]:
    """Clients for workers 1.. of a ``ferrymail run --workers N``: each serves its own admin
    socket, ``NAME.wK.sock`` beside the configured one (``supervisor.per_worker``); [] for a
    single process. Worker 0 is ``AdminClient.for_startup``."""
    from ferrymail.config.operations import worker_socket_path

    path = admin_socket_path(startup.admin, startup.environment.pidfile)
    out: list[AdminClient] = []
    k = 1
    while path is not None and os.path.exists(str(worker_socket_path(path, k))):
        out.append(AdminClient(socket_path=worker_socket_path(path, k), timeout=timeout))
        k += 1
    return out
