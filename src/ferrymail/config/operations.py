"""Startup models for operations: the admin API (`admin`) and Prometheus metrics (`metrics`).

Kept apart from `models.py`; the root `StartupConfig` only gains the two fields.
"""

from __future__ import annotations

import ipaddress
import os.path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator

from .types import describe, parse_duration

DEFAULT_METRICS_LISTEN = "127.0.0.1:9725"
MAX_WORKER_TIMEOUT = 30.0


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def parse_listen(value: object) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) -> (host, port); ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"expected \"ADDRESS:PORT\" or false, got {describe(value)}")
    host, sep, port_text = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected \"ADDRESS:PORT\" with an IP address, got {value!r}") from None
    if not sep or not port_text.isascii() or not port_text.isdigit() \
            or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"expected a port 1-65535 after the last ':', got {value!r}")
    return host, int(port_text)


def _listen(value: object) -> str | None:
    if value is False or value is None:
        return None
    parse_listen(value)
    return str(value).strip()


def _loopback_listen(value: object) -> str | None:
    text = _listen(value)
    if text is not None and not ipaddress.ip_address(parse_listen(text)[0]).is_loopback:
        raise ValueError(f"the admin API listens on loopback only (127.0.0.0/8, ::1), "
                         f"got {text!r}")
    return text


def _socket(value: object) -> str | bool:
    if value is False:
        return False
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a socket path or false, got {describe(value)}")
    return value


class Admin(_Model):
    """``admin``: HTTP/JSON on a Unix socket (mode 0600), optionally on loopback TCP."""

    socket: Annotated[str | bool, PlainValidator(_socket)] | None = None  # None: beside pidfile
    listen: Annotated[str | None, PlainValidator(_loopback_listen)] = None
    token: Annotated[str, Field(min_length=16, strict=True)] | None = None
    token_file: Annotated[str, Field(min_length=1, strict=True)] | None = None

    @model_validator(mode="after")
    def _token_needed(self) -> Admin:
        if self.listen is not None and (self.token is None) == (self.token_file is None):
            raise ValueError("admin.listen needs exactly one of token or token_file "
                             "(the bearer token TCP clients must send)")
        return self

    def bearer_token(self) -> str | None:
        """The TCP bearer token (read from ``token_file`` when given); OSError if unreadable."""
        if self.token_file is not None:
            with open(self.token_file, encoding="utf-8") as f:
                return f.read().strip()
        return self.token


def _worker_timeout(value: object) -> float:
    seconds = parse_duration(value)
    if not 0 < seconds <= MAX_WORKER_TIMEOUT:
        raise ValueError(f"expected more than 0 and at most {MAX_WORKER_TIMEOUT:g} seconds "
                         f"(a scrape waits for it), got {seconds:g}")
    return seconds


class Metrics(_Model):
    """``metrics``: the Prometheus listener (``/metrics``, ``/healthy``, ``/ready``)."""

    listen: Annotated[str | None, PlainValidator(_listen)] = DEFAULT_METRICS_LISTEN
    domain_labels: bool = False  # per-domain labels (unbounded cardinality): off by default
    # ``run --workers N``: worker 0 serves the host's metrics at ``listen``, reading the
    # other workers over their admin sockets within ``worker_timeout`` (observe/hostmetrics)
    worker_timeout: Annotated[float, PlainValidator(_worker_timeout)] = 2.0
    worker_listen: bool = False  # also worker K's own metrics at listen's port + K

    def address(self) -> tuple[str, int] | None:
        return None if self.listen is None else parse_listen(self.listen)


def admin_socket_path(admin: Admin, pidfile: str) -> str | None:
    """Where the admin socket is: ``admin.socket``, else beside the pidfile with its name
    and ``.sock`` (``var/ferrymail.pid`` -> ``var/ferrymail.sock``); None if off."""
    if admin.socket is False:
        return None
    if isinstance(admin.socket, str):
        return admin.socket
    base, ext = os.path.splitext(pidfile)
    return (base if ext == ".pid" else pidfile) + ".sock"


def for_worker(listen: str | None, index: int) -> str | None:
    """A worker's own TCP listener: ``HOST:PORT`` moved to ``PORT + index`` (worker 0 keeps
    the configured one), so N workers of one ``ferrymail run`` never compete for a port."""
    if listen is None or index == 0:
        return listen
    host, port = parse_listen(listen)
    return f"[{host}]:{port + index}" if ":" in host else f"{host}:{port + index}"


def worker_socket_path(path: str | None, index: int) -> str | None:
    """A worker's own admin socket: worker 0 keeps ``path``, worker K uses
    ``NAME.wK.sock`` beside it (``var/ferrymail.sock`` -> ``var/ferrymail.w1.sock``)."""
    if path is None or index == 0:
        return path
    base, ext = os.path.splitext(path)
    return f"{base}.w{index}{ext}"


__all__: list[Any] = ["Admin", "Metrics", "admin_socket_path", "for_worker", "parse_listen",
                      "worker_socket_path"]
