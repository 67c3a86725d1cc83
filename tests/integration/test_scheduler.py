"""The scheduler over a real SQLite spool: concurrency bounds per destination and in total,
no head-of-line blocking, no message in two attempts at once, wake-up on store and at the
next due time, and a crashing job that does not spin.

``run_job`` here is a recording coroutine that records results in the spool the way the
engine does; the engine's own attempts are covered by the outbound tests.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from ferrymail.config import parse_running
from ferrymail.delivery.engine import DeliveryEngine
from ferrymail.delivery.scheduler import UNPROVEN_READY, Job, Scheduler
from ferrymail.spool import Envelope, RecipientState, RecipientUpdate, SqliteSpool
from tests.integration.outbound_harness import LogCapture, run
from tests.integration.smtpscript import ScriptedSMTP
from tests.realpeers import smtp_sink

CFG = parse_running("""
servers: [{id: in, transport: t}]
routing: [{recipientdomain: slow.test, transport: slow}]
queues: {concurrency: 2, total_concurrency: 3}
transportgroups:
  - id: g
    transports: [{id: t}, {id: slow}]
""")


def envelope(*rcpts: str) -> Envelope:
    return Envelope(sender="s@origin.test", recipients=rcpts, client_ip="127.0.0.1",
                    client_port=1, helo="h", server_id="in", received_at=time.time())


async def deliver(spool: SqliteSpool, job: Job, state=RecipientState.DELIVERED,
                  next_attempt: float = 0.0) -> None:
    await spool.update(job.queue_id, [
        RecipientUpdate(r.address, state, r.attempts + 1, next_attempt, "250 ok")
        for r in job.recipients])


def test_concurrency_bounds_and_no_head_of_line_blocking(tmp_path):
    async def main() -> None:
        spool = SqliteSpool(tmp_path / "spool", fsync=False)
        await spool.start()
        active: Counter[str] = Counter()
        peak: Counter[str] = Counter()
        peak_total = 0
        running_qids: set[str] = set()
        overlap = []
        done: list[str] = []

        async def run_job(job: Job) -> None:
            nonlocal peak_total
            assert job.queue_id not in running_qids  # never twice at once
            running_qids.add(job.queue_id)
            dest = job.destination.domain
            active[dest] += 1
            peak[dest] = max(peak[dest], active[dest])
            peak_total = max(peak_total, sum(active.values()))
            if dest == "fast.test" and active["slow.test"]:
                overlap.append(job.queue_id)
            await asyncio.sleep(0.15 if dest == "slow.test" else 0.02)
            await deliver(spool, job)
            active[dest] -= 1
            running_qids.discard(job.queue_id)
            done.append(dest)

        sched = Scheduler(spool, lambda: CFG, run_job)
        # enough for the ready-count curve to want both connections: ceil(2*(1-e^-0.023*32))
        for i in range(32):
            await spool.store(envelope(f"s{i}@slow.test"), b"x\r\n")
        for i in range(10):
            await spool.store(envelope(f"f{i}@fast.test"), b"x\r\n")
        sched.start()
        async with asyncio.timeout(10):
            while await spool.count():
                await asyncio.sleep(0.02)
        await sched.stop()
        await spool.close()
        assert peak["slow.test"] == 2 and peak["fast.test"] <= 2
        assert peak_total == 3
        # the fast destination finished while the slow one was still busy
        assert overlap and done.index("slow.test") > done.index("fast.test")
        assert done.count("fast.test") == 10 and done.count("slow.test") == 32

    run(main)


def test_wakes_on_store_and_at_next_due_and_crash_cools_down(tmp_path):
    async def main() -> None:
        spool = SqliteSpool(tmp_path / "spool", fsync=False)
        await spool.start()
        calls: list[tuple[str, float]] = []

        async def run_job(job: Job) -> float | None:
            calls.append((job.recipients[0].address, time.monotonic()))
            addr = job.recipients[0].address
            if addr.startswith("crash"):
                raise RuntimeError("bug in a job")
            if addr.startswith("later") and job.recipients[0].attempts == 0:
                when = time.time() + 0.3
                await deliver(spool, job, RecipientState.DEFERRED, when)
                return when  # as the engine does: the crashed message hides it from next_due
            await deliver(spool, job)
            return None

        sched = Scheduler(spool, lambda: CFG, run_job)
        sched.start()
        await asyncio.sleep(0.2)  # idle: asleep until woken
        with LogCapture() as logs:
            t0 = time.monotonic()
            await spool.store(envelope("now@fast.test"), b"x\r\n")
            sched.wake()
            await spool.store(envelope("later@fast.test"), b"x\r\n")
            await spool.store(envelope("crash@fast.test"), b"x\r\n")
            sched.wake()
            async with asyncio.timeout(5):
                while len([c for c in calls if c[0] == "later@fast.test"]) < 2:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
        await sched.stop()
        await spool.close()
        first = dict(calls)
        assert first["now@fast.test"] - t0 < 1.0  # woken, not polled (the poll is 5 s)
        later = [t for a, t in calls if a == "later@fast.test"]
        assert later[1] - later[0] >= 0.25  # waited for next_attempt, no earlier
        assert [a for a, _ in calls].count("crash@fast.test") == 1  # cooled down, no spin
        (err,) = logs.lines("scheduler.job_error")
        assert "bug in a job" in err

    run(main)


def test_a_dead_destination_with_a_full_ready_queue_does_not_hold_back_new_mail(tmp_path):
    """More mail for a hung destination than fetch_limit: its queue fills up, yet new mail for
    another destination is fetched and delivered at once; the hung destination's overflow is
    parked (left in the spool) and comes back once its queue drains; nothing runs twice."""
    async def main() -> None:
        spool = SqliteSpool(tmp_path / "spool", fsync=False)
        await spool.start()
        hung = asyncio.Event()
        runs: Counter[str] = Counter()
        running: set[str] = set()
        delivered: dict[str, float] = {}

        async def run_job(job: Job) -> None:
            assert job.queue_id not in running  # never twice at once
            running.add(job.queue_id)
            runs[job.queue_id] += 1
            if job.destination.domain == "slow.test":
                await hung.wait()
            await deliver(spool, job)
            running.discard(job.queue_id)
            delivered[job.recipients[0].address] = time.monotonic()

        sched = Scheduler(spool, lambda: CFG, run_job, fetch_limit=10)
        for i in range(40):
            await spool.store(envelope(f"s{i}@slow.test"), b"x\r\n")
        sched.start()
        async with asyncio.timeout(5):
            # never a success: unproven, so its ready queue fills up at UNPROVEN_READY ...
            while sched.running < 1 or not sched.parked() or sched.waiting < UNPROVEN_READY:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert sched.running == 1 and sched.waiting == UNPROVEN_READY
        slow_parked = len(sched.parked())
        assert 0 < slow_parked <= 40 - UNPROVEN_READY  # ... the rest waits in the spool
        t0 = time.monotonic()
        for i in range(15):
            await spool.store(envelope(f"f{i}@fast.test"), b"x\r\n")
            sched.wake()
        async with asyncio.timeout(5):
            while sum(a.endswith("@fast.test") for a in delivered) < 15:
                await asyncio.sleep(0.01)
        assert max(delivered.values()) - t0 < 3.0  # not stuck behind the hung destination
        assert sched.waiting <= 20  # bounded: fetch_limit plus as much again for new mail
        assert not any(a.endswith("@slow.test") for a in delivered)
        hung.set()  # the destination recovers: the queue drains, the parked mail comes back
        async with asyncio.timeout(10):
            while await spool.count():
                await asyncio.sleep(0.02)
        await sched.stop()
        await spool.close()
        assert len(delivered) == 55 and set(runs.values()) == {1}
        assert not sched.parked()

    run(main)


def test_refills_below_the_low_water_mark_not_after_every_job(tmp_path):
    """A deep queue drains with a few fetches, not one per finished job."""
    async def main() -> None:
        spool = SqliteSpool(tmp_path / "spool", fsync=False)
        await spool.start()
        runs: Counter[str] = Counter()

        async def run_job(job: Job) -> None:
            runs[job.queue_id] += 1
            await asyncio.sleep(0)
            await deliver(spool, job)

        for i in range(300):
            await spool.store(envelope(f"f{i}@fast.test"), b"x\r\n")
        sched = Scheduler(spool, lambda: CFG, run_job, fetch_limit=100)
        assert sched.low_water == 20
        sched.start()
        async with asyncio.timeout(20):
            while await spool.count():
                await asyncio.sleep(0.02)
        await sched.stop()
        await spool.close()
        assert len(runs) == 300 and set(runs.values()) == {1}
        assert sched.fetches <= 30  # one per job would be 300

    run(main)


def test_a_job_recording_its_results_frees_its_slot_but_stays_in_flight(tmp_path):
    """After `release` the next job of the destination starts although concurrency is 1,
    while the released job's message is still excluded from fetching."""
    one = parse_running("""
servers: [{id: in, transport: t}]
queues: {concurrency: 1, total_concurrency: 1}
transportgroups:
  - id: g
    transports: [{id: t}]
""")

    async def main() -> None:
        spool = SqliteSpool(tmp_path / "spool", fsync=False)
        await spool.start()
        recording = asyncio.Event()
        started: list[str] = []
        runs: Counter[str] = Counter()

        async def run_job(job: Job) -> None:
            runs[job.queue_id] += 1
            started.append(job.recipients[0].address)
            if job.recipients[0].address == "a@fast.test":
                sched.release(job)
                sched.release(job)  # twice: no effect
                await recording.wait()  # "recording its results"
            await deliver(spool, job)

        sched = Scheduler(spool, lambda: one, run_job)
        a = await spool.store(envelope("a@fast.test"), b"x\r\n")
        await spool.store(envelope("b@fast.test"), b"x\r\n")
        sched.start()
        async with asyncio.timeout(5):
            while "b@fast.test" not in started:
                await asyncio.sleep(0.01)
            assert sched.running == 0 and a in sched.in_flight()
            sched.wake()
            await asyncio.sleep(0.2)
            assert runs[a] == 1  # in flight: not fetched again
            recording.set()
            while await spool.count():
                await asyncio.sleep(0.01)
        await sched.stop()
        await spool.close()
        assert started == ["a@fast.test", "b@fast.test"] and set(runs.values()) == {1}

    run(main)


