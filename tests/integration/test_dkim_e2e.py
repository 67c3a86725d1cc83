"""DKIM signing in a real ``ferrymail run``: mail goes in over SMTP, out to Postfix's
smtp-sink, and the dump smtp-sink wrote is verified, unchanged, by three verifiers: dkimpy,
authheaders and mailauth (Node.js, an implementation that shares no code with dkimpy).

One ferrymail process serves the module; each test picks the signing path by the From:
domain (``sign: from``), the envelope sender (``dkim.rules``) or the recipient domain (the
hook calls ``action.dkim_sign``).
"""

from __future__ import annotations

import smtplib
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import authheaders
import dkim as dkimpy
import pytest

from ferrymail.cli.dkim import generate
from ferrymail.config.dkim import key_from_pem
from tests.integration.conftest import (
    FerrymailProc,
    listener,
    server,
    start_ferrymail,
    startup_yaml,
)
from tests.nodepeers import mailauth_verify
from tests.realpeers import SinkDump, SmtpSink, free_port, smtp_sink

pytestmark = pytest.mark.timeout(90)

# (domain, selector, key type); both.test has both kinds and so gets two signatures
KEYS = [("rsa.test", "r1", "rsa"), ("ed.test", "e1", "ed25519"),
        ("both.test", "r2026", "rsa"), ("both.test", "e2026", "ed25519")]

HOOK = """
def predelivery(ctx, action):
    if ctx.recipients[0].endswith("@hook.test"):
        action.dkim_sign("ed.test", "e1")
    elif ctx.recipients[0].endswith("@badkey.test"):
        action.dkim_sign("ed.test", "nosuchselector")
"""


@dataclass
class Setup:
    fm: FerrymailProc
    port: int
    sink: SmtpSink
    records: dict[str, str]  # TXT name -> value, as DNS would publish them
    workdir: Path
    sink7: SmtpSink  # offers no 8BITMIME: 8-bit mail is converted to 7-bit for it

    def send(self, headers: str, body: bytes = b"hello\r\n", *, sender: str = "s@origin.test",
             rcpt: str = "r@dest.test", presign: bytes = b"") -> str:
        """Submit one message; returns the Message-ID that finds its dump."""
        msgid = f"<{uuid.uuid4()}@origin.test>"
        data = (textwrap.dedent(headers).strip().replace("\n", "\r\n")
                + f"\r\nMessage-ID: {msgid}\r\n\r\n").encode() + body
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as s:
            s.sendmail(sender, [rcpt], presign + data)
        return msgid

    def dump(self, msgid: str, timeout: float = 20.0, sink: SmtpSink | None = None
             ) -> SinkDump:
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for d in (sink or self.sink).dumps():
                if d.message.get("Message-ID") == msgid:
                    return d
            time.sleep(0.1)
        raise TimeoutError(f"{msgid} not delivered:\n{self.fm.log_text()}")

    def dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        value = self.records.get(name.decode().rstrip("."))
        return value.encode() if value else None


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("dkim-e2e")
    records: dict[str, str] = {}
    key_yaml = []
    for domain, selector, kind in KEYS:
        pem = generate(kind, 2048)
        path = workdir / f"{domain}.{selector}.pem"
        path.write_bytes(pem)
        records[f"{selector}._domainkey.{domain}"] = key_from_pem(pem).dns_record()
        key_yaml.append(f"    - {{domain: {domain}, selector: {selector}, key: {path}}}")
    # the client's own key, which ferrymail does not know
    client_pem = generate("rsa", 2048)
    records["c1._domainkey.client.test"] = key_from_pem(client_pem).dns_record()
    (workdir / "client.pem").write_bytes(client_pem)
    (workdir / "hook.py").write_text(HOOK)
    port = free_port()
    with smtp_sink() as sink, smtp_sink(extra=["-8"]) as sink7:  # -8: no 8BITMIME
        running = f"""
servers:
  - {{id: in, transport: sink, relay_networks: [127.0.0.0/8]}}
routing:
  - {{recipientdomain: seven.test, transport: sink7}}
scripting:
  hooks: {{predelivery: hook.py}}
transportgroups:
  - id: default
    retry: {{count: 3, intervals: [300]}}
    connection: {{server: 127.0.0.1, port: {sink.port}, tls: {{mode: disabled}}}}
    transports:
      - {{id: sink}}
      - {{id: sink7, connection: {{port: {sink7.port}}}}}
dkim:
  sign: from
  expire: 7d
  keys:
{chr(10).join(key_yaml)}
  rules:
    - {{senderdomain: rule.test, domain: both.test}}
    - {{senderdomain: nosign.test, domain: false}}
"""
        start = startup_yaml(workdir, [server("in", [listener(port)])])
        fm = start_ferrymail(workdir, start, running, wait=[("127.0.0.1", port)])
        try:
            yield Setup(fm, port, sink, records, workdir, sink7)
        finally:
            fm.kill()


