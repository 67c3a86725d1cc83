"""Large bodies in chunks: the session's sink, the spool's body files, the client's writer."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ferrymail.smtp.client import stuffed_chunks
from ferrymail.smtp.protocol import dot_stuff
from ferrymail.smtp.session import Deliver, ServerSession, SessionLimits, SessionSettings
from ferrymail.spool import (
    Envelope,
    RecipientState,
    RecipientUpdate,
    SpooledBody,
    SpoolError,
    SpoolFull,
    SqliteSpool,
)

ENV = Envelope(sender="from@example.org", recipients=("to@example.net",), client_ip="192.0.2.1",
               client_port=2525, helo="client.example.org", server_id="srv", received_at=1000.0)


# -- the session hands large bodies to its sink ----------------------------------------------


class MemorySink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.aborted
        self.parts.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


def session(spill_at: int = 64, **limits: int) -> tuple[ServerSession, list[MemorySink]]:
    sinks: list[MemorySink] = []

    def spill(txn):
        sinks.append(MemorySink())
        return sinks[-1]

    s = ServerSession(SessionSettings("mx.test", SessionLimits(**limits)), lambda d, c: True,
                      "192.0.2.7", spill=spill, spill_at=spill_at)
    s.receive(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    s.take_output()
    return s, sinks


BODY = b"".join(b"%s line %d\r\n" % (b"." * (i % 3), i) for i in range(200))


@pytest.mark.parametrize("read", [1, 7, 100, 1000])
def test_data_body_goes_to_the_sink_in_chunks(read):
    s, sinks = session()
    wire = b"DATA\r\n" + dot_stuff(BODY)
    event = None
    for i in range(0, len(wire), read):
        event = s.receive(wire[i:i + read]) or event
    assert isinstance(event, Deliver)
    assert len(sinks) == 1 and len(sinks[0].parts) > 2
    assert sinks[0].data == BODY and event.transaction.body == b""
    assert event.transaction.body_sink is sinks[0] and not sinks[0].aborted


def test_bdat_body_goes_to_the_sink_in_chunks():
    s, sinks = session()
    wire = b"".join(b"BDAT %d\r\n%s" % (len(BODY[i:i + 50]), BODY[i:i + 50])
                    for i in range(0, len(BODY), 50)) + b"BDAT 0 LAST\r\n"
    event = None
    for i in range(0, len(wire), 33):
        event = s.receive(wire[i:i + 33]) or event
    assert isinstance(event, Deliver)
    assert sinks[0].data == BODY and event.transaction.body == b""


def test_small_bodies_stay_in_memory():
    s, sinks = session(spill_at=100_000)
    event = s.receive(b"DATA\r\n" + dot_stuff(BODY))
    assert isinstance(event, Deliver) and event.transaction.body == BODY and sinks == []


@pytest.mark.parametrize("split", [1, 49, 50, 51])
def test_bdat_bare_line_ending_across_chunks_is_refused_and_the_body_dropped(split):
    s, sinks = session(spill_at=40)
    body = b"x" * 50 + b"\r" + b"y" * 50 + b"\r\n"  # a CR not followed by LF
    chunks = [body[:split], body[split:]]
    wire = b"".join(b"BDAT %d\r\n%s" % (len(c), c) for c in chunks[:-1])
    wire += b"BDAT %d LAST\r\n%s" % (len(chunks[-1]), chunks[-1])
    assert s.receive(wire) is None
    assert b"550 5.6.11" in s.take_output()
    assert all(sink.aborted for sink in sinks) and s.txn is None


def test_rset_oversize_and_lost_connections_drop_the_body():
    s, sinks = session()
    s.receive(b"DATA\r\n" + BODY)  # no end yet
    s.connection_lost()
    assert sinks[-1].aborted
    s, sinks = session(message_size=1000)
    s.receive(b"DATA\r\n" + BODY[:900])
    s.receive(BODY[900:] + b".\r\n")
    assert b"552" in s.take_output() and sinks[-1].aborted
    s, sinks = session()
    s.receive(b"BDAT 300\r\n" + BODY[:300] + b"RSET\r\n")
    assert sinks[-1].aborted and s.txn is None


# -- the client dot-stuffs a spooled body chunk by chunk ---------------------------------------


class ListBody(SpooledBody):
    """A SpooledBody whose chunks are given (the split under test)."""

    def __init__(self, parts: list[bytes]) -> None:
        super().__init__(Path("/nonexistent"), sum(map(len, parts)))
        self.parts = parts

    def chunks(self, size: int = 0):
        yield from self.parts


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"ab", b"\r\n."]),
                     max_size=40).map(b"".join),
       cuts=st.lists(st.integers(0, 200), max_size=8))
def test_stuffed_chunks_equal_dot_stuff_whatever_the_split(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    parts = [data[a:b] for a, b in itertools.pairwise(points)]
    assert b"".join(stuffed_chunks(ListBody(parts))) == dot_stuff(data)


# -- the spool keeps large bodies as files -----------------------------------------------------


def run(path: Path, body, **kw):
    async def main():
        async with SqliteSpool(path, **kw) as spool:
            return await body(spool)

    return asyncio.run(main())


def test_a_body_file_is_stored_read_in_chunks_and_removed_with_its_message(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)

    async def body(spool: SqliteSpool):
        writer = spool.open_body()
        for i in range(0, len(data), 65536):
            writer.write(data[i:i + 65536])
        assert (tmp_path / "bodies" / (writer.queue_id + ".part")).exists()
        qid = await spool.store(ENV, writer)
        assert qid == writer.queue_id
        path = tmp_path / "bodies" / qid
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        got = await spool.read(qid)
        assert isinstance(got, SpooledBody) and len(got) == len(data)
        assert b"".join(got.chunks(100_000)) == data and got.head(10) == data[:10]
        assert not got.isascii()
        small = await spool.store(ENV, b"small\r\n")
        assert await spool.read(small) == b"small\r\n"  # the fast path: bytes
        await spool.update(qid, [RecipientUpdate("to@example.net", RecipientState.DELIVERED,
                                                 1, 0.0, "250")])
        assert not path.exists()  # gone with its message
        other = spool.open_body()
        other.write(b"x" * 1000)
        qid2 = await spool.store(ENV, other)
        await spool.delete(qid2)
        assert not (tmp_path / "bodies" / qid2).exists()
        return small

    run(tmp_path, body)
    assert os.listdir(tmp_path / "bodies") == []


def test_a_refused_store_removes_its_body_file(tmp_path):
    async def body(spool: SqliteSpool):
        writer = spool.open_body()
        writer.write(b"x" * 1000)
        spool.min_free = 1 << 62
        with pytest.raises(SpoolFull):
            await spool.store(ENV, writer)
        return await spool.count()

    assert run(tmp_path, body) == 0
    assert os.listdir(tmp_path / "bodies") == []


def test_a_body_that_could_not_be_written_is_a_spool_error(tmp_path):
    async def body(spool: SqliteSpool):
        writer = spool.open_body()
        writer.write(b"x")
        os.close(writer._fd)  # the file breaks under it: EBADF on the next write
        writer.write(b"y")
        assert writer.error and writer.closed
        with pytest.raises(SpoolError, match="cannot write") as exc:
            await spool.store(ENV, writer)
        assert not isinstance(exc.value, SpoolFull)
        return await spool.count()

    assert run(tmp_path, body) == 0
    assert os.listdir(tmp_path / "bodies") == []


def test_start_removes_parts_and_files_no_message_names(tmp_path):
    async def keep(spool: SqliteSpool):
        writer = spool.open_body()
        writer.write(b"kept\r\n")
        return await spool.store(ENV, writer)

    qid = run(tmp_path, keep)
    bodies = tmp_path / "bodies"
    (bodies / "0000000000000001.part").write_bytes(b"arriving at the crash")
    (bodies / "0000000000000002").write_bytes(b"made durable, rows never committed")
    (bodies / "README").write_bytes(b"not ours: left alone")

    async def check(spool: SqliteSpool):
        return b"".join((await spool.read(qid)).chunks())

    assert run(tmp_path, check) == b"kept\r\n"
    assert sorted(os.listdir(bodies)) == sorted([qid, "README"])


# -- a spilling session answers exactly as one that keeps bodies in memory ---------------------

_PIECES = st.sampled_from([
    b"EHLO c.test\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n",
    b"RSET\r\n", b"NOOP\r\n", b"HELO x.test\r\n", b".\r\n", b"..dot\r\n", b"line\r\n",
    b"bare\n", b"cr\r", b"x" * 40, b"\r\n", b"BDAT 5\r\n", b"BDAT 0 LAST\r\n",
    b"BDAT 3 LAST\r\n", b"BDAT 70\r\n", b"QUIT\r\n",
])


def _run(stream: bytes, cuts: list[int], spill_at: int | None):
    sinks: list[MemorySink] = []

    def spill(txn):
        sinks.append(MemorySink())
        return sinks[-1]

    s = ServerSession(SessionSettings("mx.test", SessionLimits(message_size=300)),
                      lambda d, c: True, "192.0.2.7",
                      spill=None if spill_at is None else spill, spill_at=spill_at or 0)
    out, bodies = [], []
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in itertools.pairwise(points):
        event = s.receive(stream[a:b])
        while isinstance(event, Deliver):
            txn = event.transaction
            sink = txn.body_sink
            bodies.append(sink.data if sink is not None else txn.body)
            out.append(s.take_output())
            s.finish_delivery(b"250 queued\r\n", queued=True)
            event = s.step()
        out.append(s.take_output())
    s.connection_lost()  # the stream ends: a body still arriving (e.g. inside BDAT) goes
    return b"".join(out), bodies, sinks


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(_PIECES, max_size=30), cuts=st.lists(st.integers(0, 2000), max_size=10))
@example(pieces=[b"EHLO c.test\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n",
                 b"BDAT 70\r\n", b"EHLO c.test\r\n"], cuts=[])  # ends inside the chunk
def test_spilling_changes_no_reply_and_no_body(pieces, cuts):
    stream = b"".join(pieces)
    kept = _run(stream, cuts, None)
    spilled = _run(stream, cuts, 8)
    assert spilled[0] == kept[0] and spilled[1] == kept[1]
    # every sink is either delivered whole or dropped, never left open and forgotten
    for sink in spilled[2]:
        assert sink.aborted or sink.data in spilled[1]
