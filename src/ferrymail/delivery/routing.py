"""Routing: which transport a recipient takes, and which source IP, HELO and proxy an attempt uses.

Pure logic over the running config (no sockets). Precedence of the proxy for a source:
the address's own ``proxyprotocol`` > the transport's > the transport group's (the config
already merges group into transport); none anywhere means the socket binds the source IP
directly. A pre-delivery hook may replace the sources and the proxy (`sources_from_hook`).

Source choice is per message: weighted round robin per (transport, family), skipping sources
whose proxy or (proxy, source) pair is suspended (`ferrymail.delivery.health.HealthBook`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ferrymail.config.models import Address, ResolvedTransport, RunningConfig
from ferrymail.config.models import ProxyProtocol as ConfigProxy
from ferrymail.config.proxyha import ProxyCheck
from ferrymail.delivery.connect import ProxyRoute, Source
from ferrymail.delivery.errors import DeliveryError
from ferrymail.delivery.health import CheckTarget, HealthBook
from ferrymail.delivery.ipparse import ip_version
from ferrymail.spool import Envelope, RecipientRecord

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
    return ip_version(address)


# -- per-message source choice -----------------------------------------------------------------


@dataclass
class SourceRotation:
    """Round robin over source lists, per key (e.g. transport and family), health-aware.

    `order` is called once per message (per MX address tried) and returns the sources to try in
    turn: the first is this message's choice, made by weighted round robin (an entry repeated in
    the list is chosen that many times per turn), skipping sources whose proxy or (proxy,
    source) pair is suspended (`HealthBook`); the engine then reuses a pooled connection of
    THAT source, so connection reuse does not pin a stream to one IP. Duplicates are removed
    from the fallbacks (a repeated entry weights the choice, it is not retried). A source whose
    suspension ran out becomes this message's probe when the rotation picks it. Only when no
    source is usable are all of them returned (mail still tries rather than waits).
    """

    health: HealthBook = field(default_factory=HealthBook)
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
            # Advance past unusable entries so each usable one keeps its share of turns.
            for step in range(len(sources)):
                if self.health.usable(sources[(start + step) % len(sources)], now):
                    start = (start + step) % len(sources)
                    break
            self._next[key] = start + 1
            turned = [*sources[start:], *sources[:start]]
        else:
            turned = list(sources)
        unique = list(dict.fromkeys(turned))
        up = [s for s in unique if self.health.usable(s, now)]
        if up:
            self.health.usable(up[0], now, claim=True)  # a probing pair: this message probes
        return up or unique


def check_targets(cfg: RunningConfig, hostname: str) -> list[CheckTarget]:
    """Every proxy of the running config that has ``proxyprotocol.check``, with the sources
    the transports send from through it (for probes of suspended pairs). A proxy named in
    several places is checked once, with the first ``check`` found."""
    found: dict[tuple[str, int], tuple[ProxyRoute, ProxyCheck, dict[Source, None]]] = {}
    for tid in cfg.transport_ids():
        transport = cfg.transport(tid)
        candidates: list[ConfigProxy | None] = [transport.proxy_for(None)]
        candidates += [a.proxyprotocol for a in transport.addresses]
        for proxy in candidates:
            if proxy is not None and proxy.check is not None:
                found.setdefault((proxy.server, proxy.port),
                                 (ProxyRoute(proxy.server, proxy.port, proxy.version),
                                  proxy.check, {}))
        plan = transport_sources(transport, hostname)
        for src in (*plan.ipv4, *plan.ipv6):
            if src.proxy is not None and (src.proxy.server, src.proxy.port) in found:
                found[(src.proxy.server, src.proxy.port)][2].setdefault(src, None)
    return [CheckTarget(route, check, tuple(srcs)) for route, check, srcs in found.values()]
