"""Submission in a real ``ferrymail run``: implicit TLS listeners (RFC 8314) beside STARTTLS
ones, checked with swaks, openssl s_client and Python's ssl; mail relayed out to smtp-sink.

One ferrymail process serves the module: server ``sub`` listens on a STARTTLS port, an
implicit-TLS port and an implicit-TLS port behind a PROXY header.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ferrymail.proxy import encode_v1
from tests.integration.conftest import FerrymailProc, server, start_ferrymail, startup_yaml
from tests.integration.test_inbound_smtp import make_cert
from tests.realpeers import SmtpSink, free_port, require, smtp_sink

pytestmark = pytest.mark.timeout(90)
HOST = "127.0.0.1"


@dataclass
class Sub:
    fm: FerrymailProc
    ports: dict[str, int]
    sink: SmtpSink
    workdir: Path
    cert: Path

    def mark(self) -> int:
        return len(self.fm.logs())

    def wait_new_log(self, mark: int, pattern: str, timeout: float = 10.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.fm.logs()[mark:]:
                if rx.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line {pattern!r}:\n" + "\n".join(self.fm.logs()[mark:]))

    def wait_dump(self, needle: bytes, timeout: float = 15.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for d in self.sink.dumps():
                if needle in d.raw:
                    return d.raw
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} never reached the sink:\n{self.fm.log_text()}")


def sub_running(sink_port: int, relay: list[str]) -> dict:
    return {
        "servers": [{"id": "sub", "transport": "out", "domains": ["example.com"],
                     "relay_networks": relay}],
        "transportgroups": [{"id": "g", "retry": {"count": 2, "intervals": [300]},
                             "connection": {"server": HOST, "port": sink_port,
                                            "tls": {"mode": "disabled"}},
                             "transports": [{"id": "out"}]}],
    }


@pytest.fixture(scope="module")
def sub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sub]:
    work = tmp_path_factory.mktemp("submission")
    cert, key = make_cert(work)
    ports = {n: free_port() for n in ("starttls", "implicit", "implicit_proxy")}
    listeners = [
        {"address": HOST, "port": ports["starttls"]},
        {"address": HOST, "port": ports["implicit"], "tls": "implicit"},
        {"address": HOST, "port": ports["implicit_proxy"], "tls": "implicit",
         "proxyprotocol": True},
    ]
    servers = [server("sub", listeners, tls={"cert": str(cert), "key": str(key)},
                      trusted_proxies=["127.0.0.0/8"])]
    with smtp_sink() as sink:
        running = yaml.safe_dump(sub_running(sink.port, ["127.0.0.0/8"]))
        fm = start_ferrymail(work, startup_yaml(work, servers), running,
                             wait=[(HOST, p) for p in ports.values()])
        try:
            yield Sub(fm, ports, sink, work, cert)
        finally:
            fm.kill()


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --------------------------------------------------------------------------- implicit TLS


def test_swaks_tls_on_connect_relays(sub: Sub) -> None:
    swaks = require("swaks")
    mark = sub.mark()
    p = subprocess.run([swaks, "--server", HOST, "--port", str(sub.ports["implicit"]), "--tlsc",
                        "--ehlo", "swaks.test", "--from", "a@origin.test", "--to", "r@dest.test",
                        "--header", "Subject: implicit-swaks"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "TLS started" in p.stdout and "STARTTLS" not in p.stdout.split("EHLO")[1]
    line = sub.wait_new_log(mark, r"smtp\.transaction .*reply=\"250")
    assert "tls=\"TLSv1.3" in line
    dump = sub.wait_dump(b"Subject: implicit-swaks")
    assert b"with ESMTPS id" in dump


def test_openssl_s_client_on_implicit_port(sub: Sub) -> None:
    openssl = require("openssl")
    # several times: the client's hello races the server's switch to TLS (it once lost)
    for _ in range(8):
        p = subprocess.run([openssl, "s_client", "-connect", f"{HOST}:{sub.ports['implicit']}",
                            "-quiet", "-crlf"], input="EHLO openssl.test\nQUIT\n",
                           capture_output=True, text=True, timeout=15)
        out = p.stdout
        assert out.startswith("220 mx.ferrymail.test ESMTP"), out + p.stderr
        assert "250-mx.ferrymail.test" in out and "STARTTLS" not in out and "221 2.0.0" in out
    # the plain port still offers STARTTLS, and a plaintext client on 465 gets no banner
    p = subprocess.run([openssl, "s_client", "-connect", f"{HOST}:{sub.ports['starttls']}",
                        "-starttls", "smtp", "-quiet", "-crlf"], input="EHLO o.test\nQUIT\n",
                       capture_output=True, text=True, timeout=30)
    assert "250 " in p.stdout and "221 2.0.0" in p.stdout, p.stdout + p.stderr
    with socket.create_connection((HOST, sub.ports["implicit"]), timeout=1) as s:
        s.sendall(b"EHLO plain.test\r\n")
        try:
            got = s.recv(100)
        except (TimeoutError, ConnectionResetError):
            got = b""
        assert not got.startswith(b"220")  # no banner in clear: TLS comes first


def test_implicit_tls_behind_proxy_with_client_hello_in_the_same_segment(sub: Sub) -> None:
    """HAProxy may write the PROXY header and the client's first bytes in one segment."""
    ctx = client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="mx.ferrymail.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    header = encode_v1(("203.0.113.9", 40000), ("127.0.0.1", 465))
    sock = socket.create_connection((HOST, sub.ports["implicit_proxy"]), timeout=5)
    sock.sendall(header + hello)

    def pump() -> None:
        data = sock.recv(65536)
        assert data, "closed during TLS"
        incoming.write(data)

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            pump()
    if outgoing.pending:
        sock.sendall(outgoing.read())

    def read_reply() -> bytes:
        buf = b""
        while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", buf):
            try:
                buf += tls.read(65536)
            except ssl.SSLWantReadError:
                pump()
        return buf

    assert read_reply().startswith(b"220 ")
    mark = sub.mark()
    for cmd, expect in ((b"EHLO proxied.test", b"250"), (b"MAIL FROM:<p@origin.test>", b"250"),
                        (b"RCPT TO:<p@example.com>", b"250"), (b"DATA", b"354"),
                        (b"Subject: proxied-implicit\r\n\r\nhi\r\n.", b"250"),
                        (b"QUIT", b"221")):
        tls.write(cmd + b"\r\n")
        sock.sendall(outgoing.read())
        reply = read_reply()
        assert reply.startswith(expect), (cmd, reply)
        if cmd.startswith(b"EHLO"):
            assert b"STARTTLS" not in reply
    sock.close()
    line = sub.wait_new_log(mark, r"smtp\.transaction .*proxied\.test")
    assert "client=203.0.113.9:40000" in line and "tls=" in line


def test_implicit_listener_needs_a_certificate(tmp_path: Path) -> None:
    from ferrymail.config import ConfigError, parse_startup

    text = yaml.safe_dump({"servers": [server("s", [{"port": 465, "tls": "implicit"}])]})
    with pytest.raises(ConfigError, match=r"servers\[0\]\.listeners\[0\]\.tls: tls: implicit "
                                          r"needs the server's tls\.cert and tls\.key"):
        parse_startup(text, "startup.yaml")
    with pytest.raises(ConfigError, match="expected one of"):
        parse_startup(text.replace("implicit", "sometimes"), "startup.yaml")
