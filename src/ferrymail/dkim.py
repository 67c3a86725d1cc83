"""DKIM signing of outgoing mail (RFC 6376; Ed25519 by RFC 8463) with dkimpy.

``DkimSigner(config.dkim).sign(message, sender=..., server_id=..., requested=...)`` returns
the ``DKIM-Signature:`` header fields to put in front of the message (CRLF-terminated
bytes), one per key of the signing domain, so a domain with an RSA and an Ed25519 key gets
both signatures at once. Which domain signs, first match wins:

1. the pre-delivery hook's ``action.dkim_sign(domain, selector)`` calls (``requested``);
2. ``dkim.rules`` (by envelope sender domain and/or receiving server); ``domain: false``
   means do not sign;
3. ``dkim.sign: from``: the domain of the (first) ``From:`` address, if it has keys.

Canonicalisation is ``relaxed/relaxed``; the signed header list is every configured
header the message has (as often as it has it) plus one more ``from``/``to``/``subject``
each (oversigning, RFC 6376 §8.15); ``x=`` is ``t=`` plus ``dkim.expire`` when set.

Signing happens at delivery, on the copy being sent, after any 7-bit conversion for a
peer without 8BITMIME (``SMTPClient.send(prepare=...)``); the spooled message is never changed,
so a retried message is signed afresh (current keys, fresh ``t=``/``x=``) and never carries
two of our signatures. A key whose ``d=``/``s=`` already signed the message (a loop
through another ferrymail) is skipped for the same reason.

A body kept in a spool file (``SpooledBody``) is signed without reading it whole: the body
hash (``relaxed_body_hash``) is computed over its chunks, normalised as they go on the wire
(``stuffed_chunks``: CRLF line endings, a final CRLF), and the signature fields are sent
in front of the file's chunks (``PrefixedBody``). dkimpy then only hashes the header
section and signs; its ``bh=`` is replaced by ours.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ferrymail.config.dkim import Dkim, DkimKey
from ferrymail.smtp.protocol import to_crlf
from ferrymail.spool.body import SpooledBody

MAX_HEADER_SECTION = 1 << 20  # a header section longer than this is not signed
_WSP_EOL = re.compile(rb"[ \t]+\r\n")
_WSP_RUN = re.compile(rb"[ \t]+")

_CANON = (b"relaxed", b"relaxed")
_TAG = re.compile(rb"(?:^|;)\s*([ds])\s*=\s*([^;\s]+)")


def relaxed_body_hash(chunks: Iterable[bytes]) -> bytes:
    """``bh=`` (base64 SHA-256) of a body given in chunks, relaxed canonicalisation
    (RFC 6376 §3.4.4: no WSP at line ends, WSP runs as one SP, no empty lines at the end)
    of the body as it goes on the wire: every line ending CRLF (as ``to_crlf``), a CRLF at
    the end. Memory: one chunk and one line at a time."""
    h = hashlib.sha256()
    pending = 0  # empty lines held back: dropped if nothing follows them
    carry = b""  # an unfinished line (or a CR that may start a CRLF)

    def block(data: bytes) -> None:  # complete CRLF lines
        nonlocal pending
        data = _WSP_RUN.sub(b" ", _WSP_EOL.sub(b"\r\n", data))
        content = data.rstrip(b"\r\n")
        if not content:
            pending += len(data) // 2
            return
        if pending:
            h.update(b"\r\n" * pending)
        h.update(content + b"\r\n")
        pending = (len(data) - len(content)) // 2 - 1

    for chunk in chunks:
        data = carry + chunk if carry else chunk
        cr = data.count(b"\r")
        if cr != data.count(b"\n") or cr != data.count(b"\r\n"):
            tail = b"\r" if data.endswith(b"\r") else b""
            data = to_crlf(data[:-1] if tail else data) + tail
        end = data.rfind(b"\r\n")
        if end < 0:
            carry = data
            continue
        carry = data[end + 2:]
        block(data[:end + 2])
    if carry:
        block(to_crlf(carry.rstrip(b"\r")) + b"\r\n")  # the wire ends the last line
    return base64.b64encode(h.digest())


class PrefixedBody(SpooledBody):
    """A spooled body with header fields (CRLF lines, e.g. DKIM-Signature) sent before it."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: bytes, body: SpooledBody) -> None:
        super().__init__(body.path, body.size + len(prefix))
        self.prefix = prefix

    def chunks(self, size: int = 256 * 1024) -> Iterator[bytes]:
        yield self.prefix
        yield from super().chunks(size)

    def head(self, limit: int) -> bytes:
        return (self.prefix + super().head(limit))[:limit]

    def read_all(self) -> bytes:
        return self.prefix + super().read_all()


