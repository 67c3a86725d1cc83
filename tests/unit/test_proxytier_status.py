"""`proxy status` rows: every configured proxy and pair, entries as known, probing shown."""

from __future__ import annotations

from ferrymail.config import parse_running
from ferrymail.delivery.health import HealthEntry
from ferrymail.proxytier.status import status_rows, status_table

RUNNING = """
addresses:
  - {id: a1, address: 127.0.0.21, proxyprotocol: {server: 127.0.0.11, port: 2525}}
  - {id: b1, address: 127.0.0.31, proxyprotocol: {server: 127.0.0.12, port: 2525}}
transportgroups:
  - id: g
    connection: {sourceip: {ipv4: [a1, b1]}}
    transports: [{id: t}]
"""


def test_rows_cover_the_config_and_show_probing() -> None:
    running = parse_running(RUNNING)
    entries = [
        HealthEntry("127.0.0.12:2525", None, "suspended", "connect", "refused", 100.0, 130.0,
                    100.0, 30.0, "mta1:1:ab"),
        HealthEntry("127.0.0.11:2525", "127.0.0.21", "suspended", "bind", "EOF", 100.0, 200.0,
                    100.0, 100.0, "mta2:2:cd"),
        HealthEntry("127.0.0.99:2525", None, "up", since=50.0, origin="old:1:ef"),
    ]
    rows = status_rows(running, entries, now=150.0)
    assert [(r.proxy, r.source, r.state) for r in rows] == [
        ("127.0.0.11:2525", None, "up"),
        ("127.0.0.11:2525", "127.0.0.21", "suspended"),
        ("127.0.0.12:2525", None, "probing"),  # its suspension ran out at 130
        ("127.0.0.12:2525", "127.0.0.31", "up"),
        ("127.0.0.99:2525", None, "up"),  # known to the cluster, no longer configured
    ]
    text = status_table(rows, now=150.0)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["PROXY", "SOURCE", "STATE"]
    assert "1970-01-01T00:03:20Z (in 50s)" in lines[2] and lines[2].endswith("EOF")
    assert "mta1:1:ab" in lines[3] and "(50s ago)" in lines[3]
    col = lines[0].index("STATE")  # aligned: every state starts under its header
    assert [line[col:].split()[0] for line in lines[1:]] == [
        "up", "suspended", "probing", "up", "up"]
