"""Inbound SMTP against a real ``ferrymail run``: real clients (smtplib, swaks, smtp-source, raw
sockets), direct and PROXY listeners in one process, every kind of bad input.

One process serves the whole module (its log is checked per test by looking for new lines);
tests that need their own configuration start their own.
"""

from __future__ import annotations

import re
import resource
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from ferrymail.proxy import encode_v1, encode_v2, encode_v2_local
from tests.integration.conftest import (
    FerrymailProc,
    listener,
    running_yaml,
    server,
    spool_count,
    spool_get,
    start_ferrymail,
    startup_yaml,
)
from tests.realpeers import free_port, require

HOST = "127.0.0.1"
QUEUED = re.compile(rb"250 2\.0\.0 OK queued as ([0-9a-f]{16})")


class MTA:
    """The module's ferrymail: ``direct`` (with STARTTLS), ``viaproxy`` (trusts loopback),
    ``strict`` (trusts only 127.0.0.9)."""

    def __init__(self, proc: FerrymailProc, spool: Path, ports: dict[str, int]) -> None:
        self.proc = proc
        self.spool = spool
        self.direct = ports["direct"]
        self.viaproxy = ports["viaproxy"]
        self.strict = ports["strict"]

    def count(self) -> int:
        return spool_count(self.spool)

    def get(self, qid: str):
        return spool_get(self.spool, qid)

    def mark(self) -> int:
        return len(self.proc.logs())

    def new_logs(self, mark: int) -> list[str]:
        return self.proc.logs()[mark:]

    def wait_new_log(self, mark: int, pattern: str, timeout: float = 5.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.new_logs(mark):
                if rx.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}:\n" +
                             "\n".join(self.new_logs(mark)))


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for mx.ferrymail.test (openssl CLI; no extra dependency)."""
    openssl = require("openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=mx.ferrymail.test"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def mta(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("inbound")
    cert, key = make_cert(work)
    ports = {name: free_port() for name in ("direct", "viaproxy", "strict")}
    limits = {"line_length": 512, "message_size": 20000, "recipients": 3, "errors": 5}
    timeouts = {"proxy": 1, "command": 1, "data": 1}
    servers = [
        server("direct", [listener(ports["direct"])], limits=limits, timeouts=timeouts,
               tls={"cert": str(cert), "key": str(key)}),
        server("viaproxy", [listener(ports["viaproxy"], proxy=True)],
               trusted_proxies=["127.0.0.0/8"], limits=limits, timeouts=timeouts),
        server("strict", [listener(ports["strict"], proxy=True)],
               trusted_proxies=["127.0.0.9/32"], timeouts=timeouts),
    ]
    proc = start_ferrymail(work, startup_yaml(work, servers),
                           running_yaml(["direct", "viaproxy", "strict"]),
                           wait=[(HOST, p) for p in ports.values()])
    yield MTA(proc, work / "spool", ports)
    assert proc.stop() == 0
    # nothing in this module may have crashed a callback
    assert not [line for line in proc.logs() if "app.unhandled" in line or
                not line.startswith("ts=")], proc.log_text()


# --------------------------------------------------------------------------- raw client


class Raw:
    """A line-level SMTP client over a plain socket, for what libraries will not send."""

    def __init__(self, port: int, *, header: bytes = b"", banner: bool = True,
                 timeout: float = 5.0, source: str | None = None) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        if header:
            self.sock.sendall(header)
        if banner:
            assert self.reply().startswith(b"220 ")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply, b"" on EOF."""
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if len(line) < 4 or line[3:4] != b"-":
                    out = b"\r\n".join(lines[: i + 1])
                    self.buf = b"\r\n".join(lines[i + 1:])
                    return out
            chunk = self.sock.recv(65536)
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def eof(self, timeout: float = 5.0) -> bytes:
        """Everything until the server closes (a reset counts as closed; raises on timeout).

        A server closing while our bytes sit unread in its socket makes the kernel send RST.
        """
        self.sock.settimeout(timeout)
        data = self.buf
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data

    def close(self) -> None:
        self.sock.close()

    def transaction(self, rcpt: bytes = b"b@example.com") -> None:
        assert self.cmd(b"EHLO raw.test").startswith(b"250")
        assert self.cmd(b"MAIL FROM:<a@x.test>").startswith(b"250")
        assert self.cmd(b"RCPT TO:<" + rcpt + b">").startswith(b"250")
        assert self.cmd(b"DATA").startswith(b"354")


