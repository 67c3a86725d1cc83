"""Log formats (logfmt read back for JSON lines) and sd_notify over a real datagram socket."""

from __future__ import annotations

import io
import json
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferrymail import sdnotify
from ferrymail.observe import log


@given(st.text(), st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=10))
def test_logfmt_values_read_back_exactly(value: str, key: str):
    line = f"{key}={log.quote(value)} next=1"
    assert log.parse_logfmt(line) == {key: value, "next": "1"}


def test_json_format_for_both_write_paths():
    out = io.StringIO()
    log.configure("info", out, format="json")
    try:
        log.log_event("a.b", size=3, text='say "hi"\n', none=None)
        log.log_formatted("c.d", "warning", f"client={log.quote('1.2.3.4:5')} "
                                            f"reply={log.quote('250 2.0.0 OK')}")
    finally:
        log.configure("info")
    first, second = (json.loads(x) for x in out.getvalue().splitlines())
    assert first["event"] == "a.b" and first["size"] == 3 and first["text"] == 'say "hi"\n'
    assert "none" not in first and first["level"] == "info" and first["ts"].endswith("Z")
    assert second == {"ts": second["ts"], "level": "warning", "event": "c.d",
                      "client": "1.2.3.4:5", "reply": "250 2.0.0 OK"}


def test_bad_log_settings_are_refused(tmp_path):
    with pytest.raises(ValueError):
        log.configure("info", format="xml")
    with pytest.raises(ValueError):
        log.configure("info", destination="file")
    with pytest.raises(OSError):
        log.configure("info", destination="file", file=str(tmp_path / "no" / "such" / "x.log"))
    log.configure("info")


def test_sd_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch):
    name = f"ferrymail-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        assert sdnotify.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)  # nobody listens any more: no exception
    assert sdnotify.reloading() is False
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.ready() is False


def test_top_frame_rates_and_proxy_health():
    from rich.console import Console

    from ferrymail.observe.top import render

    row = {"transport": "t", "source": "a1", "proxy": "127.0.0.1:9", "delivered": 7,
           "deferred": 1, "failed": 0, "deleted": 0}
    now = {"time": 12.0, "received": 9, "delivered": 7, "deferred": 1, "failed": 0,
           "deleted": 0, "by_source": [row], "queue": {"deferred": 1}, "queue_at": 11.0,
           "proxies": [{"proxy": "127.0.0.1:9", "up": False}], "connections_in": 2,
           "connections_out": 1,
           "errors": [{"at": 11.5, "transport": "t", "kind": "proxy", "error": "refused"}]}
    before = dict(now, time=10.0, received=5, delivered=3, by_source=[dict(row, delivered=3)])
    summary = [{"transport": "t", "domain": "d.test", "source": "a1", "recipients": 1,
                "oldest_s": 42.0, "why": ["proxy down (127.0.0.1:9)"]}]
    console = Console(width=140, record=True)
    console.print(render(now, before, summary))
    text = console.export_text()
    assert "in 2.0/s" in text and "delivered 2.0/s" in text  # (9-5)/2 and (7-3)/2
    assert "127.0.0.1:9 down" in text and "proxy down (127.0.0.1:9)" in text
    assert "refused" in text and "conns in 2 out 1" in text
