"""Scalar value types of the configuration: durations, sizes, ports, addresses, names.

Each is an ``Annotated`` type whose validator raises ValueError with a message that says what
was expected and what was found; the loader turns that into a ConfigError with file and line.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from typing import Annotated, Any

from pydantic import Field, PlainValidator, StrictInt, ValidationInfo

# Validation context key: the directory of the file being loaded (None: the working
# directory), against which file names in the running config (DKIM keys, credentials) resolve.
BASE_DIR = "ferrymail_base_dir"

IPAddressType = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetworkType = ipaddress.IPv4Network | ipaddress.IPv6Network

_YAML_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "list",
    dict: "mapping",
    type(None): "null",
}


def describe(value: Any) -> str:
    """How a YAML value looks to the user: ``string 'abc'``, ``integer 5``, ``a mapping``."""
    if value is None:
        return "null (an empty value)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    name = _YAML_TYPE_NAMES.get(type(value), type(value).__name__)
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{name} {text}"


# Durations ------------------------------------------------------------------------------------

_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION_RE = re.compile(
    r"(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m(?!s))?"
    r"(?:(?P<s>\d+(?:\.\d+)?)s)?(?:(?P<ms>\d+(?:\.\d+)?)ms)?"
)
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
_DURATION_HELP = "seconds as a number, or a string like '90s', '5m', '1h30m', '2d', '250ms'"


def parse_duration(value: object) -> float:
    """Seconds from a number or a Halon-style ``?d?h?m?s`` string (``ms`` also accepted).

    Raises ValueError for anything else, negative values included.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a duration ({_DURATION_HELP}), got {describe(value)}")
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER_RE.fullmatch(text):
            return float(text)
        match = _DURATION_RE.fullmatch(text)
        if not text or match is None:
            raise ValueError(f"expected a duration ({_DURATION_HELP}), got {describe(value)}")
        return sum(float(n) * _DURATION_UNITS[u] for u, n in match.groupdict().items() if n)
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"expected a duration of 0 seconds or more, got {describe(value)}")
    return seconds


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration greater than 0, got {describe(value)}")
    return seconds


Duration = Annotated[float, PlainValidator(parse_duration)]
PositiveDuration = Annotated[float, PlainValidator(_positive_duration)]


# Sizes ----------------------------------------------------------------------------------------

_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE_RE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|TiB)?")
_SIZE_HELP = "bytes as an integer, or a string like '512KiB', '10MiB', '1GiB'"


