"""DATA decoding with a sink: the body handed out in chunks is the body decoded whole.

The property: for any input and any way it is split into reads, a `DataDecoder` with a sink
(and a tiny `spill_at`, so that it spills all the time) ends with the same body (sink chunks
+ what `feed` returns), leftover, size, `bare` and `oversize` as one without, while never
holding more than `spill_at` plus one read.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.smtp.protocol import DataDecoder, dot_stuff

# bytes rich in what matters here: CR, LF, dots, and plain text
_atoms = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"xyz", b"\r\n.", b"\r\n.\r"])
raw_streams = st.lists(_atoms, max_size=60).map(b"".join)


def decode(stream: bytes, cuts: list[int], *, sink: bool, spill_at: int = 5,
           max_size: int = 1 << 20):
    chunks: list[bytes] = []
    dec = DataDecoder(max_size, chunks.append if sink else None, spill_at=spill_at)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    peak = 0
    for a, b in itertools.pairwise(points):
        done = dec.feed(stream[a:b])
        peak = max(peak, len(dec._buf) - (b - a))  # held before this read
        if done is not None:
            body, leftover = done
            return (b"".join(chunks) + body, leftover + stream[b:], dec.size, dec.bare,
                    dec.oversize), peak, len(chunks)
    return None, peak, len(chunks)


@settings(max_examples=400, deadline=None)
@given(body=raw_streams, tail=raw_streams, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_any_stream_any_split_decodes_the_same_with_a_sink(body, tail, cuts):
    stream = body + b"\r\n.\r\n" + tail
    whole, _, _ = decode(stream, [], sink=False)
    streamed, peak, _ = decode(stream, cuts, sink=True)
    assert streamed == whole
    # between reads no more than spill_at (5) is held, besides a virtual CRLF
    assert peak <= 5 + 2


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=40),
    cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_a_stuffed_message_comes_out_as_it_went_in(lines, cuts):
    message = b"".join(line + b"\r\n" for line in lines)
    result, _, _ = decode(dot_stuff(message), cuts, sink=True)
    assert result is not None
    body, leftover, size, bare, oversize = result
    assert (body, leftover, bare, oversize) == (message, b"", False, False)


def test_memory_stays_bounded_for_a_large_body():
    wire_line = b".." + b"x" * 997 + b"\r\n"  # every line stuffed: ".xxx" in the body
    n_lines = 20_000  # 20 MB
    chunks: list[int] = []
    dec = DataDecoder(1 << 30, lambda c: chunks.append(len(c)), spill_at=64 * 1024)
    read = wire_line * 64  # 64 KB reads
    peak = 0
    for _ in range(n_lines // 64):
        assert dec.feed(read) is None
        peak = max(peak, len(dec._buf))
    body, leftover = dec.feed(b".\r\n")
    assert peak < 64 * 1024 + len(read) + 8
    assert sum(chunks) + len(body) == (n_lines // 64) * 64 * 1000
    assert len(chunks) > 100
    assert not dec.bare and not dec.oversize and leftover == b""


def test_oversize_with_a_sink_stops_spilling_and_stays_bounded():
    chunks: list[bytes] = []
    dec = DataDecoder(100_000, chunks.append, spill_at=10_000)
    read = b"y" * 998 + b"\r\n"
    peak = 0
    for _ in range(1000):  # 1 MB into a 100 KB limit
        dec.feed(read * 4)
        peak = max(peak, len(dec._buf))
    body, leftover = dec.feed(b".\r\nQUIT\r\n")
    assert dec.oversize and body == b"" and leftover == b"QUIT\r\n"
    assert sum(map(len, chunks)) <= 100_000 and peak <= 10_000 + 4 * 1000 + 8
    assert dec.size >= 1_000_000
