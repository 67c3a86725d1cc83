"""``metrics.worker_timeout`` / ``metrics.worker_listen`` (config/operations.py) and how
worker 0 reaches the other workers (observe/hostmetrics.py: worker_peers)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ferrymail.config import ConfigError, load_startup
from ferrymail.observe.hostmetrics import WorkerPeer, worker_peers


def _load(tmp_path: Path, text: str):
    path = tmp_path / "startup.yaml"
    path.write_text(textwrap.dedent(text))
    return path, load_startup(path)


def test_defaults_and_durations(tmp_path: Path):
    _, cfg = _load(tmp_path, "metrics: {listen: '127.0.0.1:9725'}\n")
    assert cfg.metrics.worker_timeout == 2.0 and cfg.metrics.worker_listen is False
    _, cfg = _load(tmp_path, "metrics: {worker_timeout: 250ms, worker_listen: true}\n")
    assert cfg.metrics.worker_timeout == 0.25 and cfg.metrics.worker_listen is True


@pytest.mark.parametrize(("value", "message"), [
    ("45s", "expected more than 0 and at most 30 seconds (a scrape waits for it), got 45"),
    ("0", "expected more than 0 and at most 30 seconds (a scrape waits for it), got 0"),
    ("soon", "expected a duration"),
])
def test_bad_worker_timeout_names_file_line_and_key(tmp_path: Path, value: str, message: str):
    text = f"""\
    metrics:
      listen: "127.0.0.1:9725"
      worker_timeout: {value}
    """
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, text)
    (err,) = exc.value.errors
    assert (err.file, err.line, err.path) == (str(tmp_path / "startup.yaml"), 3,
                                              "metrics.worker_timeout")
    assert err.message.startswith(message), err.message


def test_worker_peers_follow_per_worker_admin_endpoints(tmp_path: Path):
    _, cfg = _load(tmp_path, f"environment: {{pidfile: {tmp_path}/var/fm.pid}}\n")
    assert worker_peers(cfg, 3) == [WorkerPeer(1, socket_path=f"{tmp_path}/var/fm.w1.sock"),
                                    WorkerPeer(2, socket_path=f"{tmp_path}/var/fm.w2.sock")]
    assert worker_peers(cfg, 1) == []
    _, cfg = _load(tmp_path, """\
    admin: {socket: false, listen: "127.0.0.1:8800", token: "0123456789abcdef"}
    """)
    assert worker_peers(cfg, 2) == [WorkerPeer(1, tcp=("127.0.0.1", 8801),
                                               token="0123456789abcdef")]
    _, cfg = _load(tmp_path, "admin: {socket: false}\n")
    (peer,) = worker_peers(cfg, 2)
    assert peer.describe() == "no admin API"


def test_a_worker_without_admin_api_is_reported_not_answering():
    import asyncio

    from ferrymail.observe.hostmetrics import WorkerUnanswered, fetch

    with pytest.raises(WorkerUnanswered, match="no admin API"):
        asyncio.run(fetch(WorkerPeer(1), "/v1/metrics", 1.0))
    with pytest.raises(WorkerUnanswered):
        asyncio.run(fetch(WorkerPeer(1, socket_path="/nonexistent/fm.w1.sock"),
                          "/v1/metrics", 1.0))