def _split(message: bytes | SpooledBody) -> tuple[bytes, Iterable[bytes]]:
    """The header section (through its empty line) and the body's chunks."""
    head = message.head(MAX_HEADER_SECTION) if isinstance(message, SpooledBody) else message
    end = -2 if head.startswith(b"\r\n") else head.find(b"\r\n\r\n")  # -2: no header
    if end == -1:
        if isinstance(message, SpooledBody) and len(head) >= MAX_HEADER_SECTION:
            raise DkimError(f"no end of the header section in its first "
                            f"{MAX_HEADER_SECTION} bytes")
        return head, ()
    cut = end + 4
    if isinstance(message, SpooledBody):
        return head[:cut], _skip(message.chunks(), cut)
    return head[:cut], (message[cut:],)


def _skip(chunks: Iterator[bytes], n: int) -> Iterator[bytes]:
    for chunk in chunks:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        yield chunk[n:] if n else chunk
        n = 0


class DkimError(Exception):
    """The message cannot be signed (no usable header section, dkimpy refused it)."""


@dataclass(frozen=True)
class Signature:
    """One signature made: its header field (CRLF-terminated) and how to name it in logs."""

    header: bytes
    domain: str
    selector: str
    algorithm: str

    @property
    def label(self) -> str:
        return f"{self.domain}/{self.selector}/{self.algorithm.partition('-')[0]}"


class _Signature:
    def __init__(self, signature: bytes) -> None:
        self.signature = signature


class _OpenSSLRSA:
    """RSA PKCS#1 v1.5 over a SHA-256 digest by OpenSSL (cryptography), in the shape of the
    Ed25519 key object dkimpy's ``gen_header`` calls: ``sign(digest).signature``."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.key = key

    def sign(self, digest: bytes) -> _Signature:
        return _Signature(self.key.sign(digest, padding.PKCS1v15(),
                                        Prehashed(hashes.SHA256())))


class _DKIM(dkimpy.DKIM):  # type: ignore[misc]
    """dkimpy's signer with two changes, both in ``gen_header``:

    * the optional ``x=`` tag, which ``DKIM.sign`` does not offer;
    * the RSA signature made by OpenSSL: dkimpy computes it in pure Python (``pow``), about
      5 ms of CPU per RSA-2048 signature here, against well under 1 ms
      (``bench/dkim_sign.py``). ``gen_header`` signs ``Ed25519`` as ``pk.sign(digest)``
      over the same SHA-256 header hash, so the RSA key is handed in that shape while the
      fields (``a=rsa-sha256``) stay as ``sign`` built them.
    """

    expire: int | None = None
    openssl_rsa: _OpenSSLRSA | None = None
    # bh= computed by relaxed_body_hash (over chunks, once for every key of a message)
    body_hash: bytes | None = None

    def gen_header(self, fields: list[tuple[bytes, bytes]], include_headers: Any,
                   canon_policy: Any, header_name: bytes, pk: Any, *args: Any,
                   **kw: Any) -> bytes:
        if self.expire is not None:
            out: list[tuple[bytes, bytes]] = []
            for name, value in fields:
                out.append((name, value))
                if name == b"t":
                    out.append((b"x", str(int(value) + self.expire).encode()))
            fields = out
        if self.body_hash is not None:
            fields = [(n, self.body_hash if n == b"bh" else v) for n, v in fields]
        if self.openssl_rsa is None or self.signature_algorithm != b"rsa-sha256":
            return super().gen_header(  # type: ignore[no-any-return]
                fields, include_headers, canon_policy, header_name, pk, *args, **kw)
        self.signature_algorithm = b"ed25519-sha256"  # selects the pk.sign(digest) branch
        try:
            return super().gen_header(  # type: ignore[no-any-return]
                fields, include_headers, canon_policy, header_name, self.openssl_rsa,
                *args, **kw)
        finally:
            self.signature_algorithm = b"rsa-sha256"


def from_domain(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The domain of the first address of the first ``From:`` field, lower-cased."""
    for name, value in headers:
        if name.lower() == b"from":
            text = value.decode("utf-8", "replace").replace("\r\n", "")
            for _, addr in getaddresses([text]):
                if "@" in addr:
                    return addr.rpartition("@")[2].strip().lower().rstrip(".") or None
            return None
    return None


