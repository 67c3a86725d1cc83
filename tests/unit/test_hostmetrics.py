"""Worker 0's scrape of the other workers (observe/hostmetrics.py) against a stand-in worker:
a real HTTP server on a Unix socket answering ``GET /v1/metrics`` with chosen text and
delays (the real worker processes are in tests/integration/test_workers_metrics.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from ferrymail.observe import aggregate
from ferrymail.observe.hostmetrics import HostMetrics, WorkerPeer


def _exposition(received: int, started: float) -> bytes:
    return (f"# TYPE ferrymail_messages_received_total counter\n"
            f'ferrymail_messages_received_total{{server="in"}} {received}\n'
            f"# TYPE {aggregate.START_TIME} gauge\n{aggregate.START_TIME} {started}\n").encode()


async def _stand_in(path: Path, answers: list[tuple[float, bytes]]) -> asyncio.AbstractServer:
    """Answer the n-th request after answers[n][0] seconds with answers[n][1]."""
    turn = iter(answers)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        delay, body = next(turn)
        await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(body) + body)
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(serve, path=str(path))


def _received(text: bytes) -> float:
    fams = aggregate.parse(text.decode())
    return sum(fams["ferrymail_messages_received"].samples.values())


def test_overlapping_scrapes_take_turns_so_nothing_is_counted_twice(tmp_path: Path):
    sock = tmp_path / "w1.sock"

    async def run() -> list[bytes]:
        # the first scrape's answer comes late and is older than the second's
        server = await _stand_in(sock, [(0.3, _exposition(5, 100.0)),
                                        (0.0, _exposition(7, 100.0))])
        host = HostMetrics(CollectorRegistry(), [WorkerPeer(1, socket_path=str(sock))], 2.0,
                           lambda: True)
        async with server:
            first = asyncio.create_task(host.scrape())
            await asyncio.sleep(0.05)
            second = asyncio.create_task(host.scrape())
            return [await first, await second]

    first, second = asyncio.run(run())
    assert (_received(first), _received(second)) == (5, 7)


def test_a_slow_worker_costs_one_timeout_and_keeps_its_counters(tmp_path: Path):
    sock = tmp_path / "w1.sock"
    state = tmp_path / "metrics-host.json"

    async def run() -> list[tuple[float, bytes]]:
        server = await _stand_in(sock, [(0.0, _exposition(4, 100.0)),
                                        (5.0, _exposition(9, 100.0)),
                                        (0.0, b"not prometheus {{{\n")])
        host = HostMetrics(CollectorRegistry(), [WorkerPeer(1, socket_path=str(sock))], 0.3,
                           lambda: True, state_path=state)
        out = []
        async with server:
            for _ in range(3):
                t0 = asyncio.get_running_loop().time()
                text = await host.scrape()
                out.append((asyncio.get_running_loop().time() - t0, text))
        return out

    (_, ok), (took, slow), (_, garbled) = asyncio.run(run())
    assert _received(ok) == 4
    assert took < 2.0  # the 0.3 s timeout, not the stand-in's 5 s
    for text in (slow, garbled):
        fams = aggregate.parse(text.decode())
        assert fams["ferrymail_worker_up"].samples[
            ("ferrymail_worker_up", (("worker", "1"),))] == 0
        assert _received(text) == 4  # last known counters, no drop
    fails = aggregate.parse(garbled.decode())["ferrymail_worker_scrape_failures"]
    assert list(fails.samples.values()) == [2.0]
    doc = json.loads(state.read_text())
    assert doc["failures"] == {"1": 2}
    # the same supervisor's next worker 0 takes the carry up
    again = HostMetrics(CollectorRegistry(), [], 0.3, lambda: True, state_path=state)
    assert again.failures == {1: 2}
    assert sum(again.counters.last[1]["ferrymail_messages_received"].samples.values()) == 4
    # another supervisor's file (a previous `ferrymail run`) is not taken up
    state.write_text(json.dumps({**doc, "supervisor": doc["supervisor"] + 1}))
    fresh = HostMetrics(CollectorRegistry(), [], 0.3, lambda: True, state_path=state)
    assert fresh.failures == {} and fresh.counters.last == {}
