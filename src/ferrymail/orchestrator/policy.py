"""Shaping policies -> limit keys: what one delivery path is counted against.

Pure logic over the running config. An `Attempt` holds what is known after routing and MX
resolution, before connecting (source IP, proxy, MX host and address, recipient domain,
transport); `limits_for` gives every `Limit` that applies to it, one per policy that limits
it. Several policies apply at once and each is enforced, so the strictest wins.

Matching (Halon's condition forms): exact text (case-insensitive), a list of alternatives,
``*.domain`` (every subdomain, not the domain itself) for name fields, an IP or CIDR network
for ``localip``/``remoteip``, ``&name`` for the ``grouping`` field. The first matching
condition of a policy gives its thresholds, else ``default``; none of both: not limited.

The ``grouping`` value of an attempt is ``&id`` of the first grouping whose ``remotemx``
matches the MX host name or whose ``recipientdomain`` matches the domain; without one it is
the recipient domain itself, so unrolled domains still get a counter each.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from ferrymail.config.models import RunningConfig
from ferrymail.config.policies import IP_FIELDS, Grouping, Policy, SuspendOn, Thresholds
from ferrymail.config.types import domain_matches


@dataclass(frozen=True)
class Attempt:
    """The values a delivery path is keyed on (lower-cased names, literal IPs)."""

    localip: str = ""
    remoteip: str = ""
    remotemx: str = ""
    recipientdomain: str = ""
    transportid: str = ""
    proxy: str = "direct"  # "host:port" of the proxy, or "direct"
    grouping: str = ""

    def value(self, field: str) -> str:
        return str(getattr(self, field))


@dataclass(frozen=True)
class Rate:
    """GCRA parameters: ``count`` per ``period`` seconds, ``burst`` at once."""

    count: int
    period: float
    burst: int = 1

    @property
    def interval(self) -> float:
        """Seconds between two messages at the steady rate."""
        return self.period / self.count

    def __str__(self) -> str:
        b = f" burst {self.burst}" if self.burst > 1 else ""
        return f"{self.count}/{self.period:g}{b}"


@dataclass(frozen=True)
class Limit:
    """One counter and its thresholds. ``key`` names the counter (fields and values);
    ``label`` is the same for people (``localip=192.0.2.1, grouping=&gmail``)."""

    key: str
    label: str
    concurrency: int | None = None
    rate: Rate | None = None
    connectinterval: float | None = None
    fields: tuple[tuple[str, str], ...] = ()  # (field, value) pairs of the key
    suspend_on: tuple[SuspendOn, ...] = ()

    @property
    def rate_key(self) -> str:
        """The rate counter's name with the spec in it: a reload with new numbers starts
        fresh state (GCRA state only means something for one parameter set)."""
        assert self.rate is not None
        r = self.rate
        return f"{self.key}|rate:{r.count}/{r.period:g}/{r.burst}"

    @property
    def interval_key(self) -> str:
        assert self.connectinterval is not None
        return f"{self.key}|ci:{self.connectinterval:g}"


def grouping_of(groupings: tuple[Grouping, ...], remotemx: str, domain: str) -> str:
    """``&id`` of the first grouping the MX host or recipient domain falls in, else the
    recipient domain."""
    for g in groupings:
        if any(_name_matches(p, remotemx) for p in g.remotemx) or any(
                _name_matches(p, domain) for p in g.recipientdomain):
            return "&" + g.id
    return domain


@lru_cache(maxsize=4096)
def _network(pattern: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(pattern, strict=False)
    except ValueError:
        return None


def _name_matches(pattern: str, value: str) -> bool:
    p = pattern.lower()
    if p.startswith("*."):
        return bool(value) and domain_matches(p, value)
    return p == value.lower().rstrip(".")


def value_matches(field: str, pattern: str, value: str) -> bool:
    """Whether ``value`` of ``field`` matches one condition ``pattern`` (see module doc)."""
    if field in IP_FIELDS:
        net = _network(pattern)
        if net is None or not value:
            return False
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            return False
        return ip.version == net.version and ip in net
    return _name_matches(pattern, value)


def matches(conditions: dict[str, tuple[str, ...]], attempt: Attempt) -> bool:
    """Every named field matches one of its patterns."""
    return all(any(value_matches(f, p, attempt.value(f)) for p in pats)
               for f, pats in conditions.items())


def _thresholds(policy: Policy, attempt: Attempt) -> Thresholds | None:
    for cond in policy.conditions:
        if matches(cond.if_, attempt):
            return cond.then
    return policy.default


def policy_key(policy: Policy, attempt: Attempt) -> tuple[str, str]:
    """(key, label) of ``policy``'s counter for ``attempt``."""
    if not policy.fields:
        return "*", "all deliveries"
    pairs = [f"{f}={attempt.value(f)}" for f in policy.fields]
    return "|".join(pairs), ", ".join(pairs)


