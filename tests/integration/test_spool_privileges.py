"""Spool modes (0700 directory, 0600 files) and `environment.user`: bind as root, then drop.

The privilege test runs a real `ferrymail run` as root with `user: nobody` on a privileged
port. Its files live in a directory of its own under /tmp (pytest's tmp_path is 0700 root,
which `nobody` could not enter).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import smtplib
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ferrymail.config import ConfigError, load_startup
from ferrymail.spool import Envelope, SqliteSpool
from tests.integration.conftest import listener, running_yaml, server, spool_count, startup_yaml

ENV = Envelope(sender="a@example.org", recipients=("b@example.com",), client_ip="127.0.0.1",
               client_port=1, helo="c.example.org", server_id="in")
SPOOL_FILES = ("spool.db", "spool.db-wal", "spool.db-shm", "reserve")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_spool_is_for_its_owner_only_whatever_the_umask(tmp_path):
    spool_dir = tmp_path / "var" / "spool"

    async def main():
        async with SqliteSpool(spool_dir, min_free=64 * 1024) as spool:
            await spool.store(ENV, b"Subject: secret\r\n\r\nbody\r\n")
            # while open: the WAL and shared-memory files exist, created by SQLite itself
            return {name: mode(spool_dir / name) for name in SPOOL_FILES}

    with umask(0o000):  # the widest: every mode below is the spool's own doing
        modes = asyncio.run(main())
    assert mode(spool_dir) == 0o700
    assert modes == dict.fromkeys(SPOOL_FILES, 0o600)


def test_modes_left_wide_by_an_older_version_are_narrowed(tmp_path):
    spool_dir = tmp_path / "spool"

    async def store():
        async with SqliteSpool(spool_dir, min_free=64 * 1024) as spool:
            await spool.store(ENV, b"x\r\n")

    asyncio.run(store())
    os.chmod(spool_dir, 0o755)
    for name in ("spool.db", "reserve"):
        os.chmod(spool_dir / name, 0o644)
    asyncio.run(store())
    assert mode(spool_dir) == 0o700
    assert mode(spool_dir / "spool.db") == mode(spool_dir / "reserve") == 0o600


# -- configuration ----------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "startup.yaml"
    path.write_text(text)
    return path


def test_user_and_group_are_checked_at_load(tmp_path):
    cfg = load_startup(write(tmp_path, "environment:\n  user: nobody\n  group: '65534'\n"))
    assert (cfg.environment.user, cfg.environment.group) == ("nobody", "65534")
    assert load_startup(write(tmp_path, "spool: {path: ./s}\n")).environment.user is None


@pytest.mark.parametrize(("text", "line", "key", "words"), [
    ("environment:\n  user: no-such-user-here\n", 2, "environment.user", "no such user"),
    ("environment:\n  user: nobody\n  group: no-such-group\n", 3, "environment.group",
     "no such group"),
    ("environment:\n  pidfile: ./p\n  group: nogroup\n", 3, "environment.group",
     "needs environment.user"),
    ("environment:\n  user: ''\n", 2, "environment.user", "non-empty"),
])
def test_bad_user_or_group_names_file_line_and_key(tmp_path, text, line, key, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_startup(path)
    errs = exc.value.errors
    assert len(errs) == 1, str(exc.value)
    assert (errs[0].file, errs[0].line, errs[0].path) == (str(path), line, key)
    assert words in errs[0].message


# -- dropping privileges ----------------------------------------------------------------------


def privileged_port(host: str = "127.0.0.1") -> int:
    """A free port below 1024 (only root may bind it): proof the bind came before the drop."""
    for port in random.sample(range(600, 1024), 100):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def proc_ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid (real, effective, saved, fs) and Groups of a process, from /proc."""
    ids = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            ids[key] = [int(v) for v in value.split()]
    return ids


@pytest.fixture
def world_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ferrymail-priv-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_bind_as_root_then_run_as_nobody(world_dir, ferrymail_proc):
    if os.geteuid() != 0:
        pytest.skip("needs root (to bind a port below 1024 and switch users)")
    port = privileged_port()
    spool_dir = world_dir / "spool"

    async def as_root():  # a spool from days when ferrymail ran as root, with a large body
        async with SqliteSpool(spool_dir, min_free=64 * 1024) as spool:
            body = spool.open_body()
            body.write(b"Subject: old\r\n\r\n" + b"x" * 300_000 + b"\r\n")
            await spool.store(ENV, body)

    asyncio.run(as_root())
    assert spool_dir.stat().st_uid == 0
    doc = yaml.safe_load(startup_yaml(world_dir, [server("in", [listener(port)])]))
    doc["environment"]["user"] = "nobody"
    doc["spool"]["min_free"] = "1MiB"
    proc = ferrymail_proc(yaml.safe_dump(doc), running_yaml(["in"]),
                          wait=[("127.0.0.1", port)], workdir=world_dir)
    dropped = proc.wait_log(r"event=app\.privileges_dropped ")[0]
    assert "user=nobody uid=65534" in dropped
    # the order: listening as root, then the drop, then the spool and the rest
    events = [line.split(" event=")[1].split(" ")[0] for line in proc.logs()]
    assert events.index("smtp.listening") < events.index("app.privileges_dropped") \
        < events.index("app.started")
    ids = proc_ids(proc.pid)
    assert ids["Uid"] == [65534] * 4 and ids["Gid"] == [65534] * 4, ids
    assert ids["Groups"] in ([65534], []), ids
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        refused = client.sendmail("a@example.org", ["b@example.com"], b"Subject: t\r\n\r\nhi\r\n")
        assert refused == {}
        large = b"Subject: large\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1000  # a body file
        assert client.sendmail("a@example.org", ["b@example.com"], large) == {}
    st = spool_dir.stat()
    assert (st.st_uid, st.st_gid, mode(spool_dir)) == (65534, 65534, 0o700)
    for name in SPOOL_FILES:
        st = (spool_dir / name).stat()
        assert (name, st.st_uid, stat.S_IMODE(st.st_mode)) == (name, 65534, 0o600)
    bodies = spool_dir / "bodies"
    assert (bodies.stat().st_uid, mode(bodies)) == (65534, 0o700)
    files = list(bodies.iterdir())
    assert len(files) == 2  # the one from before and the one just received
    assert {(f.stat().st_uid, mode(f)) for f in files} == {(65534, 0o600)}
    assert proc.stop() == 0
    assert spool_count(spool_dir) == 3
