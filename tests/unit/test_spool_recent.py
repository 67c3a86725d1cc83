"""Bodies kept in memory after `store` for the first delivery's `read` (spool/recent.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.spool import Envelope, MessageNotFound, RecipientState, RecipientUpdate, SqliteSpool
from ferrymail.spool.recent import RecentBodies


def envelope(*recipients: str) -> Envelope:
    return Envelope(sender="from@example.org", recipients=recipients or ("to@example.net",),
                    client_ip="192.0.2.1", client_port=2525, helo="client.example.org",
                    server_id="srv", received_at=1000.0)


def run(path: Any, body: Any) -> Any:
    async def main() -> Any:
        spool = SqliteSpool(path)
        await spool.start()
        try:
            return await body(spool)
        finally:
            await spool.close()
    return asyncio.run(main())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.binary(max_size=300)), max_size=80),
       st.integers(1, 2000), st.integers(1, 20))
def test_recent_bodies_stay_within_bounds_and_keep_the_newest(puts, max_bytes, max_entries):
    kept = RecentBodies(max_bytes=max_bytes, max_entries=max_entries)
    last: dict[int, bytes] = {}
    for msg_id, data in puts:
        kept.put(msg_id, data)
        last[msg_id] = data
        assert kept.bytes <= max_bytes and len(kept) <= max_entries
        assert kept.bytes == sum(len(d) for d in kept._bodies.values())
        if len(data) <= max_bytes // 4:
            assert kept.get(msg_id) == data  # the newest put is always kept
    for msg_id, data in kept._bodies.items():
        assert last[msg_id] == data  # never an outdated body


def test_a_body_too_big_for_a_quarter_of_the_bound_is_not_kept():
    kept = RecentBodies(max_bytes=100)
    kept.put(1, b"x" * 26)
    assert kept.get(1) is None and kept.bytes == 0
    kept.put(2, b"x" * 25)
    assert kept.get(2) == b"x" * 25


def test_read_after_store_comes_from_memory_and_matches_the_database(tmp_path):
    async def body(spool: SqliteSpool) -> None:
        qid = await spool.store(envelope(), b"hello\r\n")
        assert await spool.read(qid) == b"hello\r\n"
        assert spool.recent.hits == 1
        spool.recent.clear()
        assert await spool.read(qid) == b"hello\r\n"  # from the database
        assert spool.recent.misses == 1
    run(tmp_path, body)


def test_a_message_gone_is_not_read_from_memory(tmp_path):
    async def body(spool: SqliteSpool) -> None:
        deleted = await spool.store(envelope(), b"one")
        delivered = await spool.store(envelope("a@x", "b@x"), b"two")
        await spool.delete(deleted)
        with pytest.raises(MessageNotFound):
            await spool.read(deleted)
        done = RecipientUpdate("a@x", RecipientState.DELIVERED, 1, 0.0, "250 ok", None)
        await spool.update(delivered, [done])  # b@x still queued: the message stays
        assert await spool.read(delivered) == b"two"
        failed = RecipientUpdate("b@x", RecipientState.FAILED, 1, 0.0, "550 no", None)
        await spool.update(delivered, [failed])
        with pytest.raises(MessageNotFound):
            await spool.read(delivered)
        assert len(spool.recent) == 0 and spool.recent.bytes == 0
    run(tmp_path, body)


def test_a_deferred_message_keeps_its_body_readable(tmp_path):
    async def body(spool: SqliteSpool) -> None:
        qid = await spool.store(envelope(), b"later")
        later = RecipientUpdate("to@example.net", RecipientState.DEFERRED, 1, 9e9, "451", None)
        await spool.update(qid, [later])
        assert await spool.read(qid) == b"later"
    run(tmp_path, body)


def test_states_given_as_plain_text_finish_a_message_as_the_enum_does(tmp_path):
    async def body(spool: SqliteSpool) -> None:
        qid = await spool.store(envelope("a@x", "b@x"), b"text states")
        assert await spool.read(qid) == b"text states"
        await spool.update(qid, [RecipientUpdate("a@x", "delivered", 1, 0.0, "250", None),  # type: ignore[arg-type]
                                 RecipientUpdate("b@x", "failed", 1, 0.0, "550", None)])  # type: ignore[arg-type]
        assert await spool.get(qid) is None
        with pytest.raises(MessageNotFound):
            await spool.read(qid)
    run(tmp_path, body)
