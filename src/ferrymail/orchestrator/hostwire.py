"""The host limiter's wire format (sans-IO): frames between workers and the limiter service.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding one
object. At most `MAX_FRAME` bytes a frame (a frame is one request: an attempt and its limits,
well under 1 KiB; adopting many leases is split into several frames by the sender).

Requests (worker -> service) carry an ``id`` (int) the reply repeats, so many may be in
flight on one connection (pipelined; replies come in request order, but the id is what
matches them)::

    {"id": 7, "op": "connect", "a": [attempt fields], "l": [limits], "lease": "ab12.."}
    {"id": 8, "op": "message", "a": [...], "l": [...], "lease": "ab12.." | null, "ahead": 0.2,
     "slots": 12}                      (slots optional, default 1, at most PREFETCH_MAX)
    {"id": 9, "op": "suspend", "fields": {...}, "duration": 300, "reason": "..."}
    {"op": "release", "lease": "ab12.."}                       (no reply)
    {"op": "adopt", "leases": [["ab12..", {"key": limit}], ...]} (no reply)
    {"op": "subscribe", "key": "..."}     (no reply: push "released" for this key once more)

Replies and pushes (service -> worker)::

    {"id": 7, "lease": "ab12..", "limits": {"key": limit}}     a concurrency lease
    {"id": 8, "hold": 0.05}                                    a rate slot (hold seconds)
    {"id": 8, "hold": 0.05, "slots": 12}                       N consecutive ones reserved,
                                                               this the first's hold (no
                                                               "slots": one; a worker keeps
                                                               only what is confirmed)
    {"id": 7, "denied": [kind, reason, retry_after, key]}      refused
    {"id": 9}                                                  done
    {"op": "released", "key": "..."}                           push: a lease of a key this
                                                               connection was refused on
                                                               is free again

`FrameDecoder.feed` never raises anything but `ProtocolError` (a clear message naming what
was wrong), whatever bytes arrive; after one the connection is closed.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from ferrymail.orchestrator.limiter import Denied, Lease
from ferrymail.orchestrator.policy import Attempt, Limit, Rate

MAX_FRAME = 64 * 1024
_LEN = struct.Struct(">I")
ATTEMPT_FIELDS = ("localip", "remoteip", "remotemx", "recipientdomain", "transportid",
                  "proxy", "grouping")


class ProtocolError(ValueError):
    """Bytes that are not a valid frame (too long, not JSON, not an object, bad fields)."""


def encode(obj: dict[str, Any]) -> bytes:
    """One frame; ProtocolError if the object is larger than MAX_FRAME."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Bytes in, whole frames (dicts) out; keeps what is not yet a whole frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Every frame completed by ``data``; ProtocolError on a bad one."""
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= _LEN.size:
            (size,) = _LEN.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise ProtocolError(f"frame length {size} exceeds {MAX_FRAME}")
            if len(self._buf) < _LEN.size + size:
                break
            body = bytes(self._buf[_LEN.size:_LEN.size + size])
            del self._buf[:_LEN.size + size]
            try:
                obj = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ProtocolError(f"frame is not UTF-8 JSON: {e}") from None
            if not isinstance(obj, dict):
                raise ProtocolError(f"frame is a JSON {type(obj).__name__}, not an object")
            out.append(obj)
        return out

    @property
    def pending(self) -> int:
        """Bytes held toward the next frame."""
        return len(self._buf)


# -- values <-> JSON ---------------------------------------------------------------------


def attempt_to_wire(a: Attempt) -> list[str]:
    return [a.value(f) for f in ATTEMPT_FIELDS]


def attempt_from_wire(v: object) -> Attempt:
    if not (isinstance(v, list) and len(v) == len(ATTEMPT_FIELDS)
            and all(isinstance(x, str) for x in v)):
        raise ProtocolError(f"attempt must be a list of {len(ATTEMPT_FIELDS)} strings")
    return Attempt(*v)


def limit_to_wire(lim: Limit) -> list[object]:
    rate = [lim.rate.count, lim.rate.period, lim.rate.burst] if lim.rate else None
    return [lim.key, lim.label, lim.concurrency, rate, lim.connectinterval,
            [list(p) for p in lim.fields]]


def _num(v: object, what: str, *, integer: bool = False) -> float:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or not v > 0:  # type: ignore[operator]
        raise ProtocolError(f"{what} must be a positive {'integer' if integer else 'number'}")
    return v  # type: ignore[return-value]


def limit_from_wire(v: object) -> Limit:
    if not (isinstance(v, list) and len(v) == 6):
        raise ProtocolError("limit must be a list of 6 items")
    key, label, conc, rate, ci, fields = v
    if not isinstance(key, str) or not isinstance(label, str):
        raise ProtocolError("limit key and label must be strings")
    if conc is not None:
        conc = int(_num(conc, "concurrency", integer=True))
    r = None
    if rate is not None:
        if not (isinstance(rate, list) and len(rate) == 3):
            raise ProtocolError("rate must be [count, period, burst]")
        r = Rate(int(_num(rate[0], "rate count", integer=True)), float(_num(rate[1], "period")),
                 int(_num(rate[2], "burst", integer=True)))
    if ci is not None:
        ci = float(_num(ci, "connectinterval"))
    if not (isinstance(fields, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in fields)):
        raise ProtocolError("limit fields must be [field, value] string pairs")
    return Limit(key, label, conc, r, ci, tuple((p[0], p[1]) for p in fields))


def limits_from_wire(v: object) -> tuple[Limit, ...]:
    if not isinstance(v, list):
        raise ProtocolError("limits must be a list")
    return tuple(limit_from_wire(x) for x in v)


def denied_to_wire(d: Denied) -> list[object]:
    return [d.kind, d.reason, d.retry_after, d.key]


def denied_from_wire(v: object) -> Denied:
    if not (isinstance(v, list) and len(v) == 4 and isinstance(v[0], str)
            and isinstance(v[1], str) and isinstance(v[3], str)
            and (v[2] is None or isinstance(v[2], (int, float)))):
        raise ProtocolError("denied must be [kind, reason, retry_after, key]")
    return Denied(v[0], v[1], None if v[2] is None else float(v[2]), v[3])  # type: ignore[arg-type]


def lease_id(v: object) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 64:
        raise ProtocolError("lease id must be a string of 1 to 64 characters")
    return v


def lease_limits(v: object) -> dict[str, int]:
    if not (isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool)
            for k, n in v.items())):
        raise ProtocolError("lease limits must map keys to integers")
    return dict(v)


def adopt_to_wire(leases: list[Lease]) -> list[list[object]]:
    return [[lease.id, {k: lease.limits.get(k, 1) for k in lease.keys}] for lease in leases]


def adopt_from_wire(v: object) -> list[Lease]:
    if not isinstance(v, list):
        raise ProtocolError("leases must be a list")
    out = []
    for item in v:
        if not (isinstance(item, list) and len(item) == 2):
            raise ProtocolError("a lease must be [id, {key: limit}]")
        limits = lease_limits(item[1])
        out.append(Lease(lease_id(item[0]), tuple(limits), limits))
    return out
