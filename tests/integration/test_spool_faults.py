"""The spool under faults: full disk, file size limit, unusable directories, SIGKILL mid-store.

The rule under test: a store either raises `SpoolError` or returns a queue id, and every id
returned is there after a restart; once space returns the same spool stores again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferrymail.spool import Envelope, RecipientState, RecipientUpdate, SpoolError, SqliteSpool

DELIVERED = RecipientState.DELIVERED

ENV = Envelope(
    sender="from@example.org",
    recipients=("to@example.net",),
    client_ip="192.0.2.1",
    client_port=2525,
    helo="client.example.org",
    server_id="srv",
    received_at=1000.0,
)


def payload(i: int, size: int = 8000) -> bytes:
    head = b"message %d\r\n" % i
    return head + os.urandom(size // 2).hex().encode()[: size - len(head)]


# -- tmpfs helpers ------------------------------------------------------------------------------


def _mount_works(where: Path) -> bool:
    if os.geteuid() != 0:
        return False
    probe = where / "mount-probe"
    probe.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True
        )
        if done.returncode != 0:
            return False
        subprocess.run(["umount", str(probe)], check=True)
        return True
    finally:
        probe.rmdir()


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *, readonly: bool = False) -> Iterator[Path]:
    """A fresh tmpfs of `size` mounted on `where` (root and a working mount(8) needed)."""
    if not _mount_works(where.parent):
        pytest.skip("needs root and a working `mount -t tmpfs` (the RLIMIT_FSIZE test still runs)")
    where.mkdir()
    options = f"size={size}" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def fill(spool: SqliteSpool, wave: int = 4, limit: int = 5000) -> tuple[list[str], list]:
    """Store waves of concurrent 8 KB messages until stores fail; (ids stored, failures)."""
    stored: list[str] = []
    for n in range(0, limit, wave):
        results = await asyncio.gather(
            *(spool.store(ENV, payload(n + i)) for i in range(wave)), return_exceptions=True
        )
        stored += [r for r in results if isinstance(r, str)]
        failures = [r for r in results if not isinstance(r, str)]
        if failures:
            return stored, failures
    raise AssertionError(f"{limit} stores and the disk is still not full")


async def readable(path: Path, ids: list[str]) -> None:
    async with SqliteSpool(path, min_free=0) as spool:
        assert await spool.count() >= len(ids)
        for qid in ids:
            data = await spool.read(qid)
            assert data.startswith(b"message ")
            assert (await spool.get(qid)).envelope == ENV


# -- full disk ----------------------------------------------------------------------------------


def test_full_tmpfs_stores_refused_before_full_and_deletes_go_through(tmp_path):
    """Stores are refused (cleanly, naming the spool) before the file system is full, and
    deletions still go through. Whether the space they free is visible to the next store
    depends on the WAL being checkpointed and truncated, which the checkpointer does in the
    background: a store is tried again for a while, and if it is still refused the refusal
    must be the clean one, with nothing lost."""
    with tmpfs(tmp_path / "mnt", "1m") as mnt:

        async def main():
            async with SqliteSpool(mnt, min_free=256 * 1024) as spool:
                stored, failures = await fill(spool)
                assert stored, "nothing could be stored at all"
                for exc in failures:
                    assert isinstance(exc, SpoolError), exc
                    assert "not enough disk space" in str(exc) and str(mnt) in str(exc)
                # space kept free lets delivery results and deletions through
                for qid in stored[:40]:  # (16 KiB pages: their WAL frames take space too)
                    await spool.delete(qid)
                assert await spool.count() == max(0, len(stored) - 40)
                deadline = time.monotonic() + 5
                again: list[str] = []
                while not again and time.monotonic() < deadline:
                    try:
                        again.append(await spool.store(ENV, payload(-1)))
                    except SpoolError as exc:
                        assert "not enough disk space" in str(exc), exc
                        await asyncio.sleep(0.1)
            return [*stored[40:], *again]

        kept = asyncio.run(main())
        asyncio.run(readable(mnt, kept))


def test_full_tmpfs_sqlite_full_fails_the_batch_and_the_spool_recovers(tmp_path):
    with tmpfs(tmp_path / "mnt", "1m") as mnt:

        async def main():
            async with SqliteSpool(mnt, min_free=0) as spool:
                stored, failures = await fill(spool)
                for exc in failures:
                    assert isinstance(exc, SpoolError), exc
                    assert str(mnt / "spool.db") in str(exc) and "SQLITE_FULL" in str(exc)
                # A wave of four failed; single stores may still fit in what is left (in
                # partly used pages): the first one that does not must fail cleanly.
                for i in range(100):
                    commits = spool.commits
                    try:
                        stored.append(await spool.store(ENV, payload(-100 - i)))
                    except SpoolError as exc:
                        assert "SQLITE_FULL" in str(exc), exc
                        break
                else:
                    raise AssertionError("the full disk takes more and more messages")
                assert spool.commits == commits  # the failed transaction was rolled back
                # the operator gives space back: the same spool stores again
                subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
                later = [await spool.store(ENV, payload(-2 - i)) for i in range(5)]
                assert await spool.count() == len(stored) + 5
            return stored + later

        acked = asyncio.run(main())
        asyncio.run(readable(mnt, acked))


def test_results_in_a_batch_that_fails_for_lack_of_space_are_still_written(tmp_path):
    """A store too big for the space left fails; delivery results in its batch do not."""
    with tmpfs(tmp_path / "mnt", "2m") as mnt:

        async def main():
            async with SqliteSpool(mnt, min_free=0) as spool:
                done, bounced, kept = [await spool.store(ENV, payload(i)) for i in range(3)]
                st = os.statvfs(mnt)
                # someone else fills the disk up to ~400 KB: too little for the 600 KB message,
                # enough for the delivery result (a few 16 KiB pages in the WAL)
                filler = mnt / "filler"
                filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 400 * 1024))
                # hold the write lock so that the three operations below queue up behind
                # `primer` and make one batch
                blocker = sqlite3.connect(mnt / "spool.db", isolation_level=None)
                blocker.execute("BEGIN IMMEDIATE")
                primer = asyncio.ensure_future(spool.delete(bounced))
                await asyncio.sleep(0.2)
                ops = asyncio.gather(
                    spool.store(ENV, payload(99, size=600_000)),
                    spool.update(done, [RecipientUpdate("to@example.net", DELIVERED, 1, 0, "")]),
                    spool.store(ENV, payload(98)),
                    return_exceptions=True,
                )
                await asyncio.sleep(0.1)
                blocker.execute("ROLLBACK")
                blocker.close()
                await primer
                big, update, small = await ops
                assert isinstance(big, SpoolError) and "SQLITE_FULL" in str(big), big
                assert isinstance(small, SpoolError), "a store in the failed batch was kept"
                assert update is None
                assert await spool.get(done) is None
                assert [m.queue_id for m in await spool.list()] == [kept]
                filler.unlink()
                return [kept, await spool.store(ENV, payload(97))]

        acked = asyncio.run(main())
        asyncio.run(readable(mnt, acked))


_FSIZE_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, resource, signal, sys
    sys.path[:0] = sys.argv[3:]
    from ferrymail.spool import Envelope, SpoolError, SqliteSpool

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death at the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    env = Envelope("from@example.org", ("to@example.net",), "192.0.2.1", 2525,
                   "client.example.org", "srv", received_at=1000.0)

    def payload(i):
        head = b"message %d\\r\\n" % i
        return head + os.urandom(4000).hex().encode()[: 8000 - len(head)]

    async def main():
        spool = SqliteSpool(sys.argv[1], min_free=0)
        await spool.start()
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), hard))
        for i in range(5000):
            try:
                qid = await spool.store(env, payload(i))
            except SpoolError as exc:
                print("ERR", exc, flush=True)
                break
            print("ID", qid, flush=True)
        else:
            print("NEVER FULL", flush=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space returns
        print("AFTER", await spool.store(env, payload(-1)), flush=True)
        await spool.close()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("limit", [600_000, 3_000_000])
def test_file_size_limit_in_a_subprocess(tmp_path, limit):
    spool_dir = tmp_path / "spool"
    src = str(Path(__file__).resolve().parents[2] / "src")
    done = subprocess.run(
        [sys.executable, "-c", _FSIZE_SCRIPT, str(spool_dir), str(limit), src],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    ids = [line.split()[1] for line in lines if line.startswith("ID ")]
    errors = [line for line in lines if line.startswith("ERR ")]
    after = [line.split()[1] for line in lines if line.startswith("AFTER ")]
    assert ids and len(errors) == 1 and len(after) == 1, done.stdout[-2000:]
    assert str(spool_dir / "spool.db") in errors[0] and "SQLITE_" in errors[0]
    asyncio.run(readable(spool_dir, ids + after))


# -- unusable places ----------------------------------------------------------------------------


def start_fails(path: Path, *fragments: str) -> None:
    """start() raises SpoolError with each of `fragments` in its message; the spool stays shut."""

    async def main():
        spool = SqliteSpool(path)
        with pytest.raises(SpoolError) as info:
            await spool.start()
        for fragment in fragments:
            assert fragment in str(info.value)
        with pytest.raises(SpoolError, match="not open"):
            await spool.store(ENV, b"x")

    asyncio.run(main())


def test_path_that_is_a_file(tmp_path):
    target = tmp_path / "spool"
    target.write_text("not a directory")
    start_fails(target, f"spool path {target} exists and is not a directory")
    start_fails(target / "sub", f"cannot create spool directory {target / 'sub'}")


def test_directory_not_writable(tmp_path):
    if os.geteuid() == 0:
        # root writes through permission bits: use a read-only file system instead
        with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
            start_fails(ro, f"spool directory {ro} is not writable")
            start_fails(ro / "spool", f"cannot create spool directory {ro / 'spool'}")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            start_fails(locked, f"spool directory {locked} is not writable")
        finally:
            locked.chmod(0o700)


def test_existing_spool_on_a_read_only_file_system(tmp_path):
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        asyncio.run(_store_one(mnt))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        start_fails(mnt, "not writable")


async def _store_one(path: Path) -> str:
    async with SqliteSpool(path, min_free=0) as spool:
        return await spool.store(ENV, payload(0))


def test_database_file_that_is_not_a_spool(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "spool.db").write_bytes(b"this is not an SQLite database" * 200)
    start_fails(garbage, f"cannot open spool database {garbage / 'spool.db'}", "not a database")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    conn = sqlite3.connect(foreign / "spool.db")
    conn.execute("CREATE TABLE mine (x)")
    conn.commit()
    conn.close()
    start_fails(foreign, "is not a ferrymail spool database")

    newer = tmp_path / "newer"
    asyncio.run(_store_one(newer))
    conn = sqlite3.connect(newer / "spool.db")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    start_fails(newer, "schema version 99, newer")

    odd = tmp_path / "odd"
    (odd / "spool.db").mkdir(parents=True)
    start_fails(odd, "exists and is not a file")


# -- crash safety -------------------------------------------------------------------------------

_CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    sys.path[:0] = sys.argv[2:]
    from ferrymail.spool import Envelope, SqliteSpool

    env = Envelope("from@example.org", ("to@example.net", "other@example.net"), "192.0.2.1",
                   2525, "client.example.org", "srv", received_at=1000.0)

    async def worker(spool, w):
        for i in range(100_000):
            tag = f"{w}-{i}"
            qid = await spool.store(env, f"message {tag}\\r\\n".encode() * 50)
            sys.stdout.write(f"{qid} {tag}\\n")
            sys.stdout.flush()

    async def main():
        spool = SqliteSpool(sys.argv[1])
        await spool.start()
        print("READY", flush=True)
        await asyncio.gather(*(worker(spool, w) for w in range(8)))

    asyncio.run(main())
    """
)


