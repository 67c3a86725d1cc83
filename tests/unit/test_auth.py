"""SMTP AUTH: the sans-IO exchange and session states, credentials files, hashes, the
failure limiter."""

from __future__ import annotations

import asyncio
from base64 import b64encode
from pathlib import Path

import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.auth import FailureLimiter, check_password, hash_password, verify
from ferrymail.config import ConfigError, parse_running
from ferrymail.config.auth import parse_credentials
from ferrymail.smtp.auth import AuthExchange, Challenge, Credentials, Refused
from ferrymail.smtp.protocol import ReplyParser
from ferrymail.smtp.session import (
    Authenticate,
    Deliver,
    ServerSession,
    SessionLimits,
    SessionSettings,
)


def b64(text: str | bytes) -> str:
    return b64encode(text.encode() if isinstance(text, str) else text).decode()


# --------------------------------------------------------------------------- exchange


def test_plain_with_initial_response() -> None:
    ex, step = AuthExchange.start("PLAIN " + b64("\0alice\0s3cret"))
    assert ex is None and step == Credentials("PLAIN", "alice", "s3cret")
    _, step = AuthExchange.start("plain " + b64("alice\0alice\0pw"))
    assert step == Credentials("PLAIN", "alice", "pw")


def test_plain_with_challenge_and_login() -> None:
    ex, step = AuthExchange.start("PLAIN")
    assert step == Challenge(b"334 \r\n") and ex is not None
    assert ex.feed(b64("\0bob\0pw").encode()) == (None, Credentials("PLAIN", "bob", "pw"))
    ex, step = AuthExchange.start("LOGIN")
    assert step == Challenge(b"334 VXNlcm5hbWU6\r\n") and ex is not None
    ex2, step = ex.feed(b64("bob").encode())
    assert step == Challenge(b"334 UGFzc3dvcmQ6\r\n") and ex2 is ex
    assert ex.feed(b64("pä ss").encode()) == (None, Credentials("LOGIN", "bob", "pä ss"))
    ex, step = AuthExchange.start("LOGIN " + b64("carol"))  # initial response = user name
    assert step == Challenge(b"334 UGFzc3dvcmQ6\r\n")


@pytest.mark.parametrize("arg,lines,code", [
    ("CRAM-MD5", [], b"504"),
    ("", [], b"501"),
    ("PLAIN a b", [], b"501"),
    ("PLAIN !!notbase64", [], b"501"),
    ("PLAIN =", [], b"535"),  # an empty initial response is no credentials
    ("PLAIN " + b64("only-one-part"), [], b"535"),
    ("PLAIN " + b64("mallory\0alice\0pw"), [], b"535"),  # another authorization identity
    ("PLAIN " + b64(b"\0\xff\0pw"), [], b"535"),  # not UTF-8
    ("LOGIN", [b"*"], b"501"),  # cancelled
    ("LOGIN", [b64("u").encode(), b"%%%"], b"501"),
])
def test_refusals(arg: str, lines: list[bytes], code: bytes) -> None:
    ex, step = AuthExchange.start(arg)
    for line in lines:
        assert ex is not None
        ex, step = ex.feed(line)
    assert ex is None and isinstance(step, Refused) and step.reply.startswith(code), step


@given(st.binary(max_size=300))
def test_exchange_never_raises(data: bytes) -> None:
    for mech in ("PLAIN", "LOGIN"):
        ex, step = AuthExchange.start(mech)
        for line in (data, data[::-1], b"x"):
            if ex is None:
                break
            ex, step = ex.feed(line)
        assert isinstance(step, Challenge | Credentials | Refused)


# --------------------------------------------------------------------------- session


def session(*, tls: bool = True, auth: bool = True, required: bool = False,
            errors: int = 10) -> ServerSession:
    cfg = SessionSettings("mx.test", SessionLimits(errors=errors), starttls=True)
    return ServerSession(cfg, lambda domain, ip: domain == "example.com", "192.0.2.7",
                         tls=tls, auth=auth, auth_required=required)


def codes(s: ServerSession) -> list[int]:
    return [r.code for r in ReplyParser().feed(s.take_output())]


def test_ehlo_offers_auth_only_under_tls() -> None:
    s = session()
    s.receive(b"EHLO c\r\n")
    assert b"250 AUTH PLAIN LOGIN\r\n" in s.take_output()
    s = session(tls=False)
    s.receive(b"EHLO c\r\n")
    assert b"AUTH" not in s.take_output()
    s.receive(b"AUTH PLAIN " + b64("\0a\0b").encode() + b"\r\n")
    assert s.take_output().startswith(b"538 5.7.11")
    s = session(auth=False)
    s.receive(b"EHLO c\r\nAUTH PLAIN\r\n")
    assert codes(s) == [250, 502]