def signatures(raw: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature field of ``raw``, top first."""
    headers, _ = dkimpy.rfc822_parse(raw)
    out = []
    for name, value in headers:
        if name.lower() == b"dkim-signature":
            out.append(dkimpy.util.parse_tag_value(value))
    return out


def verify_all(setup: Setup, raw: bytes) -> list[tuple[str, str, str]]:
    """Verify every signature of ``raw`` with dkimpy, authheaders and mailauth; return
    (d, s, a) of each. Fails the test on any verifier's failure."""
    sigs = signatures(raw)
    assert sigs, "no DKIM-Signature"
    d = dkimpy.DKIM(raw)
    for i in range(len(sigs)):
        assert d.verify(idx=i, dnsfunc=setup.dns), f"dkimpy: signature {i} fails"
    res = authheaders.authenticate_message(raw, "verifier.test", spf=False, dkim=True,
                                           arc=False, dmarc=False, dnsfunc=setup.dns)
    assert "dkim=pass" in res and "dkim=fail" not in res, res
    node = mailauth_verify(raw, setup.records)
    assert node is None or [r["result"] for r in node] == ["pass"] * len(sigs), node
    return [(s[b"d"].decode(), s[b"s"].decode(), s[b"a"].decode()) for s in sigs]


def test_rsa_signature_verifies_after_smtp_sink(setup: Setup) -> None:
    msgid = setup.send("From: Alice <alice@rsa.test>\nTo: bob@dest.test\nSubject: rsa")
    dump = setup.dump(msgid)
    assert verify_all(setup, dump.raw) == [("rsa.test", "r1", "rsa-sha256")]
    sig = signatures(dump.raw)[0]
    assert sig[b"c"] == b"relaxed/relaxed"
    assert int(sig[b"x"]) - int(sig[b"t"]) == 7 * 86400
    h = [x.strip() for x in sig[b"h"].decode().split(":")]
    # present once and signed once more (oversigning): nobody can add another
    for name in ("from", "to", "subject"):
        assert h.count(name) == 2, h
    assert "message-id" in h
    setup.fm.wait_log(r"delivery\.attempt .*dkim=rsa\.test/r1/rsa", 10)
    # the verifiers can fail: one changed body octet
    tampered = dump.raw.replace(b"\nhello", b"\nHello")
    node = mailauth_verify(tampered, setup.records)
    assert node is None or [r["result"] for r in node] != ["pass"]
    with pytest.raises(dkimpy.ValidationError, match="body hash mismatch"):
        dkimpy.DKIM(tampered).verify(dnsfunc=setup.dns)


def test_ed25519_signature_verifies(setup: Setup) -> None:
    msgid = setup.send("From: e@ed.test\nTo: bob@dest.test\nSubject: ed25519")
    assert verify_all(setup, setup.dump(msgid).raw) == [("ed.test", "e1", "ed25519-sha256")]


def test_rsa_and_ed25519_at_once_with_awkward_body(setup: Setup) -> None:
    body = (b"trailing spaces   \r\ntrailing tab\t\r\n\r\n  leading and  inner   spaces\r\n"
            + b"L" * 998 + b"\r\n" + (b"word " * 199 + b"end") + b"\r\n"
            + b".starts with a dot\r\n\r\n\r\n\r\n")
    msgid = setup.send("From: b@both.test\nTo: bob@dest.test\nSubject: both kinds",
                       body=body)
    dump = setup.dump(msgid)
    # smtp-sink writes the file with local (LF) line endings; verified as it is
    assert body.replace(b"\r\n", b"\n") in dump.raw
    assert sorted(verify_all(setup, dump.raw)) == [("both.test", "e2026", "ed25519-sha256"),
                                                   ("both.test", "r2026", "rsa-sha256")]


def test_client_signature_stays_valid(setup: Setup) -> None:
    headers = "From: c@client.test\nTo: bob@dest.test\nSubject: signed by the client"
    msgid = f"<{uuid.uuid4()}@client.test>"
    data = (headers.replace("\n", "\r\n") + f"\r\nMessage-ID: {msgid}\r\n\r\n").encode() \
        + b"client body  \r\n"
    client_sig = dkimpy.sign(data, b"c1", b"client.test", (setup.workdir / "client.pem")
                             .read_bytes(), canonicalize=(b"relaxed", b"simple"))
    with smtplib.SMTP("127.0.0.1", setup.port, timeout=10) as s:
        s.sendmail("s@rule.test", ["r@dest.test"], client_sig + data)  # rule: both.test signs
    dump = setup.dump(msgid)
    found = verify_all(setup, dump.raw)
    assert ("client.test", "c1", "rsa-sha256") in found
    assert {d for d, _, _ in found} == {"client.test", "both.test"}


def test_hook_chooses_the_key(setup: Setup) -> None:
    msgid = setup.send("From: a@rsa.test\nTo: x@hook.test\nSubject: hook", rcpt="x@hook.test")
    assert verify_all(setup, setup.dump(msgid).raw) == [("ed.test", "e1", "ed25519-sha256")]


def test_unknown_hook_key_defers_and_unmatched_domains_go_unsigned(setup: Setup) -> None:
    setup.send("From: a@rsa.test\nSubject: bad key", rcpt="x@badkey.test")
    line = setup.fm.wait_log(r"delivery\.error.*x@badkey\.test", 20)[0]
    assert "nosuchselector" in line and "temporary=true" in line
    plain = setup.send("From: a@elsewhere.test\nSubject: no key")
    nosign = setup.send("From: a@rsa.test\nSubject: rule says no", sender="s@nosign.test")
    assert signatures(setup.dump(plain).raw) == []
    assert signatures(setup.dump(nosign).raw) == []


def test_signature_covers_the_7bit_conversion(setup: Setup) -> None:
    """8-bit mail to a server without 8BITMIME is converted first, then signed."""
    body = "Grüße aus Köln — trailing space \r\n".encode() * 3
    msgid = setup.send("From: b@both.test\nTo: x@seven.test\nSubject: eight bit\n"
                       "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
                       "Content-Transfer-Encoding: 8bit", body=body, rcpt="x@seven.test")
    dump = setup.dump(msgid, sink=setup.sink7)
    assert dump.raw.isascii() and b"quoted-printable" in dump.raw.lower()
    assert sorted(verify_all(setup, dump.raw)) == [("both.test", "e2026", "ed25519-sha256"),
                                                   ("both.test", "r2026", "rsa-sha256")]


def test_mailauth_available() -> None:
    """The independent verifier ran in the tests above (else this skips, saying why)."""
    from tests.nodepeers import node_packages

    assert (node_packages() / "node_modules" / "mailauth").is_dir()


def test_key_rotation_by_reload_and_a_broken_key_kept_out(setup: Setup) -> None:
    """A new selector takes effect at the next attempt after SIGHUP; a broken key file
    makes the reload fail (file, line, key path logged) and the keys in use stay."""
    running = setup.fm.running_path
    assert running is not None
    before = running.read_text()
    pem = generate("ed25519", 0)
    (setup.workdir / "rsa.test.r2.pem").write_bytes(pem)
    setup.records["r2._domainkey.rsa.test"] = key_from_pem(pem).dns_record()
    try:
        running.write_text(before.replace(
            f"{{domain: rsa.test, selector: r1, key: {setup.workdir}/rsa.test.r1.pem}}",
            "{domain: rsa.test, selector: r2, key: rsa.test.r2.pem}"))  # relative to the file
        n = len(setup.fm.logs())
        setup.fm.reload()
        setup.fm.wait_log(r"config\.reloaded", 10, count=1 + sum(
            "config.reloaded" in x for x in setup.fm.logs()[:n]))
        msgid = setup.send("From: a@rsa.test\nSubject: rotated")
        assert verify_all(setup, setup.dump(msgid).raw) == [("rsa.test", "r2",
                                                             "ed25519-sha256")]
        (setup.workdir / "rsa.test.r2.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nxx\n")
        setup.fm.reload()
        line = setup.fm.wait_log(r"config\.reload_failed .*dkim\.keys\[0\]\.key", 10)[0]
        assert "not a PEM private key" in line
        msgid = setup.send("From: a@rsa.test\nSubject: still r2")
        assert verify_all(setup, setup.dump(msgid).raw) == [("rsa.test", "r2",
                                                             "ed25519-sha256")]
    finally:
        running.write_text(before)
        setup.fm.reload()


def test_large_spooled_body_is_signed_in_chunks(setup: Setup) -> None:
    """A body over the spool's SPILL_AT lives in a file; it is hashed and sent in chunks."""
    from ferrymail.spool.body import SPILL_AT

    body = b"".join(b"line %06d  with trailing blanks \t \r\n" % i
                    for i in range(2 * SPILL_AT // 30)) + b"\r\n\r\n"
    assert len(body) > SPILL_AT
    msgid = setup.send("From: b@both.test\nTo: bob@dest.test\nSubject: large", body=body)
    dump = setup.dump(msgid)
    assert body.replace(b"\r\n", b"\n").rstrip(b"\n") in dump.raw
    assert sorted(verify_all(setup, dump.raw)) == [("both.test", "e2026", "ed25519-sha256"),
                                                   ("both.test", "r2026", "rsa-sha256")]
