"""Hop counting and own-listener matching (issue 7 item 15), sans-IO."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ferrymail.delivery.loops import (
    OwnListeners,
    hop_limit_error,
    is_local_address,
    received_count,
)


def test_received_count_headers_only_case_insensitive_unfolded():
    msg = (b"Received: from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           b"RECEIVED: from c\r\nX-Received: no\r\nSubject: Received: no\r\n\r\n"
           b"Received: in the body does not count\r\n")
    assert received_count(msg) == 2
    assert received_count(b"\r\nReceived: body only\r\n") == 0
    assert received_count(b"Received: x\nReceived: y\n\nReceived: z\n") == 2


def test_hop_limit_error_at_the_limit():
    msg = b"Received: x\r\n" * 50 + b"\r\nbody\r\n"
    assert hop_limit_error(msg, 51) is None
    err = hop_limit_error(msg, 50)
    assert err is not None and "50 hops" in err and "hop_limit 50" in err


@given(st.integers(min_value=0, max_value=80), st.binary(max_size=200))
def test_count_matches_the_number_of_trace_fields(n, body):
    msg = b"Subject: s\r\n" + b"Received: from h by h\r\n" * n + b"\r\n" + body
    assert received_count(msg) == n


def test_own_listeners():
    own = OwnListeners.of([("127.0.0.1", 25), (None, 2525), ("::", 587)])
    assert own.match("127.0.0.1", 25) == "127.0.0.1:25"
    assert own.match("127.0.0.2", 25) is None
    assert own.match("127.0.0.2", 2525) == "*:2525"
    assert own.match("::1", 587) == "*:587"
    assert own.match("192.0.2.1", 2525) is None  # TEST-NET: not an address of this host
    assert own.match("127.0.0.1", 26) is None


def test_is_local_address():
    assert is_local_address("127.0.0.1") and is_local_address("::1")
    assert not is_local_address("192.0.2.55") and not is_local_address("not an ip")


def _header_block_reference(data: bytes) -> bytes:
    if data.startswith((b"\r\n", b"\n")):
        return b""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    return data[: min(ends)] if ends else data


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"\r\n\r\n", b"\n\n", b"b:c"]),
                max_size=30).map(b"".join))
def test_header_block_agrees_with_searching_the_whole_message(data: bytes) -> None:
    from ferrymail.delivery.loops import header_block

    assert header_block(data) == _header_block_reference(data)