def _signed_by(headers: Sequence[tuple[bytes, bytes]]) -> set[tuple[str, str]]:
    """(d, s) pairs of the DKIM-Signature fields the message already carries."""
    out = set()
    for name, value in headers:
        if name.lower() == b"dkim-signature":
            tags = {m.group(1): m.group(2) for m in _TAG.finditer(value.replace(b"\r\n", b""))}
            if b"d" in tags and b"s" in tags:
                out.add((tags[b"d"].decode("ascii", "replace").lower().rstrip("."),
                         tags[b"s"].decode("ascii", "replace")))
    return out


class DkimSigner:
    """Signs messages under one running configuration's ``dkim:`` section."""

    def __init__(self, config: Dkim) -> None:
        self.config = config

    def choose(self, from_dom: str | None, *, sender: str, server_id: str,
               requested: Sequence[tuple[str, str]] | None) -> tuple[DkimKey, ...]:
        """The keys to sign with (possibly none). ``requested``: the hook's (domain,
        selector) pairs; KeyError if one of them is not in ``dkim.keys``."""
        cfg = self.config
        if requested:
            keys = []
            for domain, selector in requested:
                key = cfg.key(domain, selector)
                if key is None:
                    raise KeyError(f"dkim_sign({domain!r}, {selector!r}): no such key in "
                                   "dkim.keys")
                if key not in keys:
                    keys.append(key)
            return tuple(keys)
        sender_domain = sender.rpartition("@")[2].lower() if "@" in sender else ""
        for rule in cfg.rules:
            if rule.matches(sender_domain, server_id):
                return () if rule.domain is False else cfg.keys_for(rule.domain)
        if cfg.sign == "from" and from_dom:
            return cfg.keys_for(from_dom)
        return ()

    def sign(self, message: bytes | SpooledBody, *, sender: str = "", server_id: str = "",
             requested: Sequence[tuple[str, str]] | None = None) -> list[Signature]:
        """The signatures for ``message`` (CRLF line endings, header section first; a
        spooled body is read in chunks, never whole).

        Raises KeyError for an unknown requested key and DkimError when the message
        cannot be signed.
        """
        cfg = self.config
        if not requested and (not cfg.keys or (cfg.sign == "off" and not cfg.rules)):
            return []
        try:
            header_section, body_chunks = _split(message)
        except OSError as exc:
            raise DkimError(f"cannot read the message: {exc}") from None
        try:
            headers, _ = dkimpy.rfc822_parse(header_section)
        except Exception as exc:
            raise DkimError(f"cannot parse the header section: {exc}") from None
        keys = self.choose(from_domain(headers), sender=sender, server_id=server_id,
                           requested=requested)
        if not keys:
            return []
        done = _signed_by(headers)
        include = self._include(headers)
        out = []
        try:
            body_hash = relaxed_body_hash(body_chunks)  # once: the same for every key
        except OSError as exc:
            raise DkimError(f"cannot read the body: {exc}") from None
        for key in keys:
            if (key.domain, key.selector) in done:
                continue
            signer = _DKIM(signature_algorithm=key.key.algorithm.encode())
            # set_message would re-parse; hand over the parse we have, and no body: its
            # hash is known (gen_header puts it in bh=)
            signer.headers, signer.body = headers, b""
            signer.body_hash = body_hash
            if self.config.expire is not None:
                signer.expire = max(1, int(self.config.expire))
            if key.key.rsa_key is not None:
                signer.openssl_rsa = _OpenSSLRSA(key.key.rsa_key)
            try:
                header = signer.sign(key.selector.encode(), key.domain.encode(),
                                     key.key.material, canonicalize=_CANON,
                                     include_headers=include)
            except dkimpy.DKIMException as exc:
                raise DkimError(f"{key.domain}/{key.selector}: {exc}") from None
            out.append(Signature(header, key.domain, key.selector, key.key.algorithm))
        return out

    def _include(self, headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        count: dict[bytes, int] = {}
        for name, _ in headers:
            low = name.lower()
            count[low] = count.get(low, 0) + 1
        include = []
        for name in self.config.headers:
            include += [name.encode()] * count.get(name.encode(), 0)
        if b"from" not in include:  # dkimpy insists; signing its absence is still valid
            include.append(b"from")
        include += [name.encode() for name in self.config.oversign]
        return include
