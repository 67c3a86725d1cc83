"""Whether the process that wrote a status file (``cluster-status.json``) still runs, as
``ferrymail queue list`` judges it, against real processes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from ferrymail.cli.queue import writer_gone


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_running_writer_is_not_gone():
    assert not writer_gone(os.getpid(), time.time())


def test_a_reaped_or_zombie_writer_is_gone():
    proc = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while _state(proc.pid) != "Z":  # exited, not reaped yet: still in the process table
        assert time.monotonic() < deadline, "true did not exit"
        time.sleep(0.01)
    assert writer_gone(proc.pid, time.time())
    proc.wait()
    assert writer_gone(proc.pid, time.time())


def test_a_pid_reused_by_a_later_process_is_gone():
    """After a reboot the spool still holds the file and its pid may name anything: a
    process started after the file was written is not its writer."""
    with subprocess.Popen(["sleep", "30"]) as proc:
        try:
            assert not writer_gone(proc.pid, time.time())
            assert writer_gone(proc.pid, time.time() - 3600)
        finally:
            proc.kill()
