"""Large messages through a real ferrymail: in by DATA and BDAT, out to smtp-sink, with the
process's peak memory growing by a fraction of the message size (bodies stream in chunks
to spool files and from them; before, one message cost about four times its size).
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import threading

from tests.integration.benchrun import BENCH  # noqa: F401  (puts bench/ on sys.path)
from tests.integration.conftest import (
    ClientThreads,
    listener,
    running_yaml,
    server,
    sink_running_yaml,
    spool_get,
    spool_messages,
    startup_yaml,
)
from tests.realpeers import free_port, smtp_sink

# isort: split
from memory import reset_peak, vm  # bench/memory.py: the same measurement as the bench

MIB = 1024 * 1024
SIZE = 8 * MIB
# peak RSS growth allowed while two 8 MiB messages are received and delivered, as a share
# of one message's size (the old path: about 4)
MAX_GROWTH_RATIO = 0.75


def body_of(size: int, tag: bytes) -> bytes:
    """CRLF lines, some starting with a dot (stuffed on the wire), about `size` bytes."""
    lines = []
    total = 0
    i = 0
    while total < size:
        line = b"%s%s %08d abcdefghijklmnopqrstuvwxyz0123456789 %s\r\n" % (
            b"." if i % 7 == 0 else b"", tag, i, b"x" * (i % 50))
        lines.append(line)
        total += len(line)
        i += 1
    return b"Subject: " + tag + b"\r\n\r\n" + b"".join(lines)


def send_bdat(port: int, body: bytes, chunk: int = 1 * MIB) -> bytes:
    """One transaction by BDAT (CHUNKING), `chunk` bytes per command; the last reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            while True:
                line = f.readline()
                if line[3:4] != b"-":
                    return line

        reply()
        s.sendall(b"EHLO client.example.org\r\n")
        reply()
        s.sendall(b"MAIL FROM:<a@example.org>\r\n")
        assert reply().startswith(b"250")
        s.sendall(b"RCPT TO:<bdat@example.com>\r\n")
        assert reply().startswith(b"250")
        for i in range(0, len(body), chunk):
            part = body[i:i + chunk]
            last = b" LAST" if i + chunk >= len(body) else b""
            s.sendall(b"BDAT %d%s\r\n" % (len(part), last) + part)
            answer = reply()
            assert answer.startswith(b"250"), answer
        s.sendall(b"QUIT\r\n")
        return answer


def message_of(raw: bytes) -> bytes:
    """The message as smtp-sink dumped it, without the X- lines it adds first."""
    text = raw.replace(b"\r\n", b"\n")
    start = text.index(b"Received: ")
    return text[start:]


def test_large_messages_stream_in_and_out_with_bounded_memory(tmp_path, ferrymail_proc):
    port = free_port()
    data_body = body_of(SIZE, b"data")
    bdat_body = body_of(SIZE, b"bdat")
    with smtp_sink() as sink:
        startup = startup_yaml(tmp_path, [server(
            "in", [listener(port)], limits={"message_size": 64 * MIB})], min_free="1MiB")
        fm = ferrymail_proc(startup, sink_running_yaml(sink.port), wait=[("127.0.0.1", port)])
        # warm-up: the same paths once, with a smaller message (thread pools, buffers)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.sendmail("a@example.org", ["warm@example.com"], body_of(MIB, b"warm"))
        sink.wait_dumps(1)
        fm.wait_log(r"event=delivery\.attempt .*result=delivered")
        before = vm(fm.pid)["VmRSS"]
        reset_peak(fm.pid)
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
            c.sendmail("a@example.org", ["data@example.com"], data_body)
        assert send_bdat(port, bdat_body).startswith(b"250 2.0.0 OK queued as ")
        sink.wait_dumps(3, timeout=60)
        fm.wait_log(r"event=delivery\.attempt .*result=delivered", count=3, timeout=60)
        dumps = sink.dumps()  # read again: smtp-sink has answered, so its files are whole
        peak = vm(fm.pid)["VmHWM"]
        fm.stop()
    growth = peak - before
    print(f"peak RSS growth {growth / MIB:.2f} MiB for 2 x {SIZE // MIB} MiB"
          f" (ratio {growth / SIZE:.3f})")
    assert growth < MAX_GROWTH_RATIO * SIZE, f"peak RSS grew by {growth / MIB:.1f} MiB"
    got = {dump.rcpts[0]: message_of(dump.raw) for dump in dumps}
    for rcpt, body in (("<data@example.com>", data_body), ("<bdat@example.com>", bdat_body)):
        message = got[rcpt]
        body_lf = body.replace(b"\r\n", b"\n")
        at = message.find(body_lf)  # whole, dots and all, byte for byte (but line ends)
        assert at > 0 and len(message) - at - len(body_lf) <= 1, rcpt
        # smtp-sink's Received:, then ours: nothing before or between
        head = message[:at]
        assert head.count(b"Received: ") == 2 and head.count(b"(ferrymail) with ESMTP id ") == 1
    # delivered: their body files are gone with them
    assert os.listdir(tmp_path / "spool" / "bodies") == []


QUEUED = re.compile(rb"250 2\.0\.0 OK queued as ([0-9a-f]{16})\r\n")


def large_client(port: int, n: int, acked: dict[str, bytes], lock: threading.Lock,
                 stop: threading.Event) -> None:
    """1 MiB messages (each a body file) until told to stop or the server dies."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"EHLO crash.test\r\n")
            while f.readline().startswith(b"250-"):
                pass
            for i in range(50):
                if stop.is_set():
                    return
                body = body_of(MIB, b"c%d-%d" % (n, i))
                sock.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
                for expect in (b"250", b"250", b"354"):
                    if not f.readline().startswith(expect):
                        return
                sock.sendall(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
                m = QUEUED.match(f.readline())
                if m is None:
                    return
                with lock:
                    acked[m.group(1).decode()] = body
    except OSError:
        return  # killed under us


def test_sigkill_while_large_bodies_arrive_keeps_every_acknowledged_one(
        tmp_path, ferrymail_proc):
    port = free_port()
    startup = startup_yaml(tmp_path, [server("s", [listener(port)])])
    proc = ferrymail_proc(startup, running_yaml(["s"]), wait=[("127.0.0.1", port)])
    acked: dict[str, bytes] = {}
    clients = ClientThreads(large_client, port, acked)
    # at least a few acknowledged, bodies mid-flight
    clients.wait_until(lambda acked: len(acked) >= 6, 5)
    proc.kill()
    clients.stop(15)
    with clients.lock:
        recorded = dict(acked)
    assert recorded, "nothing was acknowledged before the kill"
    bodies = tmp_path / "spool" / "bodies"
    # restarted on the same spool: parts of bodies that were arriving are gone, every
    # acknowledged message is there, whole
    again = ferrymail_proc(startup, running_yaml(["s"]), wait=[("127.0.0.1", port)])
    again.stop()
    assert not [p for p in os.listdir(bodies) if p.endswith(".part")]
    stored = {m.queue_id for m in spool_messages(tmp_path / "spool")}
    assert set(recorded) <= stored
    assert set(os.listdir(bodies)) == stored  # no file without its message
    for qid, body in recorded.items():
        got = spool_get(tmp_path / "spool", qid)
        assert got is not None and got[1].endswith(body), qid