def queued_id(reply: bytes) -> str:
    m = QUEUED.search(reply)
    assert m, reply
    return m.group(1).decode()


# --------------------------------------------------------------------------- good clients


def test_smtplib_direct_several_messages_in_one_session(mta: MTA):
    with smtplib.SMTP(HOST, mta.direct, timeout=10) as smtp:
        code, ehlo = smtp.ehlo("client.test")
        assert code == 250
        for ext in (b"PIPELINING", b"SIZE 20000", b"8BITMIME", b"SMTPUTF8",
                    b"ENHANCEDSTATUSCODES", b"CHUNKING", b"STARTTLS"):
            assert ext in ehlo
        qids = []
        for i in range(3):
            smtp.mail("a@x.test", ["BODY=8BITMIME"])
            smtp.rcpt("b@example.com")
            smtp.rcpt("c@foreign.test")  # 127.0.0.1 is a relay network
            code, resp = smtp.data(f"Subject: m{i}\r\n\r\nbody {i}\r\n..dot\r\n".encode())
            assert code == 250
            qids.append(queued_id(b"250 " + resp))
    for i, qid in enumerate(qids):
        env, data = mta.get(qid)
        assert env.client_ip == "127.0.0.1" and env.helo == "client.test"
        assert env.recipients == ("b@example.com", "c@foreign.test")
        assert env.server_id == "direct" and env.proxy is None and env.tls is None
        assert ("BODY", "8BITMIME") in env.mail_params
        assert data.startswith(b"Received: from client.test ([127.0.0.1] port ")
        assert b"by mx.ferrymail.test (ferrymail) with ESMTP id " in data
        # smtplib stuffs the leading dot itself: what was given is what is stored
        assert data.endswith(f"Subject: m{i}\r\n\r\nbody {i}\r\n..dot\r\n".encode())