LIMITS_MEMO_MAX = 4096  # attempts whose limits are remembered per running config


class _LimitsMemo:
    """``limits_for`` results of the running config in force: a delivery path (source, MX,
    domain, ...) repeats for every message, and matching every condition again cost about
    a tenth of the delivery CPU with policies (bench/shaping.py). Keyed on the config
    object itself (frozen; a reload brings a new one, which empties the memo)."""

    def __init__(self) -> None:
        self.cfg: RunningConfig | None = None
        self.items: dict[Attempt, tuple[Limit, ...]] = {}

    def get(self, cfg: RunningConfig, attempt: Attempt) -> tuple[Limit, ...] | None:
        if cfg is not self.cfg:
            self.cfg, self.items = cfg, {}
            return None
        return self.items.get(attempt)

    def put(self, attempt: Attempt, limits: tuple[Limit, ...]) -> None:
        if len(self.items) >= LIMITS_MEMO_MAX:
            self.items.clear()
        self.items[attempt] = limits


_memo = _LimitsMemo()


def limits_for(cfg: RunningConfig, attempt: Attempt) -> tuple[Limit, ...]:
    """Every limit on ``attempt``; ``attempt.grouping`` is filled in from the config."""
    if not cfg.policies:
        return ()
    found = _memo.get(cfg, attempt)
    if found is None:
        found = _limits_for(cfg, attempt)
        _memo.put(attempt, found)
    return found


def _limits_for(cfg: RunningConfig, attempt: Attempt) -> tuple[Limit, ...]:
    if not attempt.grouping:
        attempt = with_grouping(cfg, attempt)
    out: list[Limit] = []
    for policy in cfg.policies:
        t = _thresholds(policy, attempt)
        if (t is None or (t.concurrency is None and t.rate is None
                          and t.connectinterval is None)) and not policy.suspend_on:
            continue
        key, label = policy_key(policy, attempt)
        fields = tuple((f, attempt.value(f)) for f in policy.fields)
        if t is None:
            out.append(Limit(key, label, fields=fields, suspend_on=policy.suspend_on))
            continue
        rate = Rate(t.rate[0], t.rate[1], t.burst) if t.rate is not None else None
        out.append(Limit(key, label, t.concurrency, rate, t.connectinterval, fields,
                         policy.suspend_on))
    # Scarcest first, so that a plentiful slot is never held while a scarce one is refused.
    out.sort(key=lambda lim: lim.concurrency if lim.concurrency is not None else 1 << 30)
    return tuple(out)


def limits_for_domains(cfg: RunningConfig, attempt: Attempt,
                       domains: tuple[str, ...]) -> tuple[Limit, ...]:
    """Every limit on ``attempt`` for each recipient domain of ``domains`` (a fixed next hop,
    e.g. a smarthost, carries one message for several domains in one transaction): the
    message counts against each domain's counters, each once; scarcest first. Without
    domains, ``attempt`` as it is."""
    if len(domains) <= 1:
        if domains and domains[0] != attempt.recipientdomain:
            attempt = Attempt(attempt.localip, attempt.remoteip, attempt.remotemx, domains[0],
                              attempt.transportid, attempt.proxy)
        return limits_for(cfg, attempt)
    seen: dict[str, Limit] = {}
    for d in domains:
        one = Attempt(attempt.localip, attempt.remoteip, attempt.remotemx, d,
                      attempt.transportid, attempt.proxy)
        for lim in limits_for(cfg, one):
            seen.setdefault(lim.key, lim)
    out = list(seen.values())
    out.sort(key=lambda lim: lim.concurrency if lim.concurrency is not None else 1 << 30)
    return tuple(out)


def with_grouping(cfg: RunningConfig, attempt: Attempt) -> Attempt:
    g = grouping_of(cfg.groupings, attempt.remotemx, attempt.recipientdomain)
    return Attempt(attempt.localip, attempt.remoteip, attempt.remotemx,
                   attempt.recipientdomain, attempt.transportid, attempt.proxy, g)
