"""DKIM: key loading and config errors, the choice of signing domain, the signatures made."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferrymail.cli.dkim import generate, txt_record
from ferrymail.config import ConfigError, load_running, parse_running
from ferrymail.config.dkim import Dkim, key_from_pem
from ferrymail.dkim import DkimSigner, from_domain
from ferrymail.hooks import Action

BASE = """\
servers: [{id: in, transport: t}]
transportgroups: [{id: g, transports: [{id: t}]}]
"""

MSG = b"From: A <a@Example.ORG>\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name, kind in (("rsa", "rsa"), ("ed", "ed25519"), ("rsa2", "rsa")):
        out[name] = d / f"{name}.pem"
        out[name].write_bytes(generate(kind, 2048))
    return out


def dns_for(cfg: Dkim):
    recs = {f"{k.selector}._domainkey.{k.domain}".encode(): k.key.dns_record().encode()
            for k in cfg.keys}
    return lambda name, timeout=5: recs.get(name.rstrip(b"."))


def cfg_of(keys: dict[str, Path], **extra: object) -> Dkim:
    return Dkim.model_validate({"keys": [
        {"domain": "example.org", "selector": "r", "key": str(keys["rsa"])},
        {"domain": "example.org", "selector": "e", "key": str(keys["ed"])},
        {"domain": "other.test", "selector": "o", "key": str(keys["rsa2"])},
    ], **extra})


def valid(cfg: Dkim, raw: bytes, idx: int = 0) -> bool:
    try:
        return bool(dkimpy.DKIM(raw).verify(idx=idx, dnsfunc=dns_for(cfg)))
    except dkimpy.DKIMException:
        return False


def verify(cfg: Dkim, raw: bytes, n: int) -> None:
    for i in range(n):
        assert valid(cfg, raw, i), i


# --------------------------------------------------------------------------- config errors


def load_error(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_running(BASE + text, "run.yaml")
    return str(exc.value)


def test_missing_key_file_is_a_config_error_with_line(tmp_path: Path) -> None:
    msg = load_error(f"dkim:\n  keys:\n    - domain: example.org\n      selector: s\n"
                     f"      key: {tmp_path}/nope.pem\n")
    assert msg.startswith("run.yaml:7: dkim.keys[0].key: cannot read"), msg
    assert "No such file" in msg


@pytest.mark.parametrize("content,expect", [
    (b"not a key", "not a PEM private key"),
    ("ec", "DKIM keys are RSA or Ed25519"),
    ("rsa768", "RSA key has 768 bits"),
    ("encrypted", "encrypted"),
])
def test_broken_keys_are_config_errors(tmp_path: Path, content: object, expect: str) -> None:
    if content == "ec":
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
    elif content == "rsa768":  # cryptography will not make one; openssl still does
        pem = subprocess.run(["openssl", "genrsa", "768"], capture_output=True,
                             check=True).stdout
    elif content == "encrypted":
        pem = rsa.generate_private_key(65537, 1024).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"))
    else:
        pem = content  # type: ignore[assignment]
    path = tmp_path / "k.pem"
    path.write_bytes(pem)  # type: ignore[arg-type]
    msg = load_error(f"dkim:\n  keys:\n    - {{domain: example.org, selector: s, key: {path}}}\n")
    assert "run.yaml:5: dkim.keys[0].key:" in msg and expect in msg, msg


def test_cross_checks(keys: dict[str, Path]) -> None:
    msg = load_error(f"dkim:\n  keys:\n    - {{domain: a.test, selector: s, key: {keys['rsa']}}}\n"
                     f"    - {{domain: A.test, selector: s, key: {keys['ed']}}}\n"
                     f"  rules:\n    - {{senderdomain: x.test, domain: b.test}}\n")
    assert "run.yaml:6: dkim.keys[1].selector: selector 's' of a.test is also dkim.keys[0]" in msg
    assert "run.yaml:8: dkim.rules[0].domain: no dkim.keys entry for b.test" in msg


@pytest.mark.parametrize("text,expect", [
    ("dkim: {headers: [to, subject]}", "must include from"),
    ("dkim: {headers: [from, received]}", "received changes in transit"),
    ("dkim: {oversign: ['bad name']}", "expected header field names"),
    ("dkim: {sign: always}", "expected one of"),
    ("dkim: {keys: [{domain: '*.x.test', selector: s, key: k}]}", "expected a domain name"),
    ("dkim: {keys: [{domain: x.test, selector: 'a b', key: k}]}", "expected a DKIM selector"),
])
def test_bad_values(text: str, expect: str) -> None:
    assert expect in load_error(text + "\n")


def test_key_formats_and_dns_record(keys: dict[str, Path]) -> None:
    rsa_key = key_from_pem(keys["rsa"].read_bytes())
    assert (rsa_key.algorithm, rsa_key.bits) == ("rsa-sha256", 2048)
    assert rsa_key.dns_record().startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    ed = key_from_pem(keys["ed"].read_bytes())
    assert ed.algorithm == "ed25519-sha256"
    assert ed.dns_record().startswith("v=DKIM1; k=ed25519; p=") and len(ed.public) == 44
    # PKCS#1 ("BEGIN RSA PRIVATE KEY") as written by older openssl works too
    pkcs1 = serialization.load_pem_private_key(keys["rsa"].read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    assert key_from_pem(pkcs1).public == rsa_key.public
    record = txt_record("example.org", "s", rsa_key.dns_record())
    assert record.startswith('s._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    assert all(len(part) <= 255 for part in record.split('"')[1::2])


# --------------------------------------------------------------------------- signing


def test_from_domain_signs_with_every_key_of_the_domain(keys: dict[str, Path]) -> None:
    cfg = cfg_of(keys)
    sigs = DkimSigner(cfg).sign(MSG)
    assert [s.label for s in sigs] == ["example.org/r/rsa", "example.org/e/ed25519"]
    raw = b"".join(s.header for s in sigs) + MSG
    verify(cfg, raw, 2)
    tampered = raw.replace(b"body", b"bodY")
    assert not valid(cfg, tampered) and not valid(cfg, tampered, 1)


def test_oversigning_blocks_an_added_header(keys: dict[str, Path]) -> None:
    cfg = cfg_of(keys)
    sigs = DkimSigner(cfg).sign(MSG)
    raw = b"".join(s.header for s in sigs) + MSG
    h = dkimpy.util.parse_tag_value(sigs[0].header.split(b":", 1)[1])[b"h"]
    assert [x.strip() for x in h.split(b":")].count(b"from") == 2
    added = raw.replace(b"To: b@example.net\r\n", b"To: b@example.net\r\nSubject: evil\r\n")
    assert not valid(cfg, added)
    # a header not in the message is still oversigned: adding a Cc is fine, a To is not
    msg = MSG.replace(b"To: b@example.net\r\n", b"")
    raw = b"".join(s.header for s in DkimSigner(cfg).sign(msg)) + msg
    assert valid(cfg, raw)
    assert valid(cfg, raw.replace(b"Subject", b"Cc: x@y.test\r\nSubject"))
    assert not valid(cfg, raw.replace(b"Subject", b"To: x@y.test\r\nSubject"))


def test_choice_rules_hook_and_off(keys: dict[str, Path]) -> None:
    cfg = cfg_of(keys, rules=[{"senderdomain": "bulk.test", "server": "in", "domain": "other.test"},
                              {"senderdomain": "*.quiet.test", "domain": False}])
    s = DkimSigner(cfg)
    assert [x.label for x in s.sign(MSG, sender="x@bulk.test", server_id="in")] == [
        "other.test/o/rsa"]
    assert [x.label for x in s.sign(MSG, sender="x@bulk.test", server_id="out")] == [
        "example.org/r/rsa", "example.org/e/ed25519"]
    assert s.sign(MSG, sender="x@a.quiet.test") == []
    assert [x.label for x in s.sign(MSG, requested=[("other.test", "o")])] == [
        "other.test/o/rsa"]
    with pytest.raises(KeyError, match="no such key"):
        s.sign(MSG, requested=[("other.test", "nope")])
    assert s.sign(MSG.replace(b"Example.ORG", b"nokeys.test")) == []
    off = DkimSigner(cfg_of(keys, sign="off"))
    assert off.sign(MSG) == []
    assert [x.label for x in off.sign(MSG, requested=[("example.org", "e")])] == [
        "example.org/e/ed25519"]


def test_never_signs_twice_with_the_same_key(keys: dict[str, Path]) -> None:
    cfg = cfg_of(keys)
    first = b"".join(s.header for s in DkimSigner(cfg).sign(MSG)) + MSG
    assert DkimSigner(cfg).sign(first) == []  # a loop through another ferrymail


def test_hook_action_dkim_sign() -> None:
    action = Action()
    action.dkim_sign("Example.ORG.", "r")
    action.try_(port=2525)
    action.dkim_sign("example.org", "e")
    decision = action._close()
    assert decision.action == "try" and decision.port == 2525
    assert decision.dkim == (("example.org", "r"), ("example.org", "e"))
    with pytest.raises(TypeError):
        Action().dkim_sign("example.org", "")


def test_from_domain_parsing() -> None:
    assert from_domain([(b"From", b' "Doe, J" <j@Mail.Example.COM.>')]) == "mail.example.com"
    assert from_domain([(b"From", b" undisclosed")]) is None
    assert from_domain([(b"To", b" a@b.c")]) is None


_line = st.text(st.sampled_from("ab \t.xyz"), max_size=300).map(lambda t: t.encode())


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, max_size=12), trailing=st.integers(0, 3))
def test_any_body_verifies(keys: dict[str, Path], lines: list[bytes], trailing: int) -> None:
    """Whitespace runs, trailing blanks, empty lines, long lines, empty bodies."""
    cfg = cfg_of(keys)
    msg = MSG.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + b"".join(x + b"\r\n" for x in lines) \
        + b"\r\n" * trailing
    sigs = DkimSigner(cfg).sign(msg)
    verify(cfg, b"".join(s.header for s in sigs) + msg, 2)


def test_keygen_cli(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ferrymail.cli", "dkim", "keygen", *args],
                              capture_output=True, text=True, timeout=60)

    p = run("Example.org", "s2026", "--dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    path = tmp_path / "example.org.s2026.pem"
    assert path.stat().st_mode & 0o777 == 0o600
    key = key_from_pem(path.read_bytes())
    assert key.bits == 2048
    joined = "".join(p.stdout.split('"')[1::2])
    assert p.stdout.startswith("s2026._domainkey.example.org. IN TXT") and \
        joined == key.dns_record()
    p = run("example.org", "e1", "--type", "ed25519", "--dir", str(tmp_path))
    assert p.returncode == 0 and "k=ed25519" in p.stdout
    again = run("example.org", "e1", "--type", "ed25519", "--dir", str(tmp_path))
    assert again.returncode == 1 and "exists" in again.stderr
    assert run("not a domain", "s", "--dir", str(tmp_path)).returncode == 1


def test_openssl_rsa_signature_equals_dkimpys_own(keys: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """PKCS#1 v1.5 is deterministic: OpenSSL's signature must be dkimpy's, byte for byte."""
    import ferrymail.dkim as fdkim

    monkeypatch.setattr(dkimpy.time, "time", lambda: 1796000000.0)
    cfg = cfg_of(keys, expire="1h")
    fast = DkimSigner(cfg).sign(MSG)[0].header
    monkeypatch.setattr(fdkim, "_OpenSSLRSA", lambda key: None)  # dkimpy's pure-Python RSA
    slow = DkimSigner(cfg).sign(MSG)[0].header
    assert b"a=rsa-sha256" in fast and b"x=1796003600" in fast
    assert fast == slow