def test_smtp_source_direct_all_messages_spooled(mta: MTA):
    binary = require("smtp-source")
    before = mta.count()
    mark = mta.mark()
    out = subprocess.run([binary, "-s", "5", "-m", "50", "-l", "2048", "-f", "a@x.test",
                          "-t", "b@example.com", f"{HOST}:{mta.direct}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert mta.count() == before + 50
    # the log is read by a thread: wait for it, and count only these messages' lines (a
    # previous test's last lines may come in after the mark on a loaded machine)
    deadline = time.monotonic() + 10
    while True:
        lines = [x for x in mta.new_logs(mark)
                 if "event=smtp.transaction" in x and " rcpts=<b@example.com> " in x]
        if len(lines) >= 50 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 50 and all("qid=" in x and "size=" in x for x in lines)


@pytest.mark.parametrize("version, family", [("1", "TCP4"), ("2", "AF_INET")])
def test_swaks_seed_command_through_proxied_listener(mta: MTA, version: str, family: str):
    swaks = require("swaks")
    mark = mta.mark()
    out = subprocess.run(
        [swaks, "--server", f"{HOST}:{mta.viaproxy}", "--from", "<>", "--to",
         "user@example.com", "--proxy-version", version, "--proxy-family", family,
         "--proxy-source", "45.33.68.55", "--proxy-source-port", "54321",
         "--proxy-dest", "1.1.1.1", "--proxy-dest-port", "25"],
        capture_output=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    qid = queued_id(out.stdout)
    env, data = mta.get(qid)
    assert env.client_ip == "45.33.68.55" and env.client_port == 54321
    assert env.sender == "" and env.recipients == ("user@example.com",)
    assert env.proxy is not None and env.proxy.version == int(version)
    assert env.proxy.proxy_ip == "127.0.0.1"
    assert (env.proxy.dest_ip, env.proxy.dest_port) == ("1.1.1.1", 25)
    assert b"([45.33.68.55] port 54321)" in data.split(b"\r\n\r\n")[0]
    assert f"(via PROXY v{version} from 127.0.0.1)".encode() in data
    line = mta.wait_new_log(mark, f"qid={qid}")
    assert "client=45.33.68.55:54321" in line and f"proxy_version={version}" in line
    assert re.search(r" proxy=127\.0\.0\.1:\d+ ", line)


def test_bdat_chunking_raw(mta: MTA):
    c = Raw(mta.direct)
    assert b"CHUNKING" in c.cmd(b"EHLO raw.test")
    assert c.cmd(b"MAIL FROM:<a@x.test>").startswith(b"250")
    assert c.cmd(b"RCPT TO:<b@example.com>").startswith(b"250")
    part1 = b"Subject: bdat\r\n\r\n"
    part2 = b".not stuffed\r\nline\r\n"
    # pipelined: both chunks in one write
    c.send(b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (len(part1), part1, len(part2), part2))
    assert c.reply().startswith(b"250 2.0.0 %d octets" % len(part1))
    qid = queued_id(c.reply())
    assert c.cmd(b"QUIT").startswith(b"221")
    c.close()
    env, data = mta.get(qid)
    assert data.endswith(part1 + part2)
    assert b"with ESMTP id" in data


def test_starttls_then_mail(mta: MTA):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(HOST, mta.direct, timeout=10) as smtp:
        smtp.ehlo("tls.test")
        code, _ = smtp.starttls(context=ctx)
        assert code == 220
        code, ehlo = smtp.ehlo("tls.test")
        assert code == 250 and b"STARTTLS" not in ehlo
        code, resp = smtp.docmd("STARTTLS")
        assert code == 503
        smtp.mail("a@x.test")
        smtp.rcpt("b@example.com")
        code, resp = smtp.data(b"Subject: tls\r\n\r\nsecret\r\n")
        assert code == 250
        qid = queued_id(b"250 " + resp)
    env, data = mta.get(qid)
    assert env.tls is not None and env.tls.startswith("TLSv1.")
    assert b"with ESMTPS id" in data and b"(using TLSv1." in data


def test_starttls_pipelined_plaintext_is_discarded(mta: MTA):
    c = Raw(mta.direct)
    c.cmd(b"EHLO raw.test")
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@x.test>\r\n")
    assert c.reply().startswith(b"220")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    tls = ctx.wrap_socket(c.sock, server_hostname="mx.ferrymail.test")
    tls.sendall(b"RCPT TO:<b@example.com>\r\n")
    # the injected MAIL was never executed, so RCPT is out of sequence (and HELO is needed)
    assert tls.recv(1000).startswith(b"503 5.5.1")
    tls.close()


# --------------------------------------------------------------------------- PROXY problems


def test_malformed_proxy_header_closed_without_banner(mta: MTA):
    mark = mta.mark()
    c = Raw(mta.viaproxy, header=b"PROXY TCP4 999.1.1.1 1.1.1.1 1 25\r\n", banner=False)
    assert c.eof() == b""
    line = mta.wait_new_log(mark, "event=smtp.proxy.error")
    assert "level=warning" in line and "listener=127.0.0.1:" in line
    assert "peer=127.0.0.1:" in line and "999.1.1.1" in line


def test_garbage_instead_of_proxy_header(mta: MTA):
    mark = mta.mark()
    c = Raw(mta.viaproxy, header=b"EHLO me\r\n", banner=False)
    assert c.eof() == b""
    assert "not a PROXY header" in mta.wait_new_log(mark, "event=smtp.proxy.error")


@pytest.mark.parametrize("partial", [b"PROXY TCP4 45.33.68.55 1.1.1.1 ",
                                     encode_v2(("45.33.68.55", 1), ("1.1.1.1", 25))[:20]])
def test_truncated_proxy_header_then_close(mta: MTA, partial: bytes):
    mark = mta.mark()
    c = Raw(mta.viaproxy, header=partial, banner=False)
    c.sock.shutdown(socket.SHUT_WR)
    assert c.eof() == b""
    line = mta.wait_new_log(mark, "event=smtp.proxy.error")
    assert f"({len(partial)} bytes received)" in line and "level=warning" in line


def test_untrusted_proxy_peer_closed_before_banner(mta: MTA):
    mark = mta.mark()
    header = encode_v1(("45.33.68.55", 54321), ("1.1.1.1", 25))
    c = Raw(mta.strict, header=header, banner=False)
    assert c.eof() == b""
    line = mta.wait_new_log(mark, "event=smtp.proxy.untrusted")
    assert "level=warning" in line and "server=strict" in line
    assert f"listener=127.0.0.1:{mta.strict}" in line and "peer=127.0.0.1:" in line
    assert "45.33.68.55" not in line  # the header was never read


def test_no_proxy_header_times_out_without_banner(mta: MTA):
    mark = mta.mark()
    c = Raw(mta.viaproxy, banner=False)
    started = time.monotonic()
    assert c.eof(timeout=5) == b""
    assert time.monotonic() - started >= 0.9
    line = mta.wait_new_log(mark, "event=smtp.proxy.timeout")
    assert "level=warning" in line and "peer=127.0.0.1:" in line and "listener=" in line


def test_proxy_header_on_direct_listener_is_unknown_command(mta: MTA):
    header = encode_v1(("45.33.68.55", 54321), ("1.1.1.1", 25))
    c = Raw(mta.direct)
    assert c.cmd(header.rstrip(b"\r\n")).startswith(b"500 5.5.2")
    c.transaction()
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    qid = queued_id(c.reply())
    c.close()
    env, _ = mta.get(qid)
    assert env.client_ip == "127.0.0.1" and env.proxy is None


def test_v2_local_header_uses_the_real_peer(mta: MTA):
    c = Raw(mta.viaproxy, header=encode_v2_local())
    c.transaction()
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    qid = queued_id(c.reply())
    c.close()
    env, _ = mta.get(qid)
    assert env.client_ip == "127.0.0.1" and env.proxy is None


def test_header_and_commands_in_one_packet(mta: MTA):
    header = encode_v2(("2001:db8::5", 4000), ("2001:db8::1", 25))
    c = Raw(mta.viaproxy, banner=False)
    c.send(header + b"EHLO packed.test\r\nNOOP\r\n")
    assert c.reply().startswith(b"220 ")
    assert c.reply().startswith(b"250-")
    assert c.reply().startswith(b"250 ")
    c.transaction()
    c.send(b"Subject: v6\r\n\r\nhi\r\n.\r\n")
    qid = queued_id(c.reply())
    env, data = mta.get(qid)
    assert env.client_ip == "2001:db8::5" and env.client_port == 4000
    assert b"([IPv6:2001:db8::5] port 4000)" in data


# --------------------------------------------------------------------------- policy


def test_relay_denied_for_foreign_domain_from_proxied_foreign_client(mta: MTA):
    header = encode_v1(("45.33.68.55", 54321), ("1.1.1.1", 25))
    c = Raw(mta.viaproxy, header=header)
    c.cmd(b"EHLO outside.test")
    assert c.cmd(b"MAIL FROM:<spam@outside.test>").startswith(b"250")
    assert c.cmd(b"RCPT TO:<victim@foreign.test>") == b"554 5.7.1 relay access denied"
    assert c.cmd(b"RCPT TO:<user@example.com>").startswith(b"250")
    assert c.cmd(b"DATA").startswith(b"354")
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    qid = queued_id(c.reply())
    env, _ = mta.get(qid)
    assert env.recipients == ("user@example.com",)


def test_relay_allowed_for_proxied_client_in_relay_networks(mta: MTA):
    header = encode_v1(("127.0.0.44", 1234), ("127.0.0.1", 25))
    c = Raw(mta.viaproxy, header=header)
    c.cmd(b"EHLO inside.test")
    c.cmd(b"MAIL FROM:<a@inside.test>")
    assert c.cmd(b"RCPT TO:<someone@foreign.test>").startswith(b"250 2.1.5")


# --------------------------------------------------------------------------- limits


def test_oversized_command_line(mta: MTA):
    c = Raw(mta.direct)
    assert c.cmd(b"NOOP " + b"x" * 2000) == b"500 5.5.2 line too long"
    assert c.cmd(b"NOOP").startswith(b"250")


def test_too_many_recipients(mta: MTA):
    c = Raw(mta.direct)
    c.cmd(b"EHLO raw.test")
    c.cmd(b"MAIL FROM:<a@x.test>")
    for i in range(3):
        assert c.cmd(b"RCPT TO:<r%d@example.com>" % i).startswith(b"250")
    assert c.cmd(b"RCPT TO:<r9@example.com>") == b"452 4.5.3 too many recipients"


def test_size_parameter_too_big(mta: MTA):
    c = Raw(mta.direct)
    c.cmd(b"EHLO raw.test")
    assert c.cmd(b"MAIL FROM:<a@x.test> SIZE=20001").startswith(b"552 5.3.4")
    assert c.cmd(b"MAIL FROM:<a@x.test> SIZE=20000").startswith(b"250")


def test_body_too_big_nothing_stored(mta: MTA):
    before = mta.count()
    c = Raw(mta.direct)
    c.transaction()
    c.send((b"x" * 998 + b"\r\n") * 25 + b".\r\n")
    assert c.reply().startswith(b"552 5.3.4")
    assert c.cmd(b"NOOP").startswith(b"250")  # the session goes on
    assert mta.count() == before


def test_error_limit_closes_with_421(mta: MTA):
    c = Raw(mta.direct)
    c.send(b"".join(b"BOGUS%d\r\n" % i for i in range(6)))
    data = c.eof()
    assert data.count(b"500 5.5.2") == 5
    assert data.endswith(b"421 4.7.0 too many errors, closing connection\r\n")


def test_client_disconnecting_mid_data_stores_nothing(mta: MTA):
    before = mta.count()
    mark = mta.mark()
    c = Raw(mta.direct)
    c.transaction()
    c.send(b"Subject: cut\r\n\r\nhalf a message\r\n")
    c.close()
    # the same session shape with an end of data is stored: wait for that one, then compare
    c = Raw(mta.direct)
    c.transaction()
    c.send(b"Subject: whole\r\n\r\nall\r\n.\r\n")
    qid = queued_id(c.reply())
    c.close()
    mta.wait_new_log(mark, f"qid={qid}")
    assert mta.count() == before + 1
    assert not [x for x in mta.new_logs(mark) if "Subject: cut" in x]


def test_slow_client_gets_421_timeout(mta: MTA):
    mark = mta.mark()
    c = Raw(mta.direct)
    c.cmd(b"EHLO slow.test")
    started = time.monotonic()
    assert c.eof(timeout=5) == b"421 4.4.2 timeout exceeded, closing connection\r\n"
    assert time.monotonic() - started >= 0.9
    assert "phase=command" in mta.wait_new_log(mark, "event=smtp.timeout")


def test_slow_client_in_data_gets_421_timeout(mta: MTA):
    before = mta.count()
    c = Raw(mta.direct)
    c.transaction()
    c.send(b"Subject: slow\r\n\r\npart")
    assert c.eof(timeout=5).startswith(b"421 4.4.2")
    assert mta.count() == before


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"],
                         ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF"])
def test_smtp_smuggling_refused(mta: MTA, smuggle: bytes):
    before = mta.count()
    c = Raw(mta.direct)
    c.transaction()
    c.send(b"From: a@x.test\r\nSubject: first\r\n\r\nfirst" + smuggle +
           b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
           b"From: admin@example.com\r\nSubject: smuggled\r\n\r\nsecond\r\n.\r\n")
    assert c.reply() == b"550 5.6.11 bare CR or LF not allowed"
    assert c.cmd(b"NOOP").startswith(b"250")  # exactly one reply: nothing else was executed
    c.close()
    assert mta.count() == before


# --------------------------------------------------------------------------- spool failure


def test_spool_failure_is_451_and_nothing_acknowledged(ferrymail_proc, tmp_path: Path):
    """RLIMIT_FSIZE makes the spool's writes fail with EFBIG, which stops root as well."""
    port = free_port()
    limit = 400_000

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    startup = startup_yaml(tmp_path, [server("s", [listener(port)],
                                             limits={"message_size": 2_000_000})])
    proc = ferrymail_proc(startup, running_yaml(["s"]), wait=[(HOST, port)],
                          preexec_fn=small_files)
    c = Raw(port)
    c.transaction()
    c.send((b"y" * 998 + b"\r\n") * 600 + b".\r\n")  # 600 KB: the spool cannot write it
    assert c.reply() == b"451 4.3.0 temporary spool failure, try again later"
    assert c.cmd(b"MAIL FROM:<a@x.test>").startswith(b"250")  # the session goes on
    c.cmd(b"RCPT TO:<b@example.com>")
    c.cmd(b"DATA")
    c.send(b"Subject: small\r\n\r\nfits\r\n.\r\n")
    qid = queued_id(c.reply())  # a small one still fits
    c.close()
    line = proc.wait_log("event=smtp.transaction .*reply=\"451")[0]
    assert "level=warning" in line and "error=" in line
    assert proc.stop() == 0
    assert spool_count(tmp_path / "spool") == 1
    assert spool_get(tmp_path / "spool", qid) is not None


def test_starttls_command_right_after_handshake_is_answered(mta: MTA):
    """The first command may arrive with the client's last handshake flight; it must not be
    lost between the handshake and the session's switch to TLS."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for _ in range(20):
        c = Raw(mta.direct)
        c.cmd(b"EHLO raw.test")
        assert c.cmd(b"STARTTLS").startswith(b"220")
        tls = ctx.wrap_socket(c.sock, server_hostname="mx.ferrymail.test",
                              do_handshake_on_connect=False)
        tls.do_handshake()
        tls.sendall(b"EHLO again.test\r\n")
        assert tls.recv(1000).startswith(b"250")
        tls.close()
