"""The ``dkim:`` section of the running configuration: signing keys and which domain signs.

Key files (relative names: relative to the running config file's directory) are read and
parsed when the configuration is loaded (and on every reload), so a
missing, unreadable or unusable key is a configuration error naming ``dkim.keys[N].key``
with its line, never a surprise at delivery time.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    model_validator,
)

from .types import (
    DomainPattern,
    Duration,
    Id,
    _is_hostname,
    describe,
    domain_matches,
    read_config_file,
)

# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits (2048 recommended).
MIN_RSA_BITS = 1024

# RFC 6376 §5.4.1's recommended header fields; each is signed as often as it occurs.
DEFAULT_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "resent-date", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-message-id", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post", "list-owner",
    "list-archive",
)
# Signed once more than they occur (RFC 6376 §8.15): nobody can add another one.
DEFAULT_OVERSIGN = ("from", "to", "subject")
# RFC 6376 §5.4.1: these are expected to change in transit and SHOULD NOT be signed.
UNSIGNABLE = frozenset({"return-path", "received", "comments", "keywords", "dkim-signature"})

_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 §3.6.8 ftext


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class PrivateKey:
    """A DKIM private key read from a PEM file.

    ``algorithm`` is ``rsa-sha256`` or ``ed25519-sha256`` (RFC 8463); ``material`` is what
    dkimpy's signer takes: PKCS#1 PEM for RSA, the base64 32-byte seed for Ed25519;
    ``public`` is the ``p=`` value of the DNS TXT record.
    """

    path: str
    algorithm: str
    material: bytes
    public: str
    bits: int
    # the parsed RSA key, so that the signature itself is made by OpenSSL (see ferrymail.dkim)
    rsa_key: rsa.RSAPrivateKey | None = field(default=None, repr=False, compare=False)

    @property
    def key_type(self) -> str:
        """The ``k=`` tag value: ``rsa`` or ``ed25519``."""
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"

    def dns_record(self) -> str:
        """The TXT record value to publish at ``SELECTOR._domainkey.DOMAIN`` (RFC 6376 §3.6.1)."""
        return f"v=DKIM1; k={self.key_type}; p={self.public}"


def key_from_pem(pem: bytes, path: str = "<memory>") -> PrivateKey:
    """Parse an RSA or Ed25519 private key (PKCS#1 or PKCS#8 PEM, unencrypted).

    Raises ValueError naming what is wrong: not PEM, encrypted, another key type, RSA
    shorter than 1024 bits.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError(f"{path}: the key is encrypted; DKIM keys must be stored "
                         "unencrypted (protect the file's permissions instead)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path}: not a PEM private key ({exc})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"{path}: RSA key has {key.key_size} bits; DKIM needs at least "
                             f"{MIN_RSA_BITS} (RFC 8301), 2048 recommended")
        material = key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return PrivateKey(path, "rsa-sha256", material, base64.b64encode(der).decode(),
                          key.key_size, key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return PrivateKey(path, "ed25519-sha256", base64.b64encode(seed),
                          base64.b64encode(raw).decode(), 256)
    raise ValueError(f"{path}: a {type(key).__name__.removeprefix('_')} key; DKIM keys are "
                     "RSA or Ed25519")


def _load_key(value: object, info: ValidationInfo) -> PrivateKey:
    if isinstance(value, PrivateKey):
        return value
    path, pem = read_config_file(value, info, "a PEM private key file", 64 * 1024)
    return key_from_pem(pem, path)


def _selector(value: object) -> str:
    if not isinstance(value, str) or not _SELECTOR.fullmatch(value):
        raise ValueError(f"expected a DKIM selector (DNS labels, e.g. 's2026'), got {value!r}")
    return value


def _signing_domain(value: object) -> str:
    if not isinstance(value, str) or not _is_hostname(value):
        raise ValueError(f"expected a domain name like 'example.org', got {describe(value)}")
    return value.lower().rstrip(".")


def _field_names(value: object) -> object:
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            if not isinstance(v, str) or not _FIELD_NAME.fullmatch(v):
                raise ValueError(f"expected header field names, got {v!r}")
            if v.lower() in UNSIGNABLE:
                raise ValueError(f"{v} changes in transit and must not be signed "
                                 "(RFC 6376 §5.4.1)")
            out.append(v.lower())
        return tuple(out)
    return value


def _one_or_more(value: object) -> object:
    return [value] if isinstance(value, str) else value


Selector = Annotated[str, PlainValidator(_selector)]
SigningDomain = Annotated[str, PlainValidator(_signing_domain)]
KeyFile = Annotated[PrivateKey, PlainValidator(_load_key)]
FieldNames = Annotated[tuple[str, ...], BeforeValidator(_field_names)]


class DkimKey(_Model):
    """One signing key: ``d=`` domain, ``s=`` selector and the private key file."""

    domain: SigningDomain
    selector: Selector
    key: KeyFile


class DkimRule(_Model):
    """Sign with ``domain``'s keys when the envelope sender's domain and/or the receiving
    server match (every given condition must match; a rule with none matches all)."""

    senderdomain: Annotated[tuple[DomainPattern, ...], BeforeValidator(_one_or_more)] = ()
    server: Annotated[tuple[Id, ...], BeforeValidator(_one_or_more)] = ()
    domain: SigningDomain | Literal[False]

    def matches(self, sender_domain: str, server_id: str) -> bool:
        if self.senderdomain and not any(domain_matches(p, sender_domain)
                                         for p in self.senderdomain):
            return False
        return not self.server or server_id in self.server


class Dkim(_Model):
    """``dkim:`` — which domain signs outgoing mail, and with which keys."""

    sign: Literal["from", "off"] = "from"
    keys: tuple[DkimKey, ...] = ()
    rules: tuple[DkimRule, ...] = ()
    headers: FieldNames = DEFAULT_HEADERS
    oversign: FieldNames = DEFAULT_OVERSIGN
    expire: Duration | None = Field(default=None)

    @model_validator(mode="after")
    def _check(self) -> Dkim:
        if "from" not in self.headers:
            raise ValueError("headers: must include from (RFC 6376 §5.4)")
        if self.expire is not None and self.expire < 1:
            raise ValueError("expire: must be at least 1s")
        return self

    def keys_for(self, domain: str) -> tuple[DkimKey, ...]:
        """Every key of the signing domain ``domain`` (case-insensitive), in file order."""
        domain = domain.lower().rstrip(".")
        return tuple(k for k in self.keys if k.domain == domain)

    def key(self, domain: str, selector: str) -> DkimKey | None:
        for k in self.keys_for(domain):
            if k.selector == selector:
                return k
        return None


def dkim_problems(cfg: Dkim) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-reference problems: duplicate (domain, selector), rules naming keyless domains."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    seen: dict[tuple[str, str], int] = {}
    for i, k in enumerate(cfg.keys):
        ident = (k.domain, k.selector)
        if ident in seen:
            problems.append((("dkim", "keys", i, "selector"),
                             f"selector {k.selector!r} of {k.domain} is also dkim.keys"
                             f"[{seen[ident]}]"))
        else:
            seen[ident] = i
    for i, rule in enumerate(cfg.rules):
        if rule.domain is not False and not cfg.keys_for(rule.domain):
            problems.append((("dkim", "rules", i, "domain"),
                             f"no dkim.keys entry for {rule.domain}"))
    return problems