def test_example_dkim_hook_chooses_keys() -> None:
    import asyncio

    from ferrymail.hooks import HookContext, PredeliveryHook

    examples = Path(__file__).resolve().parents[2] / "examples"
    hook = PredeliveryHook.load("hooks/dkim_by_sender.py", timeout=5, base_dir=examples)

    def ctx(sender: str, auth: str = "") -> HookContext:
        return HookContext(queue_id="q", sender=sender, recipients=("r@x.test",),
                           transport="mx", retry=0, auth=auth)

    both = (("example.org", "s2026"), ("example.org", "e2026"))
    assert asyncio.run(hook(ctx("a@news.example.org"))).dkim == both
    assert asyncio.run(hook(ctx("a@other.test", auth="u@shop.example.net"))).dkim == both
    assert asyncio.run(hook(ctx("a@other.test"))).dkim == ()
    # and the keys it names are the example's
    cfg = load_running(examples / "running-signing.yaml").dkim
    assert all(cfg.key(d, s) is not None for d, s in both)


_piece = st.sampled_from([b"a", b"b", b" ", b"\t", b"  ", b"\r\n", b"\r\n\r\n", b"\r", b"\n",
                          b".", b"xyz"])


@settings(max_examples=300, deadline=None)
@given(body=st.lists(_piece, max_size=40).map(b"".join), cuts=st.lists(st.integers(0, 200)))
def test_streamed_body_hash_equals_dkimpys(body: bytes, cuts: list[int]) -> None:
    """relaxed_body_hash over any chunking == dkimpy's relaxed canonicalisation of the
    bytes the wire carries (CRLF line endings as to_crlf gives, a CRLF at the end)."""
    import base64
    import hashlib

    from dkim.canonicalization import Relaxed

    from ferrymail.dkim import relaxed_body_hash
    from ferrymail.smtp.protocol import to_crlf

    wire = to_crlf(body)
    if wire and not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    expect = base64.b64encode(hashlib.sha256(Relaxed.canonicalize_body(wire)).digest())
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert relaxed_body_hash(chunks) == expect


