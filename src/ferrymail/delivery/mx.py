"""MX / A / AAAA resolution (RFC 5321 §5.1, RFC 7505) with a TTL-aware cache.

MX hosts come in preference order, equal preferences shuffled so that load spreads; a domain
without MX records is its own implicit MX; a null MX (``0 .``) and NXDOMAIN are permanent
failures; SERVFAIL and timeouts are temporary. Domain literals (``[192.0.2.1]``,
``[IPv6:2001:db8::1]``) resolve to themselves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from ferrymail.delivery.errors import DeliveryError
from ferrymail.delivery.ipparse import ip_version, parse_ip

FAMILIES: tuple[str, ...] = ("ipv4", "ipv6")
_RDTYPE = {"ipv4": "A", "ipv6": "AAAA"}
_rng = random.Random()


@dataclass(frozen=True)
class MXHost:
    """One MX to try: its name, preference and IPs in the order to try them."""

    name: str
    preference: int
    addresses: tuple[str, ...]


@dataclass
class _HostLookup:
    addresses: list[str]
    nxdomain: bool = False
    error: DeliveryError | None = None  # a temporary failure of one of the queries


def _check_families(families: Sequence[str]) -> tuple[str, ...]:
    fams = tuple(families)
    bad = [f for f in fams if f not in _RDTYPE]
    if bad or not fams:
        raise ValueError(f"families must be a non-empty selection of {FAMILIES}, got {fams!r}")
    return fams


def _ip_family(ip: str) -> str:
    return "ipv6" if ip_version(ip) == 6 else "ipv4"


def parse_domain_literal(text: str) -> str | None:
    """``[192.0.2.1]`` -> ``192.0.2.1``, ``[IPv6:2001:db8::1]`` -> ``2001:db8::1``; else None.

    Raises DeliveryError (dns, permanent) for a bracketed text that is no address literal.
    """
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    is_v6 = inner[:5].upper() == "IPV6:"
    if is_v6:
        inner = inner[5:]
    try:
        ip = ipaddress.ip_address(inner)
    except ValueError:
        ip = None
    if ip is None or (ip.version == 6) != is_v6:
        raise DeliveryError("dns", f"invalid address literal {text}", temporary=False,
                            dns="other")
    return str(ip)


class Resolver:
    """Async MX and address lookups over dnspython, with an LRU cache that honours TTLs.

    ``nameservers`` empty: use the system's resolv.conf. ``timeout``: seconds per lookup.
    """

    def __init__(self, nameservers: Sequence[str] = (), port: int = 53, timeout: float = 5,
                 cache_size: int = 10000) -> None:
        if nameservers:
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = list(nameservers)
        else:
            try:
                res = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration as e:
                raise DeliveryError("config", f"no DNS resolver configured ({e}); pass "
                                    "nameservers explicitly", temporary=False) from None
        res.port = port
        res.timeout = timeout
        res.lifetime = timeout
        if cache_size > 0:
            res.cache = dns.resolver.LRUCache(cache_size)
        self._res = res
        self.timeout = timeout

    # ----------------------------------------------------------------- public

    async def mx(self, domain: str, *, families: Sequence[str] = FAMILIES) -> list[MXHost]:
        """The MX hosts of `domain` with their addresses (only of `families`), in order to try.

        Raises DeliveryError kind dns: nxdomain / nullmx (permanent), nodata (no MX and no
        address: permanent), ipfamily (addresses only of other families: permanent), other
        (SERVFAIL, timeout, no MX host with an address: temporary).
        """
        fams = _check_families(families)
        literal = parse_domain_literal(domain)
        if literal is not None:
            if _ip_family(literal) not in fams:
                raise DeliveryError("dns", f"address literal {domain} is not of the families "
                                    f"{'/'.join(fams)}", temporary=False, dns="ipfamily")
            return [MXHost(literal, 0, (literal,))]
        name = self._name(domain)
        try:
            answer = await self._res.resolve(name, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise DeliveryError("dns", f"domain {domain} does not exist (NXDOMAIN)",
                                temporary=False, dns="nxdomain") from None
        except dns.resolver.NoAnswer:
            return [await self._implicit_mx(domain, name, fams)]
        except dns.exception.DNSException as e:
            raise self._temporary(f"MX lookup for {domain}", e) from None

        records = [(int(r.preference), r.exchange) for r in answer]
        real = [(p, ex) for p, ex in records if ex != dns.name.root]
        if not real:
            raise DeliveryError("dns", f"domain {domain} accepts no mail (null MX)",
                                temporary=False, dns="nullmx")
        by_pref: dict[int, list[str]] = {}
        for pref, ex in real:
            host = ex.to_text(omit_final_dot=True).lower()
            if host not in by_pref.setdefault(pref, []):
                by_pref[pref].append(host)
        ordered: list[tuple[int, str]] = []
        for pref in sorted(by_pref):
            hosts = by_pref[pref]
            _rng.shuffle(hosts)
            ordered += [(pref, h) for h in hosts if all(h != o for _, o in ordered)]
        lookups = await asyncio.gather(*(self._lookup(h, fams) for _, h in ordered))
        result = [MXHost(h, pref, tuple(lk.addresses))
                  for (pref, h), lk in zip(ordered, lookups, strict=True) if lk.addresses]
        if result:
            return result
        names = ", ".join(h for _, h in ordered)
        errors = [lk.error for lk in lookups if lk.error is not None]
        if errors:
            raise DeliveryError("dns", f"no address for any MX of {domain} ({names}): "
                                f"{errors[0].message}", dns="other")
        other = tuple(f for f in FAMILIES if f not in fams)
        if other:
            more = await asyncio.gather(*(self._lookup(h, other) for _, h in ordered))
            if any(lk.addresses for lk in more):
                raise DeliveryError("dns", f"the MX hosts of {domain} ({names}) have no "
                                    f"{'/'.join(fams)} address", temporary=False,
                                    dns="ipfamily")
        raise DeliveryError("dns", f"no MX host of {domain} ({names}) has an address",
                            dns="nodata")

    async def addresses(self, host: str, families: Sequence[str] = FAMILIES) -> tuple[str, ...]:
        """A/AAAA of `host` in the order to try (IP literals returned as they are).

        Returns () when the name exists without addresses of `families`; raises DeliveryError
        kind dns: nxdomain (permanent), other (SERVFAIL, timeout: temporary).
        """
        fams = _check_families(families)
        literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ip = parse_ip(literal.removeprefix("IPv6:"))
        except ValueError:
            ip = None
        if ip is not None:
            return (str(ip),) if _ip_family(str(ip)) in fams else ()
        lk = await self._lookup(host, fams)
        if lk.addresses:
            return tuple(lk.addresses)
        if lk.error is not None:
            raise lk.error
        if lk.nxdomain:
            raise DeliveryError("dns", f"host {host} does not exist (NXDOMAIN)",
                                temporary=False, dns="nxdomain")
        return ()

    # ----------------------------------------------------------------- internals

    def _name(self, domain: str) -> dns.name.Name:
        try:
            return dns.name.from_text(domain)
        except dns.exception.DNSException as e:
            raise DeliveryError("dns", f"invalid domain name {domain!r}: {e}",
                                temporary=False, dns="other") from None

    async def _implicit_mx(self, domain: str, name: dns.name.Name,
                           fams: tuple[str, ...]) -> MXHost:
        lk = await self._lookup(domain, fams)
        if lk.addresses:
            return MXHost(domain.rstrip(".").lower(), 0, tuple(lk.addresses))
        if lk.error is not None:
            raise lk.error
        other = tuple(f for f in FAMILIES if f not in fams)
        if other and (await self._lookup(domain, other)).addresses:
            raise DeliveryError("dns", f"domain {domain} has no MX and no {'/'.join(fams)} "
                                "address", temporary=False, dns="ipfamily")
        raise DeliveryError("dns", f"domain {domain} has no MX and no address record",
                            temporary=False, dns="nodata")

    async def _lookup(self, host: str, fams: tuple[str, ...]) -> _HostLookup:
        try:
            name = self._name(host)
        except DeliveryError as e:
            return _HostLookup([], error=e)
        types = [_RDTYPE[f] for f in fams]
        answers = await asyncio.gather(
            *(self._res.resolve(name, t, search=False) for t in types), return_exceptions=True)
        out = _HostLookup([])
        for rdtype, ans in zip(types, answers, strict=True):
            if isinstance(ans, dns.resolver.NoAnswer):
                continue
            if isinstance(ans, dns.resolver.NXDOMAIN):
                out.nxdomain = True
                continue
            if isinstance(ans, dns.exception.DNSException):
                out.error = out.error or self._temporary(f"{rdtype} lookup for {host}", ans)
                continue
            if isinstance(ans, BaseException):
                raise ans
            ips = [r.address for r in ans]
            _rng.shuffle(ips)
            out.addresses += ips
        return out

    def _temporary(self, what: str, e: BaseException) -> DeliveryError:
        if isinstance(e, dns.exception.Timeout):
            detail = f"timed out after {self.timeout:g}s"
        elif isinstance(e, dns.resolver.NoNameservers):
            detail = "no nameserver answered (SERVFAIL or refused)"
        else:
            detail = str(e) or type(e).__name__
        return DeliveryError("dns", f"{what} failed: {detail}", dns="other")
