"""A small HTTP/1.1 server over asyncio streams, for the admin API and the metrics listener.

One request per connection (``Connection: close``), bounded in every dimension: request line
and headers at most MAX_HEAD bytes, body at most MAX_BODY bytes (``Content-Length`` only, no
chunked uploads), the whole request within REQUEST_TIMEOUT seconds. Handlers are looked up in
a `RouteTable` by method and path; ``{name}`` segments of a pattern are passed in
``Request.params``. A handler returns a JSON-able value (200), a `Response`, or raises
`HTTPError`; any other exception is a 500 with its text, logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ferrymail.observe.log import flush_before_reply, log_event

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
REQUEST_TIMEOUT = 10.0

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            413: "Payload Too Large", 422: "Unprocessable Entity",
            500: "Internal Server Error", 503: "Service Unavailable"}


class HTTPError(Exception):
    """Answer with ``status`` and ``{"error": message, **extra}``."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes
    peer: str  # "uid=0 pid=123" (Unix socket) or "127.0.0.1:5555"
    params: dict[str, str] = field(default_factory=dict)

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The last value of query parameter ``name``."""
        values = self.query.get(name)
        return values[-1] if values else default

    def json(self) -> Any:
        """The body as JSON ({} if empty); HTTPError 400 if it is not JSON."""
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise HTTPError(400, f"the request body is not JSON: {exc}") from None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        return cls(status, (json.dumps(value, indent=1, default=str) + "\n").encode())


Handler = Callable[[Request], Awaitable[Any]]


class RouteTable:
    """Method + path pattern -> handler. Adding a route is one call:
    ``routes.add("GET", "/v1/proxies/{id}", handler)``."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """Register ``handler`` for ``method`` on ``pattern``; ValueError if already taken."""
        method = method.upper()
        if any(m == method and p == pattern for m, p, _, _ in self._routes):
            raise ValueError(f"route {method} {pattern} is already registered")
        rx = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(pattern))
                        + "$")
        self._routes.append((method, pattern, rx, handler))

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        """Decorator form of `add`."""
        def deco(handler: Handler) -> Handler:
            self.add(method, pattern, handler)
            return handler
        return deco

    def patterns(self) -> list[str]:
        return [f"{m} {p}" for m, p, _, _ in self._routes]

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters; HTTPError 404 or 405."""
        allowed = []
        for m, _, rx, handler in self._routes:
            match = rx.match(path)
            if match is None:
                continue
            if m == method:
                return handler, {k: unquote(v) for k, v in match.groupdict().items()}
            allowed.append(m)
        if allowed:
            raise HTTPError(405, f"{method} is not allowed on {path} "
                                 f"(allowed: {', '.join(sorted(allowed))})")
        raise HTTPError(404, f"no such resource: {path}")


Authorizer = Callable[[asyncio.StreamWriter, dict[str, str]], str]


class HTTPServer:
    """Serves a `RouteTable` on Unix and/or TCP listeners.

    ``authorize(writer, headers)`` runs for every request before routing; it returns a
    description of the peer or raises HTTPError (401/403). ``name`` is used in logs.
    """

    def __init__(self, routes: RouteTable, *, name: str,
                 authorize: Authorizer | None = None) -> None:
        self.routes = routes
        self.name = name
        self.authorize = authorize
        self.servers: list[asyncio.AbstractServer] = []
        self.requests = 0

    async def start_unix(self, path: str, start_serving: bool = True) -> None:
        self.servers.append(await asyncio.start_unix_server(
            self._serve, path=path, start_serving=start_serving))

    async def start_tcp(self, host: str, port: int, start_serving: bool = True) -> None:
        self.servers.append(await asyncio.start_server(
            self._serve, host, port, start_serving=start_serving))

    async def serve(self) -> None:
        """Start accepting on listeners opened with ``start_serving=False``."""
        for server in self.servers:
            if not server.is_serving():
                await server.start_serving()

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self.servers = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        method = path = "-"
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    req = await _read_request(reader, writer)
                method, path = req.method, req.path
                if self.authorize is not None:
                    req.peer = self.authorize(writer, req.headers)
                handler, req.params = self.routes.resolve(req.method, req.path)
                result = await handler(req)
                resp = result if isinstance(result, Response) else Response.json(result)
            except HTTPError as exc:
                resp = Response.json({"error": exc.message, **exc.extra}, exc.status)
            except TimeoutError:
                resp = Response.json({"error": "request not received in time"}, 400)
            except (ConnectionError, asyncio.IncompleteReadError):
                return
            except Exception as exc:
                log_event(f"{self.name}.error", "error", method=method, path=path,
                          error=f"{type(exc).__name__}: {exc}")
                resp = Response.json({"error": f"{type(exc).__name__}: {exc}"}, 500)
            self.requests += 1
            head = (f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Status')}\r\n"
                    f"Content-Type: {resp.content_type}\r\n"
                    f"Content-Length: {len(resp.body)}\r\nConnection: close\r\n\r\n")
            flush_before_reply()
            writer.write(head.encode("latin-1") + resp.body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            if method != "-" and (resp.status >= 400 or method != "GET"):
                log_event(f"{self.name}.request", "warning" if resp.status >= 400 else "info",
                          method=method, path=path, status=resp.status,
                          duration_ms=int((time.monotonic() - started) * 1000))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HTTPError(413, f"request head longer than {MAX_HEAD} bytes") from None
    if len(head) > MAX_HEAD:
        raise HTTPError(413, f"request head longer than {MAX_HEAD} bytes")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HTTPError(400, f"bad request line {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HTTPError(400, f"bad header line {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    length_text = headers.get("content-length", "0")
    if not length_text.isascii() or not length_text.isdigit():
        raise HTTPError(400, f"bad Content-Length {length_text!r}")
    length = int(length_text)
    if length > MAX_BODY:
        raise HTTPError(413, f"request body longer than {MAX_BODY} bytes")
    body = await reader.readexactly(length) if length else b""
    url = urlsplit(parts[1])
    peer = writer.get_extra_info("peername")
    return Request(parts[0].upper(), unquote(url.path), parse_qs(url.query), headers, body,
                   peer=str(peer))