def test_spooled_body_signed_in_chunks(keys: dict[str, Path], tmp_path: Path) -> None:
    from ferrymail.dkim import PrefixedBody
    from ferrymail.spool.body import SpooledBody

    cfg = cfg_of(keys)
    body = b"".join(b"line %d with  spaces \t\r\n" % i for i in range(40000)) + b"\r\n\r\n"
    msg = MSG.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    path = tmp_path / "body"
    path.write_bytes(msg)
    spooled = SpooledBody(path, len(msg))
    sigs = DkimSigner(cfg).sign(spooled)
    assert [s.label for s in sigs] == ["example.org/r/rsa", "example.org/e/ed25519"]
    sent = PrefixedBody(b"".join(s.header for s in sigs), spooled)
    raw = b"".join(sent.chunks(4096))
    assert len(sent) == len(raw) and raw.endswith(body) and sent.head(30) == raw[:30]
    verify(cfg, raw, 2)
    assert sigs == [s for s in sigs if s.header.startswith(b"DKIM-Signature:")]
    # the same signatures as for the bytes (t= aside)
    strip = re.compile(rb"t=\d+;|b=[^;]+$", re.S)
    assert [strip.sub(b"", s.header) for s in DkimSigner(cfg).sign(msg)] == \
        [strip.sub(b"", s.header) for s in sigs]
