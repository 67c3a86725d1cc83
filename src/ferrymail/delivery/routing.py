"""Routing: which transport a recipient takes, and which source IP, HELO and proxy an attempt uses.

Pure logic over the running config (no sockets). Precedence of the proxy for a source:
the address's own ``proxyprotocol`` > the transport's > the transport group's (the config
already merges group into transport); none anywhere means the socket binds the source IP
directly. A pre-delivery hook may replace the sources and the proxy (`sources_from_hook`).

Source choice is round robin per (transport, family) and health-aware: a proxy that failed is
marked down for a back-off period (`ProxyHealth`) and skipped while another candidate is up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ferrymail.config.models import Address, ResolvedTransport, RunningConfig
from ferrymail.config.models import ProxyProtocol as ConfigProxy
from ferrymail.delivery.connect import ProxyRoute, Source
from ferrymail.delivery.errors import DeliveryError
from ferrymail.spool import Envelope, RecipientRecord

PROXY_BACKOFF_START = 30.0
PROXY_BACKOFF_MAX = 300.0
MAX_ROTATION_KEYS = 10000


def recipient_domain(address: str) -> str:
    """The lower-cased domain of an address ("" for a bare local part like ``postmaster``)."""
    _, at, domain = address.rpartition("@")
    return domain.lower().rstrip(".") if at else ""


def transport_id_for(record: RecipientRecord, envelope: Envelope, cfg: RunningConfig) -> str:
    """The recipient's transport: fixed at reception if it was, else the routing rules.

    KeyError when the envelope's server is no longer in the running config.
    """
    if record.transport:
        return record.transport
    if envelope.transport:
        return envelope.transport
    return cfg.transport_for(envelope.server_id, recipient_domain(record.address))


def to_route(proxy: ConfigProxy | None) -> ProxyRoute | None:
    if proxy is None:
        return None
    return ProxyRoute(proxy.server, proxy.port, proxy.version)


@dataclass(frozen=True)
class SourcePlan:
    """The sources one attempt may use, per IP family.

    ``ipv4``/``ipv6`` empty means the family cannot be used (an MX address of that family is
    skipped). An OS-chosen source is a `Source` whose ``address`` is None (direct only).
    ``problem`` explains an unusable family (e.g. a proxy with no source IP) for the log.
    """

    ipv4: tuple[Source, ...]
    ipv6: tuple[Source, ...]
    problems: tuple[str, ...] = ()
    rotate: bool = True  # False: keep the given order (priority), e.g. hook sourceip_random=False

    def for_family(self, version: int) -> tuple[Source, ...]:
        return self.ipv4 if version == 4 else self.ipv6


def _plan(
    entries: Sequence[Source],
    *,
    use_ipv4: bool,
    use_ipv6: bool,
    fallback_proxy: ProxyRoute | None,
    hostname: str,
    rotate: bool,
    who: str,
) -> SourcePlan:
    """Split named sources by family; with none named, let the OS choose (direct only).

    A family without named sources is unused when the other family has some: explicit sources
    mean "only these".
    """
    if entries:
        v4 = tuple(s for s in entries if s.address and _version(s.address) == 4)
        v6 = tuple(s for s in entries if s.address and _version(s.address) == 6)
        return SourcePlan(v4 if use_ipv4 else (), v6 if use_ipv6 else (), (), rotate)
    if fallback_proxy is not None:
        problem = (
            f"{who} goes through proxy {fallback_proxy} but names no source address: "
            "a proxy needs a source IP for the PROXY header"
        )
        return SourcePlan((), (), (problem,), rotate)
    any_source = (Source(None, hostname),)
    return SourcePlan(any_source if use_ipv4 else (), any_source if use_ipv6 else (), (), rotate)


def _address_source(a: Address, transport: ResolvedTransport, hostname: str,
                    helo: str | None = None) -> Source:
    return Source(str(a.address), helo or a.hostname or hostname, a.id,
                  to_route(transport.proxy_for(a)))


def transport_sources(transport: ResolvedTransport, hostname: str) -> SourcePlan:
    """The transport's own sources, each with its HELO (address hostname, else ``hostname``)
    and its proxy (address > transport > group)."""
    return _plan(
        [_address_source(a, transport, hostname) for a in transport.addresses],
        use_ipv4=transport.use_ipv4,
        use_ipv6=transport.use_ipv6,
        fallback_proxy=to_route(transport.proxy_for(None)),
        hostname=hostname,
        rotate=True,
        who=f"transport {transport.id!r}",
    )


@dataclass(frozen=True)
class HookSource:
    """A source the pre-delivery hook asked for: an address id or IP literal, optional HELO."""

    address: str
    helo: str | None = None


def sources_from_hook(
    sources: Iterable[HookSource] | None,
    *,
    proxy: ProxyRoute | None,
    no_proxy: bool,
    transport: ResolvedTransport,
    cfg: RunningConfig,
    hostname: str,
    rotate: bool = True,
) -> SourcePlan:
    """The sources for an attempt whose pre-delivery hook overrode sources and/or proxy.

    ``sources`` None keeps the transport's. An entry may name an address id or an IP; an IP
    that is a configured address takes that address's HELO and proxy. ``proxy`` replaces the
    proxy of every source; ``no_proxy`` connects every source directly. DeliveryError (config)
    for an entry that is neither an address id nor an IP.
    """
    if sources is None:
        entries = [_address_source(a, transport, hostname) for a in transport.addresses]
        use_ipv4, use_ipv6 = transport.use_ipv4, transport.use_ipv6
    else:
        by_id = {a.id: a for a in cfg.addresses}
        by_ip = {a.address: a for a in reversed(cfg.addresses)}
        entries = []
        for item in sources:
            known = by_id.get(item.address)
            if known is None:
                try:
                    ip = ipaddress.ip_address(item.address.strip())
                except ValueError:
                    raise DeliveryError(
                        "config",
                        f"pre-delivery hook sourceip {item.address!r} is neither an address id "
                        "nor an IP address",
                        temporary=True,
                    ) from None
                known = by_ip.get(ip)
            if known is not None:
                entries.append(_address_source(known, transport, hostname, item.helo))
            else:
                entries.append(Source(str(ip), item.helo or hostname, None,
                                      to_route(transport.proxy_for(None))))
        use_ipv4 = use_ipv6 = True
    fallback = to_route(transport.proxy_for(None))
    if no_proxy:
        entries = [Source(s.address, s.helo, s.address_id, None) for s in entries]
        fallback = None
    elif proxy is not None:
        entries = [Source(s.address, s.helo, s.address_id, proxy) for s in entries]
        fallback = proxy
    return _plan(entries, use_ipv4=use_ipv4, use_ipv6=use_ipv6, fallback_proxy=fallback,
                 hostname=hostname, rotate=rotate, who="pre-delivery hook route")


def _version(address: str) -> int:
    return ipaddress.ip_address(address).version


# -- health and rotation ------------------------------------------------------------------------


@dataclass
class _Down:
    until: float
    backoff: float


@dataclass
class ProxyHealth:
    """Proxies known to have failed, each down until a back-off time (30 s doubling to 5 min)."""

    start: float = PROXY_BACKOFF_START
    maximum: float = PROXY_BACKOFF_MAX
    _down: dict[tuple[str, int], _Down] = field(default_factory=dict)

    @staticmethod
    def _key(proxy: ProxyRoute) -> tuple[str, int]:
        return (proxy.server, proxy.port)

    def mark_failed(self, proxy: ProxyRoute, now: float) -> float:
        """Record a failure; returns how long the proxy is now considered down (seconds).

        A failure while already down (concurrent attempts, or a try because nothing else was
        up) does not lengthen the back-off; one after it expired doubles it.
        """
        key = self._key(proxy)
        prev = self._down.get(key)
        if prev is not None and prev.until > now:
            return prev.until - now
        backoff = self.start if prev is None else min(prev.backoff * 2, self.maximum)
        self._down[key] = _Down(now + backoff, backoff)
        return backoff

    def mark_ok(self, proxy: ProxyRoute) -> None:
        self._down.pop(self._key(proxy), None)

    def is_up(self, proxy: ProxyRoute | None, now: float) -> bool:
        if proxy is None:
            return True
        down = self._down.get(self._key(proxy))
        return down is None or down.until <= now

    def down(self, now: float) -> list[tuple[str, int, float]]:
        """``(server, port, seconds left)`` of every proxy currently considered down."""
        return [(k[0], k[1], d.until - now) for k, d in self._down.items() if d.until > now]


@dataclass
class SourceRotation:
    """Round robin over source lists, per key (e.g. transport and family), skipping proxies down.

    `order` returns the sources to try in turn for one connection: starting at the next
    position, duplicates removed (a repeated entry weights the rotation, it is not retried),
    sources whose proxy is up first; those whose proxy is down only when none is up.
    """

    health: ProxyHealth = field(default_factory=ProxyHealth)
    _next: dict[object, int] = field(default_factory=dict)

    def order(
        self, key: object, sources: Sequence[Source], now: float, rotate: bool = True
    ) -> list[Source]:
        if not sources:
            return []
        if rotate:
            if len(self._next) > MAX_ROTATION_KEYS and key not in self._next:
                self._next.clear()  # hook-made source lists are many; positions are cheap
            start = self._next.get(key, 0) % len(sources)
            self._next[key] = start + 1
            turned = [*sources[start:], *sources[:start]]
        else:
            turned = list(sources)
        unique = list(dict.fromkeys(turned))
        up = [s for s in unique if self.health.is_up(s.proxy, now)]
        return up or unique