def _store_until_killed(spool_dir: Path, round_: int, acked: dict[str, str]) -> None:
    """Run the storing script, SIGKILL it once ~500 stores were acknowledged."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    script = _CRASH_SCRIPT.replace("{w}-{i}", f"{round_}.{{w}}-{{i}}")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(spool_dir), src],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    before = len(acked)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first == "READY", proc.stderr.read() if proc.stderr else first
        deadline = time.monotonic() + 20
        while len(acked) - before < 500 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            qid, tag = line.split()
            acked[qid] = tag
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, errors = proc.communicate(timeout=10)
    for line in rest.splitlines():  # acknowledged before the kill, still in the pipe
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 16:
            acked[parts[0]] = parts[1]
    assert proc.returncode == -signal.SIGKILL, errors
    assert len(acked) - before >= 100, f"the storing process did not get going: {errors}"


def test_sigkill_while_storing_loses_no_acknowledged_message(tmp_path):
    spool_dir = tmp_path / "spool"
    acked: dict[str, str] = {}
    # Several rounds: each kill lands at another point of the commit cycle, and each restart
    # finds the previous rounds' messages.
    for round_ in range(3):
        _store_until_killed(spool_dir, round_, acked)

    async def check():
        async with SqliteSpool(spool_dir) as spool:
            assert await spool.count() >= len(acked)
            for qid, tag in acked.items():
                assert await spool.read(qid) == f"message {tag}\r\n".encode() * 50, qid
                msg = await spool.get(qid)
                assert [r.address for r in msg.recipients] == list(msg.envelope.recipients)

    asyncio.run(check())