def test_dead_destination_does_not_delay_others_end_to_end(tmp_path):
    """Engine + scheduler: a silent MX holds its own slots only; mail elsewhere flows."""
    with smtp_sink() as sink, LogCapture() as logs:
        async def main() -> None:
            async with ScriptedSMTP(banner=None) as silent:
                cfg = parse_running(f"""
servers: [{{id: in, transport: ok}}]
routing: [{{recipientdomain: dead.test, transport: dead}}]
queues: {{concurrency: 1, total_concurrency: 4}}
transportgroups:
  - id: g
    transports:
      - id: ok
        connection: {{server: 127.0.0.1, port: {sink.port}}}
      - id: dead
        connection:
          server: 127.0.0.1
          port: {silent.port}
          timeout: {{banner: 3}}
""")
                spool = SqliteSpool(tmp_path / "spool", fsync=False)
                await spool.start()
                eng = DeliveryEngine(spool, lambda: cfg, hostname="mta.test", stop_grace=0.2)
                await eng.start()
                for i in range(3):
                    await spool.store(envelope(f"d{i}@dead.test"), b"Subject: x\r\n\r\nx\r\n")
                eng.wake()
                await asyncio.sleep(0.2)  # the dead destination has its one slot taken
                for i in range(5):
                    await spool.store(envelope(f"ok{i}@fine.test"), b"Subject: x\r\n\r\nx\r\n")
                eng.wake()
                await logs.wait("rcpts=ok.@fine.test .*result=delivered", count=5, timeout=2.5)
                assert len(silent.sessions) == 1  # concurrency 1 for the dead destination
                await eng.stop()
                await spool.close()

        run(main)
        assert len(sink.wait_dumps(5)) == 5


