"""Admin API pieces without a daemon: the route table, the HTTP request reader's bounds,
queue filters and summaries, and the spool's queue-control methods."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferrymail.admin import http
from ferrymail.admin.http import HTTPError, RouteTable
from ferrymail.admin.queue import QueueFilter, message_view, summarize
from ferrymail.config.operations import Admin, admin_socket_path, parse_listen
from ferrymail.spool import HELD_AT, Envelope, RecipientState, RecipientUpdate, SqliteSpool


async def _noop(req: http.Request) -> dict:
    return {}


def test_route_table_params_and_errors():
    routes = RouteTable()
    routes.add("GET", "/v1/queue/{id}", _noop)
    routes.add("POST", "/v1/queue/retry", _noop)
    handler, params = routes.resolve("GET", "/v1/queue/00ab")
    assert handler is _noop and params == {"id": "00ab"}
    with pytest.raises(HTTPError) as e:
        routes.resolve("PUT", "/v1/queue/retry")
    assert e.value.status == 405 and "GET, POST" in e.value.message
    with pytest.raises(HTTPError) as e:
        routes.resolve("GET", "/v1/queue/a/b")
    assert e.value.status == 404
    with pytest.raises(ValueError, match="already registered"):
        routes.add("get", "/v1/queue/{id}", _noop)


def _read(raw: bytes) -> http.Request:
    async def run() -> http.Request:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()

        class W:
            def get_extra_info(self, name: str) -> object:
                return ("127.0.0.1", 1)

        return await http._read_request(reader, W())  # type: ignore[arg-type]
    return asyncio.run(run())


def test_request_reader_bounds():
    req = _read(b"POST /v1/queue/hold?id=a&id=b HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    assert (req.method, req.path, req.query["id"], req.json()) == (
        "POST", "/v1/queue/hold", ["a", "b"], {})
    for raw, status in ((b"GARBAGE\r\n\r\n", 400),
                        (b"GET / HTTP/1.1\r\nContent-Length: \xd9\xa5\r\n\r\n", 400),
                        (b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
                        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400)):
        with pytest.raises(HTTPError) as e:
            _read(raw)
        assert e.value.status == status
    with pytest.raises(HTTPError) as e:
        _read(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}").json()
    assert e.value.status == 400


@given(st.binary(max_size=300))
def test_request_reader_never_raises_anything_else(raw: bytes):
    try:
        _read(raw + b"\r\n\r\n")
    except (HTTPError, asyncio.IncompleteReadError):
        pass


def test_listen_and_socket_paths():
    assert parse_listen("127.0.0.1:9725") == ("127.0.0.1", 9725)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("localhost:80", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:\u0665", 80):
        with pytest.raises(ValueError):
            parse_listen(bad)
    assert admin_socket_path(Admin(), "var/ferrymail.pid") == "var/ferrymail.sock"
    assert admin_socket_path(Admin(socket=False), "x.pid") is None
    with pytest.raises(ValueError, match="token"):
        Admin(listen="127.0.0.1:8000")
    with pytest.raises(ValueError, match="loopback"):
        Admin(listen="192.0.2.1:8000", token="x" * 16)


def _env(sender: str, rcpts: tuple[str, ...], age: float = 0.0) -> Envelope:
    return Envelope(sender, rcpts, "127.0.0.1", 1, "h", "in", transport="t",
                    received_at=time.time() - age)


def test_spool_queue_control_filters_and_summary(tmp_path: Path):
    async def run() -> None:
        async with SqliteSpool(tmp_path / "spool") as spool:
            a = await spool.store(_env("s@x.test", ("u@a.test", "v@b.test"), age=7200),
                                  b"Subject: a\r\n\r\n")
            b = await spool.store(_env("t@y.test", ("w@a.test",)), b"Subject: b\r\n\r\n")
            now = time.time()
            await spool.update(b, [RecipientUpdate("w@a.test", RecipientState.DEFERRED, 1,
                                                   now + 3600, "451 4.7.1 greylisted")])
            assert await spool.hold(a) == 2
            assert await spool.hold(a) == 0  # already held
            assert await spool.retry(a, now) == 0  # held mail is not retried
            assert [m.queue_id for m in await spool.scan()] == [a, b]
            assert [m.queue_id for m in await spool.scan(a)] == [b]
            msgs = {m.queue_id: m for m in await spool.scan()}
            assert all(r.next_attempt == HELD_AT for r in msgs[a].recipients)
            views = [message_view(m, now=now) for m in msgs.values()]
            assert [v["state"] for v in views] == ["held", "deferred"]

            def ids(**kw: object) -> list[str]:
                flt = QueueFilter(**kw)  # type: ignore[arg-type]
                return [v["id"] for v in views if flt.matches(v)]
            assert ids(state="held") == [a]
            assert ids(recipient="a.test") == [a, b]
            assert ids(recipient="v@B.test") == [a]
            assert ids(sender="y.test") == [b]
            assert ids(older_than=3600.0) == [a]
            assert ids(last_error="greylist") == [b]
            assert ids(transport="other") == []
            rows = summarize(views, now=now)
            assert [(r["domain"], r["recipients"]) for r in rows] == [
                ("a.test", 2), ("b.test", 1)]
            a_row = rows[0]
            assert a_row["states"] == {"held": 1, "deferred": 1}
            assert a_row["last_error"] == "451 4.7.1 greylisted"
            assert "hold (queue hold)" in a_row["why"]
            assert any(w.startswith("retry at ") for w in a_row["why"])

            stats = await spool.queue_stats()
            assert {k: v[:2] for k, v in stats.items()} == {"held": (1, 2), "deferred": (1, 1)}
            assert all(abs(v[2] - now) < 60 for v in stats.values())  # stored just now
            assert await spool.release(a, now) == 2
            assert await spool.retry(b, now) == 1
            due = {m.queue_id for m in await spool.due(now + 0.001)}
            assert due == {a, b}
            with pytest.raises(Exception, match="no message"):
                await spool.hold("0000000000000001")
    asyncio.run(run())


def test_filter_rejects_bad_values():
    for kw in ({"ids": ("nothex",)}, {"state": "lost"}, {"last_error": "("}):
        with pytest.raises(ValueError):
            QueueFilter(**kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown filter"):
        QueueFilter.from_query({"colour": ["red"]})
    assert QueueFilter.from_query({"older_than": ["1h"]}).older_than == 3600.0


def test_reschedule_op_has_every_attribute_of_a_spool_op():
    import inspect

    from ferrymail.spool import sqlite, sqlite_control

    op = sqlite._Op(None, 1)  # type: ignore[arg-type]
    needed = set(vars(op)) | {"verb", "apply"}
    resched = sqlite_control._Reschedule(None, 1, 0.0, "1")  # type: ignore[arg-type]
    missing = {a for a in needed if not hasattr(resched, a)}
    assert not missing, missing
    assert inspect.signature(resched.apply).parameters.keys() == {"conn"}


def test_message_content_of_a_spooled_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from ferrymail.admin import queue as q
    from ferrymail.spool import SpooledBody

    raw = b"Subject: s\r\nX-Long: a\r\n b\r\n\r\n" + b"y" * 5000
    path = tmp_path / "body"
    path.write_bytes(raw)
    body = SpooledBody(path, len(raw))
    out = q.message_content(body, True)
    assert out["headers"] == ["Subject: s", "X-Long: a b"] and out["data_size"] == len(raw)
    assert out["message"] == raw.decode() and out["truncated"] is False
    monkeypatch.setattr(q, "SHOW_BODY_MAX", 100)
    cut = q.message_content(body, True)
    assert len(cut["message"]) == 100 and cut["truncated"] is True
    assert "message" not in q.message_content(raw, False)


def test_a_daemon_that_accepts_but_never_answers_is_unavailable(tmp_path: Path):
    """A stopped (SIGSTOP) or wedged worker accepts on its socket (the kernel's backlog) and
    never replies: the client says so within its timeout, as AdminUnavailable (the CLI then
    reads the spool or names the worker), not a TimeoutError traceback."""
    import socket
    import threading

    from ferrymail.admin.client import AdminClient, AdminUnavailable

    path = str(tmp_path / "w.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    try:
        client = AdminClient(socket_path=path, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(AdminUnavailable, match=rf"{path} did not answer within 0.5 s"):
            client.get("/v1/stats")
        assert time.monotonic() - started < 5
        srv.accept()[0].close()  # the first request's connection, long given up

        def hang_up() -> None:  # a worker dying mid-request: also unavailable, named
            conn, _ = srv.accept()
            conn.recv(1024)
            conn.close()

        t = threading.Thread(target=hang_up)
        t.start()
        with pytest.raises(AdminUnavailable, match=rf"{path} did not answer: "):
            client.get("/v1/stats")
        t.join(5)
    finally:
        srv.close()
