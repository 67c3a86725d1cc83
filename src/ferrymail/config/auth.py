"""``servers[].auth`` of the running configuration: SMTP AUTH credentials and limits.

The credentials file (``user:hash`` per line) is read when the configuration is loaded and
on every reload, so a bad line is a configuration error (``servers[N].auth.users``, with
the credentials file's own line number in the message) and a reload picks up new users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainValidator, StrictBool, ValidationInfo

from .types import PositiveDuration, PositiveInt, read_config_file

MAX_CREDENTIALS_BYTES = 16 * 1024 * 1024
_ARGON2 = ("$argon2id$", "$argon2i$", "$argon2d$")
_BCRYPT = ("$2a$", "$2b$", "$2y$")


def hash_scheme(value: str) -> str | None:
    """``argon2`` or ``bcrypt`` for a hash in PHC/modular crypt form, else None."""
    if value.startswith(_ARGON2):
        return "argon2"
    if value.startswith(_BCRYPT) and len(value) == 60:
        return "bcrypt"
    return None


@dataclass(frozen=True)
class CredentialsFile:
    """The users of a credentials file: ``user -> hash`` (argon2 or bcrypt)."""

    path: str
    users: dict[str, str] = field(repr=False, hash=False, compare=False)

    def __hash__(self) -> int:
        return hash(self.path)


def parse_credentials(text: str, path: str = "<credentials>") -> CredentialsFile:
    """``user:hash`` lines; ``#`` comments and blank lines are skipped.

    Raises ValueError naming ``path:LINE`` for a line without ``:``, an empty user, a
    user twice, or a hash that is neither argon2 (``$argon2id$…``) nor bcrypt
    (``$2b$…``). The user name is everything before the *first* colon.
    """
    users: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        user, hashed = user.strip(), hashed.strip()
        if not sep or not user:
            raise ValueError(f"{path}:{n}: expected user:hash")
        if hash_scheme(hashed) is None:
            raise ValueError(f"{path}:{n}: the hash of {user!r} is neither argon2 "
                             "($argon2id$...) nor bcrypt ($2b$...)")
        if user in users:
            raise ValueError(f"{path}:{n}: user {user!r} appears twice")
        users[user] = hashed
    return CredentialsFile(path, users)


def _load(value: object, info: ValidationInfo) -> CredentialsFile:
    if isinstance(value, CredentialsFile):
        return value
    path, data = read_config_file(value, info, "a credentials file (user:hash lines)",
                                  MAX_CREDENTIALS_BYTES + 1)
    if len(data) > MAX_CREDENTIALS_BYTES:
        raise ValueError(f"{path}: larger than {MAX_CREDENTIALS_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 ({exc.reason})") from None
    return parse_credentials(text, path)


Credentials = Annotated[CredentialsFile, PlainValidator(_load)]


class ServerAuth(BaseModel):
    """``servers[].auth``: offer AUTH PLAIN/LOGIN (over TLS only) with these users."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    users: Credentials
    required: StrictBool = False  # MAIL is refused (530) until the client authenticated
    failures: PositiveInt = 5  # failed attempts per client address within `window` ...
    window: PositiveDuration = 300.0  # ... before AUTH answers 454 for the rest of it
