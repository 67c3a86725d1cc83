"""Queue ids of spool shards (one per worker) and the shard layout, without processes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferrymail.observe import log
from ferrymail.spool.base import QueueIdGenerator
from ferrymail.supervisor import choose_workers, shard_path, shard_paths, unserved_shards


@given(shards=st.integers(1, 16), data=st.data())
def test_shard_ids_are_unique_across_shards_and_grow(shards: int, data: st.DataObject) -> None:
    gens = [QueueIdGenerator(k, shards) for k in range(shards)]
    seeds = data.draw(st.lists(st.integers(0, 2**62), min_size=shards, max_size=shards))
    for gen, seed in zip(gens, seeds, strict=True):
        gen.seed(seed)
    seen: set[int] = set()
    for k, gen in enumerate(gens):
        last = seeds[k]
        for _ in range(data.draw(st.integers(1, 50))):
            value = gen.next_int()
            assert value % shards == k
            assert value > last
            last = value
            assert value not in seen
            seen.add(value)


def test_shard_must_be_in_range() -> None:
    with pytest.raises(ValueError, match=r"shard 2 is not in 0\.\.1"):
        QueueIdGenerator(2, 2)


def test_shard_layout(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    assert shard_path(root, 0) == root
    assert shard_path(root, 3) == root / "shard-3"
    assert shard_paths(root) == []
    for k in (0, 10, 2):
        shard_path(root, k).mkdir(parents=True)
    (root / "shard-x").mkdir()
    (root / "shard-5").write_text("not a directory")
    assert shard_paths(root) == [root, root / "shard-2", root / "shard-10"]


def test_worker_count_choice() -> None:
    assert choose_workers(3, 2, 8) == (3, "--workers")
    assert choose_workers(None, 2, 8) == (2, "environment.workers")
    count, why = choose_workers(None, None, 8)
    assert count == 8 and "CPUs" in why and "(8)" in why


def test_log_context_ends_every_line() -> None:
    out = io.StringIO()
    log.configure("info", out)
    try:
        log.set_context(worker=3)
        log.log_event("a.b", x="1 2")
        log.log_formatted("c.d", "info", "y=2")
        log.set_context()
        log.log_event("e.f")
    finally:
        log.set_context()
        log.configure("info", None)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(' event=a.b x="1 2" worker=3')
    assert lines[1].endswith(" event=c.d y=2 worker=3")
    assert lines[2].endswith(" event=e.f")


def test_unserved_shards_are_those_of_a_larger_worker_count(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    for k in (0, 1, 2, 3):
        shard_path(root, k).mkdir(parents=True)
    for k in (0, 1, 3):
        (shard_path(root, k) / "spool.db").write_bytes(b"")
    assert unserved_shards(root, 4) == []
    assert unserved_shards(root, 2) == [root / "shard-3"]  # shard-2 holds no spool
    assert unserved_shards(root, 1) == [root / "shard-1", root / "shard-3"]
    # a shard another run's worker holds (its spool lock) is served, just not by us: a run
    # about to be refused for the spool in use warned of it as unserved
    import fcntl
    import os

    fd = os.open(root / "shard-1", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert unserved_shards(root, 1) == [root / "shard-3"]
    finally:
        os.close(fd)
    assert unserved_shards(root, 1) == [root / "shard-1", root / "shard-3"]


def test_each_worker_is_a_cluster_member_of_its_own(tmp_path: Path) -> None:
    from ferrymail.app import make_limiter
    from ferrymail.config.loader import parse_startup
    from ferrymail.supervisor import WorkerSlot

    text = (f"spool: {{path: {tmp_path / 'spool'}}}\n"
            "cluster: {redis: 'redis://127.0.0.1:1', instance: mx1}\n")
    startup = parse_startup(text, "startup.yaml")
    single = make_limiter(startup)
    slot = WorkerSlot(1, 2, shard_path(tmp_path / "spool", 1), {})
    worker = make_limiter(startup, slot)
    assert single.cluster.instance == "mx1"  # type: ignore[attr-defined]
    assert worker.cluster.instance == "mx1/w1"  # type: ignore[attr-defined]


def test_inbound_limits_are_shared_out_with_ceil(tmp_path: Path) -> None:
    """N workers: each takes ⌈limit / N⌉ of limits.connections and connections_per_client
    (0, unlimited, stays 0), so the host never accepts N times the configured number."""
    from ferrymail.config import load_startup
    from ferrymail.supervisor import share_inbound_limits

    f = tmp_path / "startup.yaml"
    f.write_text(f"""
environment: {{pidfile: {tmp_path}/p.pid}}
spool: {{path: {tmp_path}/spool}}
servers:
  - id: a
    listeners: [{{port: 2525}}]
    limits: {{connections: 1001, connections_per_client: 0}}
  - id: b
    listeners: [{{port: 2526}}]
""")
    startup = load_startup(str(f))
    assert share_inbound_limits(startup, 1) is startup
    three = share_inbound_limits(startup, 3)
    a, b = three.servers
    assert (a.limits.connections, a.limits.connections_per_client) == (334, 0)
    assert (b.limits.connections, b.limits.connections_per_client) == (334, 17)  # 1000, 50
    assert startup.servers[0].limits.connections == 1001  # the original is untouched