def test_disabled_engine_keeps_mail_untouched(tmp_path):
    async def main() -> None:
        spool = SqliteSpool(tmp_path / "spool", fsync=False)
        await spool.start()
        eng = DeliveryEngine(spool, lambda: CFG, hostname="mta.test", enabled=False)
        with LogCapture() as logs:
            await eng.start()
            await spool.store(envelope("kept@fast.test"), b"x\r\n")
            eng.wake()
            await asyncio.sleep(0.3)
            await eng.stop()
        (msg,) = await spool.list()
        assert msg.recipients[0].state is RecipientState.QUEUED
        assert msg.recipients[0].attempts == 0
        assert logs.lines("delivery.disabled") and not logs.lines("delivery.attempt")
        await spool.close()

    run(main)


def test_unproven_destinations_hold_at_most_their_share_and_proven_ones_go_on(tmp_path):
    """total_concurrency 4, unproven_share 0.5: three hung destinations (never a result) get
    two slots between them, the third waits (logged and counted once), and a destination
    with a recent success delivers its mail meanwhile on the slots left."""
    cfg = parse_running("""
servers: [{id: in, transport: t}]
queues: {concurrency: 2, total_concurrency: 4, destination: {unproven_share: 0.5}}
transportgroups: [{id: g, transports: [{id: t}]}]
""")

    async def main() -> None:
        spool = SqliteSpool(tmp_path / "spool", fsync=False)
        await spool.start()
        hung = asyncio.Event()
        started: Counter[str] = Counter()
        delivered: list[str] = []

        async def run_job(job: Job) -> None:
            started[job.destination.domain] += 1
            if job.destination.domain.startswith("hung"):
                await hung.wait()
            await deliver(spool, job)
            delivered.append(job.destination.domain)

        sched = Scheduler(spool, lambda: cfg, run_job)
        sched.start()
        await spool.store(envelope("a@live.test"), b"x\r\n")  # live.test proves itself
        sched.wake()
        async with asyncio.timeout(5):
            while "live.test" not in delivered:
                await asyncio.sleep(0.01)
        with LogCapture() as logs:
            for i in range(3):
                await spool.store(envelope(f"h@hung{i}.test"), b"x\r\n")
            sched.wake()
            await logs.wait("event=scheduler.unproven_share_full", timeout=5)
            for i in range(6):
                await spool.store(envelope(f"b{i}@live.test"), b"x\r\n")
            sched.wake()
            async with asyncio.timeout(5):
                while delivered.count("live.test") < 7:
                    await asyncio.sleep(0.01)
            assert sum(started[f"hung{i}.test"] for i in range(3)) == 2
            assert sched.unproven_share_hits == 1
            (line,) = logs.lines("scheduler.unproven_share_full")
            assert "cap=2" in line and "waiting=t/hung" in line
        hung.set()
        async with asyncio.timeout(5):
            while await spool.count():
                await asyncio.sleep(0.01)
        await sched.stop()
        await spool.close()
        assert sorted(started) == ["hung0.test", "hung1.test", "hung2.test", "live.test"]

    run(main)


