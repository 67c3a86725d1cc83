"""Submission in a real ``ferrymail run``: implicit TLS listeners (RFC 8314) beside STARTTLS
ones, checked with swaks, openssl s_client and Python's ssl; SMTP AUTH (PLAIN, LOGIN) with
swaks, smtplib and nodemailer; mail relayed out to smtp-sink.

One ferrymail process serves the module: server ``sub`` listens on a STARTTLS port, an
implicit-TLS port and an implicit-TLS port behind a PROXY header. It relays only for
authenticated clients (no relay networks); it accepts example.com from anyone.
Rate-limit tests connect from their own 127.0.0.x address so that they limit only
themselves.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import subprocess
import time
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import yaml

from ferrymail.auth import hash_password
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


USERS = {"alice": "alice-pw", "bob@example.com": "bob-pw"}


def users_file(path: Path, users: dict[str, str]) -> None:
    """alice gets an argon2 hash, everyone else bcrypt (cheap rounds: tests)."""
    lines = ["# user:hash"]
    for user, pw in users.items():
        hashed = (hash_password(pw) if user == "alice"
                  else bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode())
        lines.append(f"{user}:{hashed}")
    path.write_text("\n".join(lines) + "\n")


def sub_running(sink_port: int, relay: list[str]) -> dict:
    return {
        "servers": [{"id": "sub", "transport": "out", "domains": ["example.com"],
                     "relay_networks": relay,
                     "auth": {"users": "users.txt", "failures": 3, "window": "10m"}}],
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
    users_file(work / "users.txt", USERS)
    with smtp_sink() as sink:
        running = yaml.safe_dump(sub_running(sink.port, []))
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
                        "--auth", "PLAIN", "--auth-user", "alice", "--auth-password",
                        "alice-pw", "--header", "Subject: implicit-swaks"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "TLS started" in p.stdout and "STARTTLS" not in p.stdout.split("EHLO")[1]
    line = sub.wait_new_log(mark, r"smtp\.transaction .*reply=\"250")
    assert "tls=\"TLSv1.3" in line and "auth=alice" in line
    dump = sub.wait_dump(b"Subject: implicit-swaks")
    assert b"with ESMTPSA id" in dump


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


# --------------------------------------------------------------------------- AUTH


def swaks_auth(sub: Sub, mech: str, user: str, password: str, *extra: str,
               tls: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("swaks"), "--server", HOST, "--port", str(sub.ports["starttls"]),
         *(["-tls"] if tls else []), "--auth", mech, "--auth-user", user,
         "--auth-password", password, "--from", "sender@origin.test", "--to",
         "r@dest.test", *extra], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("mech,user", [("PLAIN", "alice"), ("LOGIN", "bob@example.com")])
def test_swaks_auth_over_starttls_relays(sub: Sub, mech: str, user: str) -> None:
    mark = sub.mark()
    subject = f"swaks-{mech}"
    p = swaks_auth(sub, mech, user, USERS[user], "--header", f"Subject: {subject}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "235 2.7.0" in p.stdout
    auth = sub.wait_new_log(mark, r"event=smtp\.auth ")
    assert f"mechanism={mech}" in auth and f"user={user}" in auth and "result=ok" in auth
    txn = sub.wait_new_log(mark, r"smtp\.transaction .*reply=\"250")
    assert f"auth={user}" in txn
    dump = sub.wait_dump(f"Subject: {subject}".encode())
    assert b"with ESMTPSA id" in dump and b"(using TLSv1." in dump


def test_no_auth_without_tls_and_no_relay_without_auth(sub: Sub) -> None:
    p = swaks_auth(sub, "PLAIN", "alice", "alice-pw", tls=False)
    assert p.returncode != 0 and "235" not in p.stdout  # AUTH is not offered in clear
    with socket.create_connection((HOST, sub.ports["starttls"]), timeout=5) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO plain.test\r\n")
        ehlo = b""
        while not ehlo.endswith(b"\r\n") or ehlo.splitlines()[-1][3:4] != b" ":
            ehlo += f.readline()
        assert b"AUTH" not in ehlo and b"STARTTLS" in ehlo
        s.sendall(b"AUTH PLAIN " + b64encode(b"\0alice\0alice-pw") + b"\r\n")
        assert f.readline().startswith(b"538 5.7.11")
    with smtplib.SMTP(HOST, sub.ports["starttls"], timeout=10) as c:
        c.starttls(context=client_context())
        c.ehlo("noauth.test")
        assert c.mail("a@origin.test")[0] == 250
        assert c.rcpt("r@dest.test")[0] == 554  # no relaying for the unauthenticated
        assert c.rcpt("u@example.com")[0] == 250  # our own domain is fine


def test_wrong_password_gets_535_then_the_address_is_limited(sub: Sub) -> None:
    mark = sub.mark()
    source = ("127.0.0.57", 0)
    with smtplib.SMTP(HOST, sub.ports["starttls"], timeout=10, source_address=source) as c:
        c.starttls(context=client_context())
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            c.login("alice", "not-her-password")  # tries PLAIN, then LOGIN: two failures
        assert exc.value.smtp_code == 535
    with smtplib.SMTP(HOST, sub.ports["starttls"], timeout=10, source_address=source) as c:
        c.starttls(context=client_context())
        c.ehlo("third.test")
        code, _ = c.docmd("AUTH", "PLAIN " + b64encode(b"\0alice\0nope").decode())
        assert code == 535
    line = sub.wait_new_log(mark, r"smtp\.auth .*failures=3")
    assert "result=failed" in line and "client=127.0.0.57:" in line
    with smtplib.SMTP(HOST, sub.ports["starttls"], timeout=10, source_address=source) as c:
        c.starttls(context=client_context())
        c.ehlo("again.test")
        code, reply = c.docmd("AUTH", "PLAIN " + b64encode(b"\0alice\0alice-pw").decode())
        assert code == 454 and b"too many failed" in reply  # even the right password
    line = sub.wait_new_log(mark, r"smtp\.auth .*result=limited")
    assert "limited_total=1" in line
    # swaks, from yet another address, still gets a plain 535
    p = swaks_auth(sub, "LOGIN", "alice", "wrong", "--local-interface", "127.0.0.58")
    assert p.returncode != 0 and "535 5.7.8" in p.stdout
    # and another address is not limited
    with smtplib.SMTP(HOST, sub.ports["starttls"], timeout=10,
                      source_address=("127.0.0.59", 0)) as c:
        c.starttls(context=client_context())
        assert c.login("alice", "alice-pw")[0] == 235


def test_smtplib_login_and_sendmail(sub: Sub) -> None:
    for port, implicit in ((sub.ports["starttls"], False), (sub.ports["implicit"], True)):
        subject = f"smtplib-{'implicit' if implicit else 'starttls'}"
        if implicit:
            c: smtplib.SMTP = smtplib.SMTP_SSL(HOST, port, timeout=10,
                                               context=client_context())
        else:
            c = smtplib.SMTP(HOST, port, timeout=10)
            c.starttls(context=client_context())
        with c:
            code, _ = c.login("bob@example.com", "bob-pw")
            assert code == 235
            c.sendmail("bob@example.com", ["far@dest.test"],
                       f"Subject: {subject}\r\n\r\nvia smtplib\r\n")
        assert b"with ESMTPSA id" in sub.wait_dump(f"Subject: {subject}".encode())


NODEMAILER = r"""
import nodemailer from 'nodemailer';
const [port, secure, user, pass, subject] = process.argv.slice(2);
const t = nodemailer.createTransport({
  host: '127.0.0.1', port: Number(port), secure: secure === 'true', requireTLS: true,
  auth: { user, pass }, tls: { rejectUnauthorized: false } });
