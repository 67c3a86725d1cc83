"""The SQLite spool: round trips, group commit, recipient states, scheduling queries, restart."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.spool import (
    Envelope,
    MessageNotFound,
    ProxyInfo,
    QueueIdGenerator,
    RecipientState,
    RecipientUpdate,
    SpoolError,
    SqliteSpool,
    format_queue_id,
    parse_queue_id,
)
from ferrymail.spool.sqlite import envelope_from_json, envelope_to_json

QUEUED, DEFERRED = RecipientState.QUEUED, RecipientState.DEFERRED
DELIVERED, FAILED = RecipientState.DELIVERED, RecipientState.FAILED

FULL_ENVELOPE = Envelope(
    sender="Ünïcode.sender@exämple.org",
    recipients=("a@example.net", "B@Example.NET", '"quoted local"@example.com'),
    client_ip="2001:db8::7",
    client_port=51234,
    helo="[IPv6:2001:db8::7]",
    server_id="inbound-1",
    transport="outbound-proxy",
    proxy=ProxyInfo(
        version=2,
        proxy_ip="127.0.0.9",
        proxy_port=40001,
        source_ip="2001:db8::7",
        source_port=51234,
        dest_ip="2001:db8::25",
        dest_port=25,
        tlv_hex="0300040a0b0c0d",
    ),
    tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
    mail_params=(("BODY", "8BITMIME"), ("SMTPUTF8", ""), ("ENVID", "a+2Bb"), ("RET", "HDRS")),
    size=123_456,
    received_at=1_700_000_000.123456789,
)


def envelope(*recipients: str, received_at: float = 1000.0, **kw: Any) -> Envelope:
    fields: dict[str, Any] = {
        "sender": "from@example.org",
        "recipients": recipients or ("to@example.net",),
        "client_ip": "192.0.2.1",
        "client_port": 2525,
        "helo": "client.example.org",
        "server_id": "srv",
        "received_at": received_at,
    }
    return Envelope(**(fields | kw))


def upd(
    address: str,
    state: RecipientState,
    attempts: int = 1,
    next_attempt: float = 0.0,
    reply: str = "",
    notified: int | None = None,
) -> RecipientUpdate:
    return RecipientUpdate(address, state, attempts, next_attempt, reply, notified)


def with_spool(
    path: Path,
    body: Callable[[SqliteSpool], Awaitable[Any]],
    runner: Callable = asyncio.run,
    **kw: Any,
) -> Any:
    """Run `body(spool)` on a started spool in a fresh event loop; close it afterwards."""

    async def main() -> Any:
        spool = SqliteSpool(path, **kw)
        await spool.start()
        try:
            return await body(spool)
        finally:
            await spool.close()

    return runner(main())


# -- queue ids --------------------------------------------------------------------------------


def test_queue_ids_are_hex_unique_and_ordered_within_one_millisecond():
    gen = QueueIdGenerator()
    ids = [gen.next() for _ in range(20_000)]
    assert all(len(q) == 16 and parse_queue_id(q) is not None for q in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    # the top 6 bytes are the time in ms
    assert abs((parse_queue_id(ids[0]) >> 16) - time.time() * 1000) < 60_000


def test_queue_ids_never_go_below_a_seed():
    gen = QueueIdGenerator()
    future = (int(time.time() * 1000) + 3_600_000) << 16  # an hour ahead: a clock stepped back
    gen.seed(future)
    assert parse_queue_id(gen.next()) == future + 1


@pytest.mark.parametrize(
    "bad",
    ["", "0123", "0123456789ABCDEF", "0123456789abcdeg", "0123456789abcdef0", " 123456789abcdef"],
)
def test_parse_queue_id_rejects(bad):
    assert parse_queue_id(bad) is None


def test_format_parse_round_trip():
    assert format_queue_id(1) == "0000000000000001"
    assert parse_queue_id(format_queue_id(0x1234_5678_9ABC_DEF0)) == 0x1234_5678_9ABC_DEF0


# -- envelope codec -----------------------------------------------------------------------------

text = st.text()  # includes lone surrogates, which "surrogateescape" decoding can produce
opt_text = st.none() | text
port = st.integers(0, 65535)
proxies = st.none() | st.builds(
    ProxyInfo,
    st.sampled_from([1, 2]),
    text,
    port,
    opt_text,
    st.none() | port,
    opt_text,
    st.none() | port,
    text,
)
envelopes = st.builds(
    Envelope,
    sender=text,
    recipients=st.lists(text, min_size=1, max_size=5).map(tuple),
    client_ip=text,
    client_port=port,
    helo=text,
    server_id=text,
    transport=opt_text,
    proxy=proxies,
    tls=opt_text,
    mail_params=st.lists(st.tuples(text, text), max_size=4).map(tuple),
    size=st.integers(0, 2**53),
    received_at=st.floats(allow_nan=False),
)


@given(envelopes)
@settings(max_examples=300)
def test_envelope_json_round_trips_exactly(env):
    assert envelope_from_json(envelope_to_json(env)) == env



@given(envelopes)
@settings(max_examples=200)
def test_envelope_json_is_what_json_dumps_writes(env):
    # the stored text stays the standard library's compact ASCII JSON, character for
    # character, whatever encoder builds it (spools written before and after read alike)
    text = envelope_to_json(env)
    assert text == json.dumps(json.loads(text), separators=(",", ":"))
    assert text.isascii()

def test_envelope_json_keeps_infinities_and_nan():
    for value in (math.inf, -math.inf):
        assert (
            envelope_from_json(envelope_to_json(envelope(received_at=value))).received_at == value
        )
    assert math.isnan(
        envelope_from_json(envelope_to_json(envelope(received_at=math.nan))).received_at
    )


# -- store / read / get -------------------------------------------------------------------------


def test_store_read_get_round_trip_every_field(tmp_path):
    data = bytes(range(256)) * 40 + b"\r\n.\r\n\x00"

    async def body(spool: SqliteSpool):
        qid = await spool.store(FULL_ENVELOPE, data)
        assert parse_queue_id(qid) is not None
        assert await spool.read(qid) == data
        msg = await spool.get(qid)
        assert msg is not None and msg.queue_id == qid
        assert msg.envelope == FULL_ENVELOPE
        assert [r.address for r in msg.recipients] == list(FULL_ENVELOPE.recipients)
        for r in msg.recipients:
            assert r.state is QUEUED and r.attempts == 0 and r.last_reply == "" and r.notified == 0
            assert r.next_attempt == FULL_ENVELOPE.received_at
            assert r.transport == "outbound-proxy"
        return qid

    qid = with_spool(tmp_path, body)

    async def after_restart(spool: SqliteSpool):
        assert await spool.read(qid) == data
        assert (await spool.get(qid)).envelope == FULL_ENVELOPE

    with_spool(tmp_path, after_restart)


def test_store_accepts_bytearray_and_memoryview_and_copies(tmp_path):
    async def body(spool: SqliteSpool):
        buf = bytearray(b"hello")
        q1 = spool.store(envelope(), buf)
        q2 = spool.store(envelope(), memoryview(b"world"))
        task = asyncio.ensure_future(asyncio.gather(q1, q2))
        await asyncio.sleep(0)
        buf[:] = b"XXXXX"  # reusing the buffer after handing it over changes nothing
        id1, id2 = await task
        assert await spool.read(id1) == b"hello"
        assert await spool.read(id2) == b"world"

    with_spool(tmp_path, body)


def test_empty_message_and_null_sender(tmp_path):
    async def body(spool: SqliteSpool):
        qid = await spool.store(envelope(sender=""), b"")
        assert await spool.read(qid) == b""
        assert (await spool.get(qid)).envelope.sender == ""

    with_spool(tmp_path, body)


def test_duplicate_recipients_are_one_recipient_but_the_envelope_is_kept(tmp_path):
    async def body(spool: SqliteSpool):
        env = envelope("a@x", "b@x", "a@x")
        qid = await spool.store(env, b"m")
        msg = await spool.get(qid)
        assert msg.envelope == env
        assert [r.address for r in msg.recipients] == ["a@x", "b@x"]
        await spool.update(qid, [upd("a@x", DELIVERED), upd("b@x", DELIVERED)])
        assert await spool.get(qid) is None

    with_spool(tmp_path, body)


@pytest.mark.parametrize("runner", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_concurrent_stores_share_commits(tmp_path, runner):
    async def body(spool: SqliteSpool):
        payloads = [f"message {i}\r\n".encode() * 100 for i in range(200)]
        ids = await asyncio.gather(*(spool.store(envelope(), p) for p in payloads))
        assert len(set(ids)) == 200
        assert ids == sorted(ids)  # issued in this order, ids are time-ordered
        assert spool.commits < 200
        assert await spool.count() == 200
        for qid, payload in zip(ids, payloads, strict=True):
            assert await spool.read(qid) == payload

    with_spool(tmp_path, body, runner=runner)


def test_fsync_off_still_stores(tmp_path):
    async def body(spool: SqliteSpool):
        qid = await spool.store(envelope(), b"x")
        assert await spool.read(qid) == b"x"

    with_spool(tmp_path, body, fsync=False)
    with_spool(tmp_path, lambda spool: _assert_count(spool, 1))


async def _assert_count(spool: SqliteSpool, n: int) -> None:
    assert await spool.count() == n


# -- bad input ----------------------------------------------------------------------------------


def test_store_refuses_bad_envelopes_and_stores_nothing(tmp_path):
    async def body(spool: SqliteSpool):
        with pytest.raises(ValueError, match="without recipients"):
            await spool.store(Envelope("a@x", (), "192.0.2.1", 1, "h", "s"), b"x")
        with pytest.raises(ValueError, match="not valid text"):
            await spool.store(envelope("ok@x", "bad\udcff@x"), b"x")
        with pytest.raises(TypeError, match="Envelope"):
            await spool.store({"sender": "a"}, b"x")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="bytes is not JSON serializable"):
            await spool.store(envelope(helo=b"bytes"), b"x")  # type: ignore[arg-type]
        assert await spool.count() == 0
        # the spool still works
        qid = await spool.store(envelope(), b"fine")
        assert await spool.read(qid) == b"fine"

    with_spool(tmp_path, body)


def test_a_lone_surrogate_in_the_sender_or_helo_round_trips(tmp_path):
    # A server that decodes with "surrogateescape" keeps undecodable bytes this way.
    env = envelope(sender="caf\udce9@x", helo="h\udcff")

    async def body(spool: SqliteSpool):
        qid = await spool.store(env, b"x")
        assert (await spool.get(qid)).envelope == env

    with_spool(tmp_path, body)


def test_unknown_ids_and_recipients(tmp_path):
    async def body(spool: SqliteSpool):
        qid = await spool.store(envelope("a@x", "b@x"), b"x")
        missing = format_queue_id(parse_queue_id(qid) + 1)
        for bad in (missing, "not-a-queue-id"):
            with pytest.raises(MessageNotFound):
                await spool.read(bad)
            with pytest.raises(MessageNotFound):
                await spool.update(bad, [upd("a@x", DELIVERED)])
            with pytest.raises(MessageNotFound):
                await spool.delete(bad)
            assert await spool.get(bad) is None
        # one bad update in a list changes nothing at all
        with pytest.raises(SpoolError, match="no recipient 'nobody@x'"):
            await spool.update(qid, [upd("a@x", FAILED), upd("nobody@x", DELIVERED)])
        with pytest.raises(SpoolError, match="'bogus' is not a valid RecipientState"):
            await spool.update(qid, [upd("b@x", DELIVERED), upd("a@x", "bogus")])  # type: ignore[arg-type]
        # a last update (every recipient final) with a bad value is refused as any other
        with pytest.raises(SpoolError, match="invalid literal for int"):
            await spool.update(qid, [upd("a@x", DELIVERED), upd("b@x", FAILED, "x")])  # type: ignore[arg-type]
        with pytest.raises(SpoolError, match="no recipient 'nobody@x'"):
            await spool.update(qid, [upd("a@x", DELIVERED), upd("b@x", FAILED),
                                     upd("nobody@x", DELIVERED)])
        msg = await spool.get(qid)
        assert [r.state for r in msg.recipients] == [QUEUED, QUEUED]
        await spool.delete(qid)
        with pytest.raises(MessageNotFound):
            await spool.delete(qid)

    with_spool(tmp_path, body)


def test_a_failing_operation_does_not_fail_its_batch(tmp_path):
    async def body(spool: SqliteSpool):
        qid = await spool.store(envelope("a@x"), b"x")
        results = await asyncio.gather(
            *(spool.store(envelope(), b"s") for _ in range(5)),
            spool.update(qid, [upd("zz@x", DELIVERED)]),
            spool.delete(format_queue_id(parse_queue_id(qid) + 100)),
            spool.update(qid, [upd("a@x", DEFERRED, 1, 99.0, "451 later")]),
            *(spool.store(envelope(), b"t") for _ in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, str) for r in results[:5] + results[8:])
        assert isinstance(results[5], SpoolError) and isinstance(results[6], MessageNotFound)
        assert results[7] is None
        assert (await spool.get(qid)).recipients[0].last_reply == "451 later"
        assert await spool.count() == 11

    with_spool(tmp_path, body)


# -- recipient states ---------------------------------------------------------------------------


def test_updates_record_states_and_final_states_remove_the_message(tmp_path):
    async def body(spool: SqliteSpool):
        qid = await spool.store(envelope("a@x", "b@x", "c@x", received_at=10.0), b"data")
        other = await spool.store(envelope("z@x"), b"other")
        await spool.update(
            qid,
            [
                upd("a@x", DELIVERED, 1, 10.0, "250 2.0.0 ok"),
                upd("b@x", DEFERRED, 1, 310.0, "451 4.7.1 try later", notified=1),
            ],
        )
        recs = {r.address: r for r in (await spool.get(qid)).recipients}
        assert recs["a@x"].state is DELIVERED and recs["a@x"].last_reply == "250 2.0.0 ok"
        assert recs["b@x"].state is DEFERRED and recs["b@x"].attempts == 1
        assert recs["b@x"].next_attempt == 310.0 and recs["b@x"].notified == 1
        assert recs["c@x"].state is QUEUED and recs["c@x"].attempts == 0
        # notified=None keeps the count
        await spool.update(qid, [upd("b@x", DEFERRED, 2, 910.0, "451 again")])
        recs = {r.address: r for r in (await spool.get(qid)).recipients}
        assert recs["b@x"].notified == 1 and recs["b@x"].attempts == 2
        # a reply with undecodable bytes is kept, escaped
        await spool.update(qid, [upd("c@x", DEFERRED, 1, 20.0, "451 caf\udce9")])
        recs = {r.address: r for r in (await spool.get(qid)).recipients}
        assert recs["c@x"].last_reply == "451 caf\\udce9"
        assert await spool.count() == 2
        await spool.update(qid, [upd("b@x", FAILED, 3, 0, "550 no"), upd("c@x", DELIVERED)])
        assert await spool.get(qid) is None
        with pytest.raises(MessageNotFound):
            await spool.read(qid)
        assert await spool.count() == 1
        assert await spool.read(other) == b"other"
        assert [m.queue_id for m in await spool.list()] == [other]

    with_spool(tmp_path, body)


def test_update_with_no_changes_keeps_the_message(tmp_path):
    async def body(spool: SqliteSpool):
        qid = await spool.store(envelope(), b"x")
        await spool.update(qid, [])
        assert await spool.get(qid) is not None

    with_spool(tmp_path, body)


# -- scheduling queries -------------------------------------------------------------------------


def test_due_next_due_and_exclude(tmp_path):
    async def body(spool: SqliteSpool):
        assert await spool.next_due() is None
        assert await spool.due(1e12) == []
        # stored in this order; due times deliberately not in store order
        m1 = await spool.store(envelope("a@x", received_at=300.0), b"1")
        m2 = await spool.store(envelope("b@x", "c@x", received_at=100.0), b"2")
        m3 = await spool.store(envelope("d@x", received_at=200.0), b"3")
        assert await spool.next_due() == 100.0
        assert [m.queue_id for m in await spool.due(99.0)] == []
        assert [m.queue_id for m in await spool.due(100.0)] == [m2]
        # soonest due first (here: oldest received first), not in the order stored
        assert [m.queue_id for m in await spool.due(1000.0)] == [m2, m3, m1]
        assert [m.queue_id for m in await spool.due(1000.0, limit=2)] == [m2, m3]
        assert [m.queue_id for m in await spool.due(1000.0, exclude={m2, "junk"})] == [m3, m1]
        # after: only messages stored after that id, in the order stored
        assert [m.queue_id for m in await spool.due(1000.0, after=m1)] == [m2, m3]
        assert [m.queue_id for m in await spool.due(1000.0, after=m2)] == [m3]
        assert [m.queue_id for m in await spool.due(150.0, after=m1)] == [m2]
        assert [m.queue_id for m in await spool.due(1000.0, after=m1, limit=1)] == [m2]
        assert [m.queue_id for m in await spool.due(1000.0, after=m1, exclude=[m2])] == [m3]
        assert await spool.due(1000.0, after=m3) == []
        with pytest.raises(ValueError, match="malformed queue id"):
            await spool.due(1000.0, after="junk")
        # a due message comes with all its recipients, whatever their state
        await spool.update(m2, [upd("b@x", DELIVERED), upd("c@x", DEFERRED, 1, 500.0, "451")])
        assert await spool.next_due() == 200.0
        assert [m.queue_id for m in await spool.due(400.0)] == [m3, m1]
        assert [m.queue_id for m in await spool.due(1000.0, after=m1)] == [m2, m3]
        (msg,) = await spool.due(500.0, exclude=[m1, m3])
        assert msg.queue_id == m2
        assert [(r.address, r.state) for r in msg.recipients] == [
            ("b@x", DELIVERED),
            ("c@x", DEFERRED),
        ]
        await spool.update(m1, [upd("a@x", DEFERRED, 1, 150.0, "451")])
        assert await spool.next_due() == 150.0
        await spool.delete(m1)
        await spool.delete(m3)
        assert await spool.next_due() == 500.0
        await spool.update(m2, [upd("c@x", FAILED, 2, 0, "550")])
        assert await spool.next_due() is None
        assert await spool.count() == 0

    with_spool(tmp_path, body)


def test_due_pages_through_a_deep_queue_by_exclusion_and_by_id(tmp_path):
    """`due` walks the pending index in due order and stops at `limit`; the scheduler pages
    on by excluding what it holds, or by id for new mail; reads mix with it."""
    async def body(spool: SqliteSpool):
        ids = [await spool.store(envelope(f"r{i}@x", received_at=float(i)), b"%d" % i)
               for i in range(300)]
        first = await spool.due(1e9, limit=100)
        assert [m.queue_id for m in first] == ids[:100]
        nxt = await spool.due(1e9, limit=100, exclude=ids[:100])
        assert [m.queue_id for m in nxt] == ids[100:200]
        assert [m.queue_id for m in await spool.due(1e9, limit=5, after=ids[-3])] == ids[-2:]
        due, data = await asyncio.gather(spool.due(1e9, limit=300), spool.read(ids[7]))
        assert len(due) == 300 and data == b"7"

    with_spool(tmp_path, body)


def test_deleting_a_big_body_does_not_rewrite_its_pages(tmp_path):
    """secure_delete=FAST: removing a delivered message frees its body's pages without
    zeroing them, so the commit writes a few pages to the WAL, not the whole body again."""
    size = 2 * 1024 * 1024

    async def body(spool: SqliteSpool):
        qid = await spool.store(envelope("a@x"), b"x" * size)
        wal = spool.db_path.with_name(spool.db_path.name + "-wal")
        other = sqlite3.connect(spool.db_path, timeout=5)
        try:
            for _ in range(100):  # busy while the spool's own checkpointer runs
                if other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0:
                    break
                await asyncio.sleep(0.02)
        finally:
            other.close()
        assert wal.stat().st_size == 0
        await spool.update(qid, [upd("a@x", DELIVERED)])
        assert await spool.count() == 0
        assert 0 < wal.stat().st_size < size // 8

    with_spool(tmp_path, body)


def test_list_is_oldest_first_and_limited(tmp_path):
    async def body(spool: SqliteSpool):
        ids = [await spool.store(envelope(received_at=float(i)), b"x") for i in range(5)]
        assert [m.queue_id for m in await spool.list()] == ids
        assert [m.queue_id for m in await spool.list(limit=3)] == ids[:3]

    with_spool(tmp_path, body)


# -- lifecycle ----------------------------------------------------------------------------------


def test_restart_finds_everything_and_continues_the_ids(tmp_path):
    async def first(spool: SqliteSpool):
        ids = [
            await spool.store(envelope(f"r{i}@x", received_at=float(i)), b"m%d" % i)
            for i in range(10)
        ]
        await spool.update(ids[3], [upd("r3@x", DEFERRED, 2, 77.0, "451 busy", notified=1)])
        await spool.update(ids[4], [upd("r4@x", DELIVERED)])
        return ids

    ids = with_spool(tmp_path, first)

    async def second(spool: SqliteSpool):
        assert await spool.count() == 9
        for i, qid in enumerate(ids):
            if i == 4:
                assert await spool.get(qid) is None
                continue
            assert await spool.read(qid) == b"m%d" % i
            assert (await spool.get(qid)).envelope == envelope(f"r{i}@x", received_at=float(i))
        (rec,) = (await spool.get(ids[3])).recipients
        assert (rec.state, rec.attempts, rec.next_attempt, rec.last_reply, rec.notified) == (
            DEFERRED,
            2,
            77.0,
            "451 busy",
            1,
        )
        new = await spool.store(envelope(), b"new")
        assert new > max(ids)

    with_spool(tmp_path, second)


def test_stores_issued_before_close_complete_before_close_returns(tmp_path):
    async def main():
        spool = SqliteSpool(tmp_path)
        await spool.start()
        results = await asyncio.gather(
            *(spool.store(envelope(), b"%d" % i) for i in range(50)), spool.close()
        )
        ids = results[:50]
        assert all(parse_queue_id(q) is not None for q in ids)
        with pytest.raises(SpoolError, match="not open"):
            await spool.store(envelope(), b"late")
        with pytest.raises(SpoolError, match="not open"):
            await spool.count()
        await spool.close()  # twice is fine
        return ids

    ids = asyncio.run(main())

    async def check(spool: SqliteSpool):
        for i, qid in enumerate(ids):
            assert await spool.read(qid) == b"%d" % i

    with_spool(tmp_path, check)


def test_concurrent_close_calls_all_wait_for_the_drain(tmp_path):
    async def main():
        spool = SqliteSpool(tmp_path)
        await spool.start()
        store = asyncio.ensure_future(spool.store(envelope(), b"x"))
        await asyncio.sleep(0)
        await asyncio.gather(spool.close(), spool.close())
        assert store.done()
        return store.result()

    qid = asyncio.run(main())
    with_spool(tmp_path, lambda spool: _assert_count(spool, 1))
    assert parse_queue_id(qid) is not None


def test_start_twice_and_use_before_start(tmp_path):
    async def main():
        spool = SqliteSpool(tmp_path)
        with pytest.raises(SpoolError, match="not open"):
            await spool.store(envelope(), b"x")
        await spool.start()
        with pytest.raises(SpoolError, match="already started"):
            await spool.start()
        await spool.close()

    asyncio.run(main())


def test_one_spool_per_directory(tmp_path):
    async def main():
        async with SqliteSpool(tmp_path) as first:
            with pytest.raises(SpoolError, match="in use"):
                await SqliteSpool(tmp_path).start()
            await first.store(envelope(), b"x")
        async with SqliteSpool(tmp_path) as again:  # free once closed
            assert await again.count() == 1

    asyncio.run(main())


def test_stores_are_refused_below_min_free_but_results_still_recorded(tmp_path):
    async def body(spool: SqliteSpool):
        qid = await spool.store(envelope("a@x", "b@x"), b"x")
        gone = await spool.store(envelope(), b"y")
        spool.min_free = 1 << 62  # more than any disk has
        with pytest.raises(SpoolError, match="not enough disk space"):
            await spool.store(envelope(), b"z")
        await spool.update(qid, [upd("a@x", DELIVERED)])
        await spool.delete(gone)
        assert [r.state for r in (await spool.get(qid)).recipients] == [DELIVERED, QUEUED]
        spool.min_free = 0
        await spool.store(envelope(), b"z")
        assert await spool.count() == 2

    with_spool(tmp_path, body)


def test_the_database_file_is_what_the_brief_says(tmp_path):
    with_spool(tmp_path, lambda spool: spool.store(envelope(), b"x"))
    conn = sqlite3.connect(tmp_path / "spool.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM bodies").fetchone()[0] == 1
    finally:
        conn.close()


def test_a_store_cancelled_before_its_commit_is_not_kept(tmp_path):
    async def body(spool: SqliteSpool):
        blocker = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # e.g. an operator's shell: the writer waits
        try:
            first = asyncio.ensure_future(spool.store(envelope(), b"kept"))
            await asyncio.sleep(0.2)  # the writer has taken `first` and waits for the lock
            second = asyncio.ensure_future(spool.store(envelope(), b"given up"))
            await asyncio.sleep(0.05)
            second.cancel()  # the session went away before "250"
            await asyncio.sleep(0.05)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        qid = await first
        with pytest.raises(asyncio.CancelledError):
            await second
        third = await spool.store(envelope(), b"later")  # written after `second` was seen
        assert [m.queue_id for m in await spool.list()] == [qid, third]

    with_spool(tmp_path, body)


def test_read_only_spool_beside_a_running_one_and_after_it_stopped(tmp_path):
    async def main():
        async with SqliteSpool(tmp_path) as spool:
            qid = await spool.store(envelope("a@x"), b"data")
            async with SqliteSpool(tmp_path, readonly=True) as view:
                assert [m.queue_id for m in await view.list()] == [qid]
                assert await view.read(qid) == b"data"
                later = await spool.store(envelope("b@x"), b"more")  # the writer carries on
                assert await view.count() == 2
                assert await view.next_due() == 1000.0
                for write in (
                    view.store(envelope(), b"x"),
                    view.update(qid, [upd("a@x", DELIVERED)]),
                    view.delete(qid),
                ):
                    with pytest.raises(SpoolError, match="read-only"):
                        await write
        # the reserve for delivery results stays allocated between runs; large bodies folder
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bodies", "reserve", "spool.db"]
        async with SqliteSpool(tmp_path, readonly=True) as view:
            assert [m.queue_id for m in await view.due(2000.0)] == [qid, later]
        async with SqliteSpool(tmp_path) as spool:  # and the writer opens again afterwards
            assert await spool.count() == 2

    asyncio.run(main())


def test_read_only_spool_needs_an_existing_spool(tmp_path):
    async def main():
        with pytest.raises(SpoolError, match="no spool database at"):
            await SqliteSpool(tmp_path / "nothing", readonly=True).start()
        assert not (tmp_path / "nothing").exists()
        conn = sqlite3.connect(tmp_path / "spool.db")
        conn.execute("CREATE TABLE other (x)")
        conn.close()
        with pytest.raises(SpoolError, match="not a ferrymail spool"):
            await SqliteSpool(tmp_path, readonly=True).start()

    asyncio.run(main())