def test_held_mail_does_not_wake_the_scheduler_and_lifting_the_hold_delivers(tmp_path):
    """While ``queues.hold`` keeps mail queued a store does not wake the scheduler (it would
    only go back to sleep); the reload that lifts the hold delivers what was held."""
    with smtp_sink() as sink, LogCapture() as logs:
        async def main() -> None:
            text = f"""
servers: [{{id: in, transport: ok}}]
transportgroups:
  - id: g
    transports:
      - id: ok
        connection: {{server: 127.0.0.1, port: {sink.port}}}
"""
            held, lifted = parse_running(text + "queues: {hold: true}\n"), parse_running(text)
            cfg = [held]
            spool = SqliteSpool(tmp_path / "spool", fsync=False)
            await spool.start()
            eng = DeliveryEngine(spool, lambda: cfg[0], hostname="mta.test", stop_grace=0.2)
            await eng.start()
            await asyncio.sleep(0.1)  # the scheduler's first look, then asleep
            stored = eng.notifying(spool)
            for i in range(3):
                await stored.store(envelope(f"r{i}@fine.test"), b"Subject: x\r\n\r\nx\r\n")
                assert not eng.scheduler._wake.is_set()
            await asyncio.sleep(0.2)
            assert not logs.lines("delivery.attempt")
            cfg[0] = lifted
            eng.config_changed(lifted)
            await logs.wait("rcpts=r.@fine.test .*result=delivered", count=3, timeout=5)
            await eng.stop()
            await spool.close()

        run(main)
