"""observe/log.py batching: one write per event-loop iteration, nothing lost or reordered."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading

import uvloop

from ferrymail.observe import log


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def events(out: CountingStream) -> list[str]:
    return [log.parse_logfmt(line)["event"] for line in out.getvalue().splitlines()]


def batched(body) -> CountingStream:
    out = CountingStream()
    log.configure("info", out)
    log.batch_per_iteration()
    try:
        uvloop.run(body(out))
    finally:
        log.batch_per_iteration(False)
        log.configure("info")
    return out


def test_lines_of_one_iteration_are_one_write_at_its_end():
    async def body(out: CountingStream) -> None:
        for i in range(5):
            log.log_event(f"e{i}")
        assert out.getvalue() == ""  # still in this iteration
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert events(out) == [f"e{i}" for i in range(5)] and out.writes == 1
        log.log_event("later", level="warning")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert events(out)[-1] == "later" and out.writes == 2

    batched(body)


def test_a_full_buffer_is_written_at_once():
    async def body(out: CountingStream) -> None:
        for i in range(log.BATCH_MAX_LINES + 3):
            log.log_event("x", n=i)
        assert out.writes == 1 and len(events(out)) == log.BATCH_MAX_LINES
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(events(out)) == log.BATCH_MAX_LINES + 3
        numbers = [int(log.parse_logfmt(x)["n"]) for x in out.getvalue().splitlines()]
        assert numbers == list(range(log.BATCH_MAX_LINES + 3))

    batched(body)


def test_other_threads_and_code_outside_a_loop_write_at_once():
    async def body(out: CountingStream) -> None:
        log.log_event("loop")
        t = threading.Thread(target=log.log_event, args=("thread",))
        t.start()
        t.join()
        assert events(out) == ["thread"]  # the loop's line waits for the iteration's end
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert events(out) == ["thread", "loop"]

    out = batched(body)
    log.configure("info", out)
    try:
        log.log_event("no-loop")
    finally:
        log.configure("info")
    assert events(out)[-1] == "no-loop"


def test_lines_of_the_last_iteration_are_written_as_the_loop_shuts_down():
    async def main() -> None:
        log.log_event("last")  # the loop stops in this iteration

    out = CountingStream()
    log.configure("info", out)
    log.batch_per_iteration()
    try:
        uvloop.run(main())
        assert events(out) == ["last"]  # before anything else flushes
        log.log_event("after")  # no loop: written at once
        assert events(out) == ["last", "after"]
    finally:
        log.batch_per_iteration(False)
        log.configure("info")


def test_reconfiguring_writes_the_buffer_to_the_old_destination():
    async def body(out: CountingStream) -> None:
        log.log_event("before")
        other = CountingStream()
        log.configure("info", other)
        log.log_event("after")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert events(out) == ["before"] and events(other) == ["after"]

    batched(body)


def test_a_process_exiting_writes_its_last_lines():
    code = ("import sys, asyncio\n"
            "from ferrymail.observe import log\n"
            "log.batch_per_iteration()\n"
            "async def main():\n"
            "    log.log_event('one')\n"
            "    log.log_event('two')\n"
            "    sys.exit(3)\n"
            "asyncio.run(main())\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 3
    assert [log.parse_logfmt(x)["event"] for x in run.stderr.splitlines()] == ["one", "two"]


def test_a_reply_leaving_writes_the_lines_logged_before_it():
    async def body(out: CountingStream) -> None:
        log.log_event("smtp.transaction")
        log.flush_before_reply()  # what the servers call before writing a reply
        assert events(out) == ["smtp.transaction"]
        log.flush_before_reply()  # nothing pending: no write
        assert out.writes == 1

    batched(body)