def parse_size(value: object) -> int:
    """Bytes from an integer or a string with a binary unit (``B``, ``KiB``, ... ``TiB``)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size ({_SIZE_HELP}), got {describe(value)}")
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"expected a size ({_SIZE_HELP}), got {describe(value)}")
        return int(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"]
    if value < 0:
        raise ValueError(f"expected a size of 0 bytes or more, got {describe(value)}")
    return value


def _positive_size(value: object) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"expected a size greater than 0, got {describe(value)}")
    return size


PositiveSize = Annotated[int, PlainValidator(_positive_size)]


# Numbers --------------------------------------------------------------------------------------

Port = Annotated[StrictInt, Field(ge=1, le=65535)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]


def _proxy_version(value: object) -> int:
    if isinstance(value, bool) or value not in (1, 2) or not isinstance(value, int):
        raise ValueError(f"expected PROXY protocol version 1 or 2, got {describe(value)}")
    return value


ProxyVersion = Annotated[int, PlainValidator(_proxy_version)]


# Names ----------------------------------------------------------------------------------------

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]*")


def _id(value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(
            "expected an id (letters, digits and _ . : @ -, starting with a letter or digit), "
            f"got {describe(value)}"
        )
    return value


Id = Annotated[str, PlainValidator(_id)]

_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_hostname(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        return False  # a mistyped IPv4 literal, not a name
    return all(_LABEL_RE.fullmatch(label) for label in labels)


def _hostname(value: object) -> str:
    if not isinstance(value, str) or not _is_hostname(value):
        raise ValueError(f"expected a host name like 'mx1.example.com', got {describe(value)}")
    return value


Hostname = Annotated[str, PlainValidator(_hostname)]


def _host(value: object) -> str:
    if isinstance(value, str):
        text = value.strip()
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            pass
        if _is_hostname(text):
            return text
    hint = _number_hint(value)
    raise ValueError(f"expected an IP address or a host name, got {describe(value)}{hint}")


Host = Annotated[str, PlainValidator(_host)]
"""An IP literal (normalised) or a host name, kept as a string."""


def _domain_pattern(value: object) -> str:
    if isinstance(value, str):
        text = value.strip().lower().rstrip(".")
        name = text[2:] if text.startswith("*.") else text
        if _is_hostname(name):
            return text
    raise ValueError(
        f"expected a domain ('example.com') or a subdomain wildcard ('*.example.com'), "
        f"got {describe(value)}"
    )


DomainPattern = Annotated[str, PlainValidator(_domain_pattern)]
"""A lower-cased domain, or ``*.domain`` for every subdomain of it (not the domain itself)."""


def domain_matches(pattern: str, domain: str) -> bool:
    """Whether ``domain`` (any case, trailing dot allowed) matches a DomainPattern."""
    name = domain.strip().lower().rstrip(".")
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


# Addresses ------------------------------------------------------------------------------------


def _number_hint(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return " (YAML read it as a number: quote it)"
    return ""


def _ip(value: object) -> IPAddressType:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    if isinstance(value, str):
        try:
            return ipaddress.ip_address(value.strip())
        except ValueError:
            pass
    raise ValueError(
        f"expected an IPv4 or IPv6 address literal, got {describe(value)}{_number_hint(value)}"
    )


IPAddress = Annotated[IPAddressType, PlainValidator(_ip)]


def _network(value: object) -> IPNetworkType:
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError:
            pass
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            pass
        else:
            raise ValueError(f"{text!r} has host bits set (the network is {loose})")
    raise ValueError(
        "expected a network in CIDR notation ('10.0.0.0/8') or a single IP address, "
        f"got {describe(value)}{_number_hint(value)}"
    )


IPNetwork = Annotated[IPNetworkType, PlainValidator(_network)]


def address_in(ip: str | IPAddressType, networks: tuple[IPNetworkType, ...]) -> bool:
    """Whether ``ip`` lies in any of ``networks``; IPv4-mapped IPv6 counts as IPv4."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


# Hooks ----------------------------------------------------------------------------------------

_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_FUNC_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def split_hook(spec: str, default_function: str) -> tuple[str, str, bool]:
    """``(module_or_path, function, is_path)`` for a hook reference.

    ``pkg.mod:func``, ``pkg.mod`` (default function), ``/path/hook.py``, ``hooks/x.py:func``.
    Raises ValueError when the reference cannot be either.
    """
    target, sep, function = spec.rpartition(":")
    if not sep or not _FUNC_RE.fullmatch(function):
        target, function = spec, default_function
    is_path = target.endswith(".py") or "/" in target
    if not target or (not is_path and not _MODULE_RE.fullmatch(target)):
        raise ValueError(
            "expected 'package.module:function' or a path to a .py file "
            f"(optionally ':function'), got {describe(spec)}"
        )
    return target, function, is_path


def _hook(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"expected 'package.module:function' or a path to a .py file, got {describe(value)}"
        )
    split_hook(value, "predelivery")
    return value


HookRef = Annotated[str, PlainValidator(_hook)]


def config_path(value: str, info: ValidationInfo) -> str:
    """A file named in a config file: relative names are relative to that file's directory."""
    base = (info.context or {}).get(BASE_DIR)
    if base is None or os.path.isabs(value):
        return value
    return os.path.join(base, value)


def read_config_file(value: object, info: ValidationInfo, what: str,
                     limit: int) -> tuple[str, bytes]:
    """(path, at most ``limit`` bytes) of a file a config key names (``config_path``);
    ValueError "expected the path of WHAT" or "cannot read PATH: REASON"."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected the path of {what}")
    path = config_path(value, info)
    try:
        with open(path, "rb") as f:
            return path, f.read(limit)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
