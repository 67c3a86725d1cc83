"""Typed models of delivery shaping: ``policies``, ``groupings`` (running), ``cluster`` (startup).

Shapes follow Halon's queue policies: each policy is one counter keyed by its ``fields``;
``conditions`` pick thresholds for matching keys, ``default`` for the rest (no default: only
matching keys are limited). See `ferrymail.orchestrator.policy` for how an attempt's values
become limit keys, and docs/configuration.md "Delivery shaping".
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, model_validator

from .types import Id, PositiveDuration, PositiveInt, describe

FIELDS = ("localip", "remoteip", "remotemx", "recipientdomain", "transportid", "grouping",
          "proxy")
IP_FIELDS = ("localip", "remoteip")
Field_ = Literal["localip", "remoteip", "remotemx", "recipientdomain", "transportid",
                 "grouping", "proxy"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


_RATE_RE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*")


def _rate(value: object) -> tuple[int, float]:
    """``"N/S"`` -> (N messages, S seconds); N >= 1, S > 0."""
    if isinstance(value, str):
        m = _RATE_RE.fullmatch(value)
        if m is not None:
            n, s = int(m.group(1)), float(m.group(2))
            if n >= 1 and s > 0:
                return n, s
    if isinstance(value, tuple) and len(value) == 2:
        return value  # type: ignore[return-value]
    raise ValueError(f"expected a rate 'N/S' (N messages per S seconds, e.g. '600/60'), "
                     f"got {describe(value)}")


Rate = Annotated[tuple[int, float], PlainValidator(_rate)]


def _pattern(value: object) -> str:
    """A condition value: exact text, ``*.domain``, an IP or CIDR network, or ``&grouping``."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a value, '*.domain', a CIDR network or '&grouping', "
                         f"got {describe(value)}")
    text = str(value).strip()
    if not text:
        raise ValueError("expected a non-empty value")
    return text


Pattern = Annotated[str, PlainValidator(_pattern)]


def _patterns(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError("expected a value or a non-empty list of values")
    return tuple(_pattern(x) for x in items)


Patterns = Annotated[tuple[str, ...], PlainValidator(_patterns)]


class Thresholds(_Model):
    """Limits for one counter key; an absent limit does not limit.

    ``concurrency``: simultaneous delivery connections, cluster-wide. ``rate``: N messages per
    S seconds as GCRA, ``burst`` of them at once (default 1: evenly spaced, S/N apart).
    ``connectinterval``: seconds between two new connections, cluster-wide.
    """

    concurrency: PositiveInt | None = None
    rate: Rate | None = None
    burst: PositiveInt = 1
    connectinterval: PositiveDuration | None = None


class Condition(_Model):
    """``if`` every named field matches one of its patterns, ``then`` these thresholds."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    if_: Annotated[dict[Field_, Patterns], Field(alias="if", min_length=1)]
    then: Thresholds


class SuspendOn(_Model):
    """Dynamic suspension: a reply matching ``code`` (e.g. 421) and/or the ``text`` regex
    suspends the policy's key for ``duration``. Our own internal deferrals never match."""

    code: Annotated[StrictInt, Field(ge=400, le=599)] | None = None
    text: str | None = None
    duration: PositiveDuration = 600.0

    @model_validator(mode="after")
    def _check(self) -> SuspendOn:
        if self.code is None and self.text is None:
            raise ValueError("suspend_on needs 'code', 'text' or both")
        if self.text is not None:
            try:
                re.compile(self.text)
            except re.error as e:
                raise ValueError(f"text is not a valid regular expression: {e}") from None
        return self


class Policy(_Model):
    """One counter per distinct value tuple of ``fields`` (no fields: one global counter)."""

    fields: tuple[Field_, ...] = ()
    conditions: tuple[Condition, ...] = ()
    default: Thresholds | None = None
    suspend_on: tuple[SuspendOn, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> Policy:
        if len(set(self.fields)) != len(self.fields):
            raise ValueError("fields lists a field twice")
        for i, c in enumerate(self.conditions):
            extra = [f for f in c.if_ if f not in self.fields]
            if extra:
                raise ValueError(f"conditions[{i}] tests {', '.join(extra)}, not among the "
                                 f"policy's fields {list(self.fields)}")
            for f, pats in c.if_.items():
                for p in pats:
                    problem = pattern_problem(f, p)
                    if problem:
                        raise ValueError(f"conditions[{i}].if.{f}: {problem}")
        return self


class Grouping(_Model):
    """An MX rollup: deliveries whose MX host (or recipient domain) matches share ``&id``."""

    id: Id
    remotemx: Patterns = ()
    recipientdomain: Patterns = ()


def pattern_problem(field: str, pattern: str) -> str | None:
    """Why ``pattern`` can never match values of ``field`` (None if it is fine)."""
    if pattern.startswith("&") and field != "grouping":
        return f"{pattern!r} names a grouping, but only the grouping field holds those"
    if field in IP_FIELDS and not pattern.startswith("&"):
        try:
            ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return f"{pattern!r} is not an IP address or CIDR network"
    return None


class Cluster(_Model):
    """Startup ``cluster``: share shaping limits and suspensions through Redis.

    ``fallback`` while Redis is unreachable: ``split`` divides each limit by the last known
    number of live instances (at least 1, Halon's behaviour), ``local`` keeps every limit per
    instance, ``closed`` opens no new connection.
    """

    redis: Annotated[str, Field(pattern=r"^(redis|rediss|unix)://")]
    instance: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    fallback: Literal["split", "local", "closed"] = "split"
    lease_ttl: Annotated[float, PlainValidator(lambda v: _at_least(v, 2.0))] = 30.0
    timeout: PositiveDuration = 0.5
    prefix: Annotated[str, Field(min_length=1, max_length=64)] = "ferrymail"
    heartbeat: PositiveDuration = 0.25  # registry beat and shared-suspension refresh


def _at_least(value: Any, low: float) -> float:
    from .types import parse_duration

    seconds = parse_duration(value)
    if seconds < low:
        raise ValueError(f"expected at least {low:g} seconds, got {describe(value)}")
    return seconds


__all__ = ["FIELDS", "Cluster", "Condition", "Grouping", "Policy", "SuspendOn",
           "Thresholds"]


def shaping_problems(policies: tuple[Policy, ...], groupings: tuple[Grouping, ...]
                     ) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-reference problems: duplicate grouping ids, ``&name`` of no grouping."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    ids: set[str] = set()
    for i, g in enumerate(groupings):
        if g.id in ids:
            problems.append((("groupings", i, "id"), f"duplicate grouping id {g.id!r}"))
        ids.add(g.id)
    for p, pol in enumerate(policies):
        for c, cond in enumerate(pol.conditions):
            for pat in cond.if_.get("grouping", ()):
                name = pat[1:] if pat.startswith("&") else None
                if name is not None and name not in ids:
                    problems.append((("policies", p, "conditions", c, "if", "grouping"),
                                     f"unknown grouping {pat!r} (defined: "
                                     f"{', '.join('&' + x for x in sorted(ids)) or 'none'})"))
    return problems