def test_authenticated_client_relays_and_protocol_says_esmtpsa() -> None:
    s = session()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@elsewhere.test>\r\nRSET\r\n")
    assert codes(s) == [250, 250, 554, 250]
    event = s.receive(b"AUTH LOGIN\r\n")
    assert event is None and codes(s) == [334]
    s.receive(b64("alice").encode() + b"\r\n")
    assert codes(s) == [334]
    event = s.receive(b64("pw").encode() + b"\r\nMAIL FROM:<a@x.test>\r\n")
    assert isinstance(event, Authenticate) and s.busy
    assert event.credentials == Credentials("LOGIN", "alice", "pw")
    s.finish_auth("alice", b"235 2.7.0 ok\r\n")
    s.step()  # the pipelined MAIL waited for the verdict
    assert codes(s) == [235, 250]
    s.receive(b"RCPT TO:<r@elsewhere.test>\r\nDATA\r\n")
    assert codes(s) == [250, 354]
    event = s.receive(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert isinstance(event, Deliver)
    assert event.transaction.auth == "alice" and event.transaction.protocol == "ESMTPSA"
    s.finish_delivery(b"250 ok\r\n", queued=True)
    s.receive(b"AUTH PLAIN\r\n")
    assert codes(s) == [250, 503]  # already authenticated


def test_failed_auth_counts_as_an_error_and_required_blocks_mail() -> None:
    s = session(required=True, errors=3)
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n")
    assert codes(s) == [250, 530]
    for _ in range(2):
        event = s.receive(b"AUTH PLAIN " + b64("\0a\0wrong").encode() + b"\r\n")
        assert isinstance(event, Authenticate)
        s.finish_auth(None, b"535 5.7.8 no\r\n")
    assert s.closed and codes(s) == [535, 535, 421]
    plain = session(tls=False, required=True)
    plain.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n")
    assert codes(plain) == [250, 530]


def test_auth_in_transaction_and_before_ehlo() -> None:
    s = session()
    s.receive(b"AUTH PLAIN\r\nEHLO c\r\nMAIL FROM:<a@x.test>\r\nAUTH PLAIN\r\n")
    assert codes(s) == [503, 250, 250, 503]


def test_tls_started_forgets_authentication() -> None:
    s = session()
    s.auth_user = "alice"
    s.tls_started()
    assert s.auth_user is None


# --------------------------------------------------------------------------- credentials


def test_credentials_file_and_hashes(tmp_path: Path) -> None:
    argon = hash_password("correct horse")
    bc = bcrypt.hashpw(b"battery staple", bcrypt.gensalt(rounds=4)).decode()
    creds = parse_credentials(f"# users\n\nalice:{argon}\nbob@example.org : {bc}\n", "u")
    assert set(creds.users) == {"alice", "bob@example.org"}
    assert check_password(creds.users["alice"], "correct horse")
    assert not check_password(creds.users["alice"], "wrong")
    assert check_password(creds.users["bob@example.org"], "battery staple")
    assert not check_password(creds.users["bob@example.org"], "battery")
    assert asyncio.run(verify(creds, "alice", "correct horse"))
    assert not asyncio.run(verify(creds, "nobody", "correct horse"))


@pytest.mark.parametrize("line,expect", [
    ("alice", "u:2: expected user:hash"),
    (":$argon2id$x", "u:2: expected user:hash"),
    ("alice:plaintext", "neither argon2"),
    ("alice:$1$md5crypt$abc", "neither argon2"),
])
def test_bad_credentials_lines(line: str, expect: str) -> None:
    with pytest.raises(ValueError, match=expect):
        parse_credentials(f"# header\n{line}\n", "u")
    argon = hash_password("x")
    with pytest.raises(ValueError, match="u:2: user 'a' appears twice"):
        parse_credentials(f"a:{argon}\na:{argon}\n", "u")


def test_auth_config_errors_name_the_key(tmp_path: Path) -> None:
    base = "transportgroups: [{id: g, transports: [{id: t}]}]\nservers:\n  - id: in\n" \
           "    transport: t\n    auth:\n"
    with pytest.raises(ConfigError, match=r"run\.yaml:6: servers\[0\]\.auth\.users: cannot "
                                          r"read .*nope"):
        parse_running(base + f"      users: {tmp_path}/nope\n", "run.yaml")
    bad = tmp_path / "users"
    bad.write_text("alice:secret\n")
    with pytest.raises(ConfigError, match=r"servers\[0\]\.auth\.users: .*users:1: the hash"):
        parse_running(base + f"      users: {bad}\n", "run.yaml")
    good = tmp_path / "ok"
    good.write_text(f"alice:{hash_password('pw')}\n")
    cfg = parse_running(base + f"      users: {good}\n      failures: 3\n      window: 1m\n")
    auth = cfg.server("in").auth
    assert auth is not None and auth.failures == 3 and auth.window == 60
    assert list(auth.users.users) == ["alice"]


# --------------------------------------------------------------------------- limiter


def test_limiter_window() -> None:
    now = [1000.0]
    lim = FailureLimiter(clock=lambda: now[0])
    assert not lim.limited("a", 3, 60)
    for n in (1, 2, 3):
        assert lim.failed("a", 60) == n
    assert lim.limited("a", 3, 60) and not lim.limited("b", 3, 60)
    now[0] += 59
    assert lim.limited("a", 3, 60)
    now[0] += 2
    assert not lim.limited("a", 3, 60)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 30)), max_size=60),
       st.integers(1, 5), st.floats(1, 100))
