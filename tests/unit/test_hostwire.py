"""The host limiter's framing and request handling (sans-IO), and `HostLimiter` against a
real limiter service on a Unix socket in this process: pipelined requests, leases freed when
a worker's connection closes, the ``released`` push, the split fallback and adopt."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.orchestrator.host import HostLimiter
from ferrymail.orchestrator.hostservice import LimiterService, _Conn, serve, socket_path
from ferrymail.orchestrator.hostwire import (
    MAX_FRAME,
    FrameDecoder,
    ProtocolError,
    attempt_to_wire,
    encode,
    limit_from_wire,
    limit_to_wire,
)
from ferrymail.orchestrator.limiter import Denied, Lease
from ferrymail.orchestrator.local import LocalLimiter
from ferrymail.orchestrator.policy import Attempt, Limit, Rate

A = Attempt("192.0.2.1", "198.51.100.7", "mx.example.com", "example.com", "t")
CONC = Limit("localip=192.0.2.1", "localip=192.0.2.1", 2)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# -- framing ---------------------------------------------------------------------------


def test_frames_split_anywhere_come_out_whole() -> None:
    data = encode({"id": 1, "op": "x"}) + encode({"op": "released", "key": "k"})
    for cut in range(len(data) + 1):
        d = FrameDecoder()
        got = d.feed(data[:cut]) + d.feed(data[cut:])
        assert got == [{"id": 1, "op": "x"}, {"op": "released", "key": "k"}]
        assert d.pending == 0


@pytest.mark.parametrize("data, message", [
    (struct.pack(">I", MAX_FRAME + 1), "exceeds"),
    (frame(b"\xff\xfe"), "not UTF-8 JSON"),
    (frame(b"{not json"), "not UTF-8 JSON"),
    (frame(b"[1, 2]"), "not an object"),
    (frame(b"7"), "not an object"),
])
def test_bad_frames_are_a_clear_protocol_error(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        FrameDecoder().feed(data)


def test_a_frame_too_large_to_send_is_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode({"x": "a" * MAX_FRAME})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_raise_only_protocol_errors(chunks: list[bytes]) -> None:
    d = FrameDecoder()
    try:
        for c in chunks:
            for obj in d.feed(c):
                assert isinstance(obj, dict)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5),
                                max_size=4), max_size=5), st.integers(1, 7))
def test_any_objects_round_trip_whatever_the_chunking(objs: list[dict], step: int) -> None:
    data = b"".join(encode(o) for o in objs)
    d = FrameDecoder()
    got = []
    for i in range(0, len(data), step):
        got += d.feed(data[i:i + step])
    assert got == objs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.none() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3)
                | st.booleans() | st.lists(st.text(max_size=2), max_size=3), max_size=7))
def test_bad_limits_are_protocol_errors(v: list) -> None:
    try:
        limit_from_wire(v)
    except ProtocolError:
        pass


def test_limits_round_trip() -> None:
    lim = Limit("k", "label", 3, Rate(20, 1.0, 2), 0.5, (("localip", "192.0.2.1"),))
    assert limit_from_wire(json.loads(json.dumps(limit_to_wire(lim)))) == lim


# -- the service's request handling (sans socket) -----------------------------------------


class _W:
    """A writer that records frames (for `_Conn`)."""

    def __init__(self) -> None:
        self.frames: list[dict] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.frames += FrameDecoder().feed(data)


def conn(name: str) -> tuple[_Conn, _W]:
    w = _W()
    return _Conn(w, name), w  # type: ignore[arg-type]


def connect(svc: LimiterService, c: _Conn, rid: int, lease: str) -> dict:
    reply = svc.handle(c, {"id": rid, "op": "connect", "a": attempt_to_wire(A),
                           "l": [limit_to_wire(CONC)], "lease": lease})
    assert reply is not None
    return reply


def test_concurrency_across_connections_release_push_and_close() -> None:
    svc = LimiterService(LocalLimiter())
    a, wa = conn("0")
    b, wb = conn("1")
    svc.conns |= {a, b}
    assert "lease" in connect(svc, a, 1, "l1")
    assert "lease" in connect(svc, b, 2, "l2")
    refused = connect(svc, b, 3, "l3")
    assert refused["denied"][0] == "concurrency" and refused["denied"][3] == CONC.key
    assert "2/2" in refused["denied"][1]
    # a's lease freed: b (refused on that key) is told, once
    assert svc.handle(a, {"op": "release", "lease": "l1"}) is None
    assert wb.frames == [{"op": "released", "key": CONC.key}]
    assert "lease" in connect(svc, b, 4, "l4")
    assert connect(svc, a, 5, "l5")["denied"][0] == "concurrency"
    # b's connection closes (its worker died): both its leases are free at once
    svc.closed(b)
    assert wa.frames == [{"op": "released", "key": CONC.key}]
    assert "lease" in connect(svc, a, 6, "l6")
    assert "lease" in connect(svc, a, 7, "l7")
    assert svc.limiter.held(CONC.key) == 2


def test_adopted_leases_count() -> None:
    svc = LimiterService(LocalLimiter())
    a, _ = conn("0")
    svc.handle(a, {"op": "adopt", "leases": [["x1", {CONC.key: 2}], ["x2", {CONC.key: 2}]]})
    assert connect(svc, a, 1, "l1")["denied"][0] == "concurrency"
    svc.handle(a, {"op": "release", "lease": "x1"})
    assert "lease" in connect(svc, a, 2, "l2")


@pytest.mark.parametrize("req, message", [
    ({"op": "connect", "a": [], "l": [], "lease": "x"}, "integer id"),
    ({"id": 1, "op": "connect", "a": ["x"], "l": [], "lease": "x"}, "attempt"),
    ({"id": 1, "op": "connect", "a": attempt_to_wire(A), "l": [["k"]], "lease": "x"},
     "limit must be"),
    ({"id": 1, "op": "connect", "a": attempt_to_wire(A), "l": [], "lease": ""}, "lease id"),
    ({"id": 1, "op": "message", "a": attempt_to_wire(A), "l": [], "lease": None,
      "ahead": -1}, "ahead"),
    ({"id": 1, "op": "fly"}, "unknown op"),
    ({"op": "adopt", "leases": [["x", {"k": "2"}]]}, "integers"),
])
def test_bad_requests_are_protocol_errors(req: dict, message: str) -> None:
    svc = LimiterService(LocalLimiter())
    c, _ = conn("0")
    with pytest.raises(ProtocolError, match=message):
        svc.handle(c, req)


# -- HostLimiter against a real service socket -------------------------------------------


async def start_service(spool: Path) -> tuple[asyncio.Task[None], asyncio.Event]:
    ready = asyncio.Event()
    task = asyncio.create_task(serve(spool, ready.set))
    await asyncio.wait_for(ready.wait(), 5)
    return task, ready


async def stop_service(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@contextlib.asynccontextmanager
async def service_and_two_workers(
        tmp_path: Path) -> AsyncIterator[tuple[list[asyncio.Task[None]], HostLimiter, HostLimiter]]:
    """A limiter service (``svc[0]``: a scenario may stop it and start another there) and
    two started workers; stopped in turn at the end."""
    svc = [(await start_service(tmp_path))[0]]
    w0 = HostLimiter(socket_path(tmp_path), tmp_path, workers=2, worker=0)
    w1 = HostLimiter(socket_path(tmp_path), tmp_path, workers=2, worker=1)
    await w0.start()
    await w1.start()
    try:
        yield svc, w0, w1
    finally:
        await w0.stop()
        await w1.stop()
        await stop_service(svc[0])


def test_host_limiter_shares_waits_falls_back_and_adopts(tmp_path: Path) -> None:
    asyncio.run(host_limiter_scenario(tmp_path))


async def host_limiter_scenario(tmp_path: Path) -> None:
    async with service_and_two_workers(tmp_path) as (svc, w0, w1):
        assert w0.shared and w1.shared
        # pipelined: many requests in flight on one connection
        got = await asyncio.gather(*(w0.connect(A, (CONC,)) for _ in range(5)))
        leases = [g for g in got if isinstance(g, Lease)]
        assert len(leases) == 2 and all(isinstance(g, Denied) for g in got if g not in leases)
        refused = await w1.connect(A, (CONC,))
        assert isinstance(refused, Denied) and refused.kind == "concurrency"
        # w1 waits; w0's release wakes it by a push, well before the timeout
        t0 = asyncio.get_running_loop().time()
        waiter = asyncio.create_task(w1.wait(refused, 5.0))
        await asyncio.sleep(0.05)
        w0.release(leases[0])
        await asyncio.wait_for(waiter, 2)
        assert asyncio.get_running_loop().time() - t0 < 1.0
        mine = await w1.connect(A, (CONC,))
        assert isinstance(mine, Lease)
        # rates go through the service too: 10/1 burst 1 -> the second message waits
        rate = Limit("r", "r", rate=Rate(10, 1.0))
        assert await w0.message(A, (rate,), None) is None
        second = await w1.message(A, (rate,), None)
        assert isinstance(second, Denied) and second.kind == "rate"
        # the service dies: each worker falls back to ⌈2/2⌉ = 1, counting what it holds
        await stop_service(svc[0])
        await asyncio.sleep(0.2)
        assert w0.state == w1.state == "fallback"
        assert "split 1/2" in (w0.fallback_note() or "")
        refused0 = await w0.connect(A, (CONC,))  # w0 still holds leases[1]
        assert isinstance(refused0, Denied) and "split 1/2" in refused0.reason
        w1.release(mine)
        extra = await w1.connect(A, (CONC,))  # taken during the outage
        assert isinstance(extra, Lease)
        # the service comes back empty: both adopt what they hold, nothing double-counted
        svc[0], _ = await start_service(tmp_path)
        for _ in range(100):
            if w0.shared and w1.shared:
                break
            await asyncio.sleep(0.05)
        assert w0.shared and w1.shared
        await asyncio.sleep(0.05)  # the adopt frames are read before the next request
        full = await w0.connect(A, (CONC,))
        assert isinstance(full, Denied) and "2/2" in full.reason
        w0.release(leases[1])
        assert isinstance(await w0.connect(A, (CONC,)), Lease)


def test_a_release_wakes_one_waiter_of_its_key_then_the_next(tmp_path: Path) -> None:
    asyncio.run(wake_one_scenario(tmp_path))


async def wake_one_scenario(tmp_path: Path) -> None:
    async with service_and_two_workers(tmp_path) as (_, w0, w1):
        held = [await w0.connect(A, (CONC,)) for _ in range(2)]
        assert all(isinstance(x, Lease) for x in held)
        refusals = [await w1.connect(A, (CONC,)) for _ in range(2)]
        assert all(isinstance(r, Denied) for r in refusals)
        waiters = [asyncio.create_task(w1.wait(r, 5.0)) for r in refusals]  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        w0.release(held[0])  # type: ignore[arg-type]
        done, pending = await asyncio.wait(waiters, timeout=1.0)
        assert len(done) == 1 and len(pending) == 1  # one slot freed: one job looks again
        w0.release(held[1])  # type: ignore[arg-type]
        await asyncio.wait_for(pending.pop(), 1.0)  # subscribed again: the next push came


def test_connected_moves_the_interval_to_the_connection_and_rejects_bad_input() -> None:
    clock = [1000.0]
    svc = LimiterService(LocalLimiter(clock=lambda: clock[0]))
    a, _ = conn("0")
    ci = Limit("localip=192.0.2.1", "localip=192.0.2.1", connectinterval=0.5)

    def ask(rid: int) -> dict:
        reply = svc.handle(a, {"id": rid, "op": "connect", "a": attempt_to_wire(A),
                               "l": [limit_to_wire(ci)], "lease": f"c{rid}"})
        assert reply is not None
        return reply

    assert "lease" in ask(1)  # granted at 1000.0
    clock[0] = 1000.3  # the connection stood 0.2 s after its grant
    assert svc.handle(a, {"op": "connected", "ago": 0.1, "l": [limit_to_wire(ci)]}) is None
    clock[0] = 1000.6  # past the grant's interval, not the connection's
    assert ask(2)["denied"][0] == "connectinterval"
    clock[0] = 1000.7
    assert "lease" in ask(3)
    with pytest.raises(ProtocolError):
        svc.handle(a, {"op": "connected", "ago": -1, "l": [limit_to_wire(ci)]})
