"""RFC 5234 core rules the wire grammars share (SMTP, PROXY, both directions), sans-IO.

Python's ``str.isdigit()``/``isdecimal()`` and ``int()`` accept any Unicode decimal digit
(U+00B2 superscript two, U+0665 Arabic-Indic five, ...); the grammars of RFC 5321 and the
PROXY spec allow only ``DIGIT = %x30-39``.
Every numeric field read from a peer goes through ``decimal``.
"""

from __future__ import annotations

_DIGITS = frozenset("0123456789")
_DIGIT_OCTETS = frozenset(b"0123456789")


def is_digits(text: str | bytes | bytearray) -> bool:
    """Whether ``text`` is ``1*DIGIT`` (ASCII ``0``-``9`` only, at least one)."""
    if not text:
        return False
    allowed = _DIGITS if isinstance(text, str) else _DIGIT_OCTETS
    return all(c in allowed for c in text)


def decimal(text: str | bytes | bytearray, *, max_digits: int = 20,
            leading_zero: bool = True) -> int | None:
    """``1*DIGIT`` as an int, or None when ``text`` is not that.

    ``max_digits`` bounds the work (and rejects absurd values before conversion);
    ``leading_zero=False`` refuses ``"05"`` (the PROXY v1 grammar forbids it, RFC-style
    octal confusion), while ``"0"`` itself stays valid.
    """
    if len(text) > max_digits or not is_digits(text):
        return None
    if not leading_zero and len(text) > 1 and text[0] in ("0", 0x30):
        return None
    return int(text)