def test_limiter_matches_a_naive_count(events: list[tuple[str, float]], limit: int,
                                       window: float) -> None:
    """limited() is true exactly when >= limit failures happened within the last window."""
    now = [0.0]
    lim = FailureLimiter(clock=lambda: now[0])
    history: list[tuple[str, float]] = []
    for ip, step in events:
        now[0] += step
        expect = sum(1 for i, t in history if i == ip and t > now[0] - window) >= limit
        assert lim.limited(ip, limit, window) == expect
        lim.failed(ip, window)
        history.append((ip, now[0]))


def test_envelope_keeps_the_authenticated_user() -> None:
    import json

    from ferrymail.spool import Envelope
    from ferrymail.spool.sqlite import envelope_from_json, envelope_to_json

    env = Envelope(sender="a@x.test", recipients=("b@y.test",), client_ip="192.0.2.1",
                   client_port=1, helo="h", server_id="in", auth="alice")
    assert envelope_from_json(envelope_to_json(env)).auth == "alice"
    old = json.loads(envelope_to_json(env))
    del old["auth"]  # stored by a version without AUTH
    assert envelope_from_json(json.dumps(old)).auth is None


def test_auth_needs_a_tls_server(tmp_path: Path) -> None:
    from ferrymail.config import cross_check, parse_startup

    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('pw')}\n")
    running = parse_running(
        "transportgroups: [{id: g, transports: [{id: t}]}]\n"
        f"servers:\n  - id: in\n    transport: t\n    auth: {{users: {users}}}\n", "run.yaml")
    startup = parse_startup("servers: [{id: in, listeners: [{port: 2525}]}]\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:5: servers\[0\]\.auth: AUTH is offered "
                                          r"only under TLS"):
        cross_check(startup, running, "run.yaml")


def test_auth_hash_cli() -> None:
    import subprocess
    import sys

    def run(user: str, stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ferrymail.cli", "auth", "hash", user],
                              input=stdin, capture_output=True, text=True, timeout=60)

    p = run("alice@example.org", "s3cret pw\n")
    assert p.returncode == 0, p.stderr
    creds = parse_credentials(p.stdout, "out")
    assert check_password(creds.users["alice@example.org"], "s3cret pw")
    assert run("a:b", "pw\n").returncode == 1
    assert run("alice", "\n").returncode == 1


def test_routed_recipients_only_for_trusted_or_authenticated_clients() -> None:
    s = session()
    s.receive(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<u%other.test@example.com>\r\nRSET\r\n")
    assert codes(s)[2] >= 500  # routed, from an untrusted client
    s.receive(b"AUTH PLAIN " + b64("\0alice\0pw").encode() + b"\r\n")
    s.finish_auth("alice", b"235 2.7.0 ok\r\n")
    s.take_output()
    s.receive(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<u%other.test@example.com>\r\n")
    assert codes(s) == [250, 250]


def test_password_not_in_repr() -> None:
    cred = Credentials("PLAIN", "alice", "hunter2")
    assert "hunter2" not in repr(cred) and "hunter2" not in repr(Authenticate(cred))


def test_limiter_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import ferrymail.auth as authmod

    monkeypatch.setattr(authmod, "MAX_TRACKED", 3)
    lim = FailureLimiter(clock=lambda: 0.0)
    for ip in ("a", "b", "c", "a", "d"):  # "a" used again: "b" is now the oldest
        lim.failed(ip, 60)
    assert lim.limited("a", 2, 60) and not lim.limited("b", 1, 60)
    assert lim.limited("c", 1, 60) and lim.limited("d", 1, 60)