try {
  const info = await t.sendMail({ from: user.includes('@') ? user : 'n@origin.test',
    to: 'far@dest.test', subject, text: 'sent by nodemailer' });
  console.log('OK ' + info.response);
} catch (e) { console.log('ERR ' + e.responseCode + ' ' + e.message); process.exitCode = 1; }
"""


def test_nodemailer(sub: Sub) -> None:
    from tests.nodepeers import node_packages

    folder = node_packages()
    script = folder / "send.mjs"
    script.write_text(NODEMAILER)

    def send(port: int, secure: bool, password: str, subject: str) -> str:
        p = subprocess.run(["node", str(script), str(port), str(secure).lower(),
                            "bob@example.com", password, subject],
                           cwd=folder, capture_output=True, text=True, timeout=60)
        return p.stdout + p.stderr

    out = send(sub.ports["starttls"], False, "bob-pw", "nodemailer-starttls")
    assert out.startswith("OK 250"), out
    out = send(sub.ports["implicit"], True, "bob-pw", "nodemailer-implicit")
    assert out.startswith("OK 250"), out
    for subject in ("nodemailer-starttls", "nodemailer-implicit"):
        assert b"with ESMTPSA id" in sub.wait_dump(f"Subject: {subject}".encode())
    assert "ERR 535" in send(sub.ports["starttls"], False, "bad", "never")


def test_credentials_reload(sub: Sub) -> None:
    users_file(sub.workdir / "users.txt", {"alice": "alice-pw", "carol": "carol-pw"})
    try:
        mark = sub.mark()
        sub.fm.reload()
        sub.wait_new_log(mark, r"config\.reloaded")
        with smtplib.SMTP(HOST, sub.ports["starttls"], timeout=10,
                          source_address=("127.0.0.61", 0)) as c:
            c.starttls(context=client_context())
            assert c.login("carol", "carol-pw")[0] == 235
        with smtplib.SMTP(HOST, sub.ports["starttls"], timeout=10,
                          source_address=("127.0.0.61", 0)) as c:
            c.starttls(context=client_context())
            with pytest.raises(smtplib.SMTPAuthenticationError):
                c.login("bob@example.com", "bob-pw")  # removed
        # a broken file is refused at reload; the users loaded before stay
        (sub.workdir / "users.txt").write_text("carol:plaintext\n")
        mark = sub.mark()
        sub.fm.reload()
        line = sub.wait_new_log(mark, r"users\.txt:1: the hash")
        assert "servers[0].auth.users" in line
        with smtplib.SMTP(HOST, sub.ports["starttls"], timeout=10,
                          source_address=("127.0.0.62", 0)) as c:
            c.starttls(context=client_context())
            assert c.login("carol", "carol-pw")[0] == 235
    finally:
        users_file(sub.workdir / "users.txt", USERS)
        mark = sub.mark()
        sub.fm.reload()
        sub.wait_new_log(mark, r"config\.reloaded")


def test_implicit_tls_through_haproxy_send_proxy_v2(sub: Sub) -> None:
    """Port 465 behind the seed's kind of HAProxy (mode tcp, send-proxy-v2): TLS passes
    through, the client's address comes from the PROXY header, AUTH and relay work."""
    from tests.realpeers import haproxy

    front = free_port()
    config = f"""
global
    log stderr format raw local0 info
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend submissions
    bind {HOST}:{front}
    default_backend ferrymail
backend ferrymail
    server f1 {HOST}:{sub.ports['implicit_proxy']} send-proxy-v2
"""
    mark = sub.mark()
    with haproxy(config, [(HOST, front)]):
        p = subprocess.run([require("swaks"), "--server", HOST, "--port", str(front), "--tlsc",
                            "--local-interface", "127.0.0.71", "--auth", "LOGIN",
                            "--auth-user", "alice", "--auth-password", "alice-pw",
                            "--from", "alice@origin.test", "--to", "far@dest.test",
                            "--header", "Subject: via-haproxy-465"],
                           capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    line = sub.wait_new_log(mark, r"smtp\.transaction .*auth=alice")
    assert "client=127.0.0.71:" in line and "proxy_version=2" in line and "tls=" in line
    dump = sub.wait_dump(b"Subject: via-haproxy-465")
    assert b"(via PROXY v2 from 127.0.0.1)" in dump and b"with ESMTPSA id" in dump
