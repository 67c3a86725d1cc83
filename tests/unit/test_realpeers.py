"""The test helpers' own promises (`tests/realpeers.py`)."""

from __future__ import annotations

import socket

from tests.realpeers import free_port


def test_free_port_never_hands_out_a_port_twice():
    """A bind to port 0 lands at a random offset in about 14,000 odd ports, so 3,000 calls
    used to repeat a port hundreds of times; one repeat inside a test put two peers on one
    port (Redis answering the metrics scrape, a sink on ferrymail's listener)."""
    ports = [free_port() for _ in range(3000)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:  # and each is bindable
        s.bind(("127.0.0.1", ports[-1]))
