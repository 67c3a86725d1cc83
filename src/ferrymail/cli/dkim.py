"""``ferrymail dkim …``: DKIM key management.

``ferrymail dkim keygen DOMAIN SELECTOR [--type rsa|ed25519] [--bits N] [--dir DIR]``
writes ``DIR/DOMAIN.SELECTOR.pem`` (mode 0600, never over an existing file unless
``--force``) and prints the DNS TXT record to publish as a zone-file line, its value cut
into strings of at most 255 octets (a TXT character-string's limit, RFC 1035 §3.3).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ferrymail.cli.common import EXIT_FAIL, EXIT_OK
from ferrymail.config.dkim import MIN_RSA_BITS, key_from_pem
from ferrymail.config.types import _is_hostname


def txt_record(domain: str, selector: str, value: str) -> str:
    """``SELECTOR._domainkey.DOMAIN. IN TXT ( "…" "…" )`` with strings of <= 255 octets."""
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
    quoted = " ".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT ( {quoted} )"


def generate(kind: str, bits: int) -> bytes:
    """A new private key as PKCS#8 PEM."""
    if kind == "rsa":
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = rsa.generate_private_key(
            public_exponent=65537, key_size=bits)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cmd_keygen(args: argparse.Namespace) -> int:
    domain = args.domain.lower().rstrip(".")
    if not _is_hostname(domain):
        print(f"ferrymail dkim keygen: {args.domain!r} is not a domain name", file=sys.stderr)
        return EXIT_FAIL
    if not _is_hostname(args.selector) or args.selector.endswith("."):
        print(f"ferrymail dkim keygen: {args.selector!r} is not a selector (DNS labels)",
              file=sys.stderr)
        return EXIT_FAIL
    if args.type == "rsa" and not MIN_RSA_BITS <= args.bits <= 8192:
        print(f"ferrymail dkim keygen: --bits must be {MIN_RSA_BITS}..8192 (2048 recommended)",
              file=sys.stderr)
        return EXIT_FAIL
    path = Path(args.dir) / f"{domain}.{args.selector}.pem"
    pem = generate(args.type, args.bits)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        print(f"ferrymail dkim keygen: {path} exists (use --force to replace it)",
              file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:
        print(f"ferrymail dkim keygen: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAIL
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    key = key_from_pem(pem, str(path))
    print(f"wrote {path} ({key.key_type}, {key.bits} bits); add to the running config:\n"
          f"  dkim:\n    keys:\n      - domain: {domain}\n        selector: {args.selector}\n"
          f"        key: {path}\nand publish:", file=sys.stderr)
    print(txt_record(domain, args.selector, key.dns_record()))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dkim keygen`` to the ``ferrymail`` subparsers."""
    d = sub.add_parser("dkim", help="DKIM signing keys")
    d_sub = d.add_subparsers(dest="dkim_command", metavar="SUBCOMMAND", required=True)
    p = d_sub.add_parser("keygen", help="write a key pair and print its DNS TXT record",
                         description="write a DKIM private key and print the DNS TXT record")
    p.set_defaults(func=cmd_keygen)
    p.add_argument("domain", metavar="DOMAIN", help="signing domain (d=)")
    p.add_argument("selector", metavar="SELECTOR", help="selector (s=)")
    p.add_argument("--type", choices=("rsa", "ed25519"), default="rsa",
                   help="key type (default rsa; ed25519 is RFC 8463, sign with both)")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.add_argument("--dir", default=".", help="where to write DOMAIN.SELECTOR.pem")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
