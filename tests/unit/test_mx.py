"""MX resolution against a tiny authoritative DNS server on a loopback UDP port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import uvloop

from ferrymail.delivery import DeliveryError, MXHost, Resolver
from ferrymail.delivery.mx import parse_domain_literal

ZONE: dict[str, object] = {
    "example.com": {"MX": ["10 mx1.example.com.", "10 mx2.example.com.",
                           "20 mx3.example.com."]},
    "mx1.example.com": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    "mx2.example.com": {"A": ["192.0.2.2"]},
    "mx3.example.com": {"A": ["192.0.2.3", "192.0.2.33"]},
    "nomx.example": {"A": ["192.0.2.9"]},
    "empty.example": {"TXT": ['"nothing here"']},
    "null.example": {"MX": ["0 ."]},
    "broken.example": "SERVFAIL",
    "slow.example": "TIMEOUT",
    "partial.example": {"MX": ["10 gone.partial.example.", "20 ok.partial.example.",
                               "30 fail.partial.example."]},
    "gone.partial.example": {"TXT": ['"no address"']},
    "ok.partial.example": {"AAAA": ["2001:db8::25"], "A": ["192.0.2.25"]},
    "fail.partial.example": "SERVFAIL",
    "noaddr.example": {"MX": ["10 gone.partial.example.", "20 missing.example."]},
    "allfail.example": {"MX": ["10 fail.partial.example."]},
    "v6only.example": {"MX": ["10 mx6.example."]},
    "mx6.example": {"AAAA": ["2001:db8::6"]},
}


class FakeDNS(asyncio.DatagramProtocol):
    """Answers from ZONE; names not in it are NXDOMAIN; counts the queries."""

    def __init__(self, zone: dict[str, object]) -> None:
        self.zone = zone
        self.queries: list[tuple[str, str]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        q = dns.message.from_wire(data)
        question = q.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        entry = self.zone.get(name)
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        if entry == "TIMEOUT":
            return
        if entry is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
        elif entry == "SERVFAIL":
            r.set_rcode(dns.rcode.SERVFAIL)
        else:
            assert isinstance(entry, dict)
            records = entry.get(rdtype)
            if records:
                r.answer.append(dns.rrset.from_text(question.name, 300, "IN", rdtype, *records))
        assert self.transport is not None
        self.transport.sendto(r.to_wire(), addr)


def run(test: Callable[[Resolver, FakeDNS], Awaitable[None]], timeout: float = 2) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, server = await loop.create_datagram_endpoint(
            lambda: FakeDNS(ZONE), local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        try:
            resolver = Resolver(nameservers=["127.0.0.1"], port=port, timeout=timeout)
            await asyncio.wait_for(test(resolver, server), 20)
        finally:
            transport.close()

    uvloop.run(main())


async def expect_error(coro: Awaitable[object]) -> DeliveryError:
    with pytest.raises(DeliveryError) as ei:
        await coro
    assert ei.value.kind == "dns"
    return ei.value


def test_mx_preference_order_and_addresses():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        hosts = await r.mx("example.com")
        assert [h.preference for h in hosts] == [10, 10, 20]
        assert {h.name for h in hosts[:2]} == {"mx1.example.com", "mx2.example.com"}
        by_name = {h.name: h for h in hosts}
        assert by_name["mx1.example.com"].addresses == ("192.0.2.1", "2001:db8::1")
        assert by_name["mx2.example.com"].addresses == ("192.0.2.2",)
        assert set(hosts[2].addresses) == {"192.0.2.3", "192.0.2.33"}
        v4 = await r.mx("example.com", families=("ipv4",))
        assert {a for h in v4 for a in h.addresses} == {"192.0.2.1", "192.0.2.2", "192.0.2.3",
                                                        "192.0.2.33"}
        v6 = await r.mx("example.com", families=("ipv6",))
        assert v6 == [MXHost("mx1.example.com", 10, ("2001:db8::1",))]

    run(t)


def test_equal_preferences_are_shuffled_and_lookups_cached():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        firsts = set()
        await r.mx("example.com")
        n = len(srv.queries)
        for _ in range(40):
            hosts = await r.mx("example.com")
            firsts.add(hosts[0].name)
            assert hosts[2].name == "mx3.example.com"
        assert firsts == {"mx1.example.com", "mx2.example.com"}
        assert len(srv.queries) == n  # every later lookup came from the cache

    run(t)


def test_cache_hit_sends_no_query():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        assert await r.addresses("mx2.example.com") == ("192.0.2.2",)
        before = list(srv.queries)
        assert ("mx2.example.com", "A") in before
        assert await r.addresses("mx2.example.com") == ("192.0.2.2",)
        assert srv.queries == before

    run(t)


def test_implicit_mx_when_there_is_no_mx_record():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        assert await r.mx("nomx.example") == [MXHost("nomx.example", 0, ("192.0.2.9",))]
        assert await r.mx("NoMX.Example.") == [MXHost("nomx.example", 0, ("192.0.2.9",))]
        e = await expect_error(r.mx("empty.example"))
        assert e.dns == "nodata" and not e.temporary and "empty.example" in e.message

    run(t)


def test_null_mx_is_permanent():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        e = await expect_error(r.mx("null.example"))
        assert e.dns == "nullmx" and not e.temporary and "null.example" in e.message

    run(t)


def test_nxdomain_is_permanent():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        e = await expect_error(r.mx("nowhere.example"))
        assert e.dns == "nxdomain" and not e.temporary and "nowhere.example" in e.message
        e = await expect_error(r.addresses("nowhere.example"))
        assert e.dns == "nxdomain" and not e.temporary

    run(t)


def test_servfail_is_temporary():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        e = await expect_error(r.mx("broken.example"))
        assert e.dns == "other" and e.temporary and "broken.example" in e.message
        e = await expect_error(r.addresses("broken.example"))
        assert e.temporary

    run(t)


def test_timeout_is_temporary():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        t0 = time.monotonic()
        e = await expect_error(r.mx("slow.example"))
        assert time.monotonic() - t0 < 2
        assert e.dns == "other" and e.temporary and "timed out" in e.message

    run(t, timeout=0.4)


def test_mx_hosts_without_addresses_are_skipped():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        hosts = await r.mx("partial.example")
        assert [h.name for h in hosts] == ["ok.partial.example"]
        assert set(hosts[0].addresses) == {"192.0.2.25", "2001:db8::25"}
        assert hosts[0].addresses[0] == "192.0.2.25"  # families order: ipv4 first
        e = await expect_error(r.mx("noaddr.example"))
        assert e.temporary and e.dns == "nodata"
        assert "gone.partial.example" in e.message and "missing.example" in e.message
        e = await expect_error(r.mx("allfail.example"))
        assert e.temporary and e.dns == "other"

    run(t)


def test_ipfamily_mismatch():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        e = await expect_error(r.mx("v6only.example", families=("ipv4",)))
        assert e.dns == "ipfamily" and not e.temporary
        assert (await r.mx("v6only.example"))[0].addresses == ("2001:db8::6",)
        assert await r.addresses("mx6.example", families=("ipv4",)) == ()
        with pytest.raises(ValueError):
            await r.mx("example.com", families=("ipv5",))

    run(t)


def test_domain_literals_resolve_to_themselves():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        assert await r.mx("[192.0.2.1]") == [MXHost("192.0.2.1", 0, ("192.0.2.1",))]
        assert await r.mx("[IPv6:2001:db8::1]") == [MXHost("2001:db8::1", 0, ("2001:db8::1",))]
        assert await r.addresses("192.0.2.7") == ("192.0.2.7",)
        assert await r.addresses("[IPv6:2001:db8::7]") == ("2001:db8::7",)
        e = await expect_error(r.mx("[IPv6:2001:db8::1]", families=("ipv4",)))
        assert e.dns == "ipfamily"
        for bad in ("[999.1.1.1]", "[2001:db8::1]", "[IPv6:192.0.2.1]", "[]"):
            e = await expect_error(r.mx(bad))
            assert not e.temporary and bad in e.message
        assert srv.queries == []

    run(t)


def test_parse_domain_literal():
    assert parse_domain_literal("example.com") is None
    assert parse_domain_literal("[192.0.2.1]") == "192.0.2.1"
    assert parse_domain_literal("[ipv6:2001:DB8::1]") == "2001:db8::1"


def test_invalid_domain_name_is_permanent():
    async def t(r: Resolver, srv: FakeDNS) -> None:
        e = await expect_error(r.mx("a" * 70 + ".example"))
        assert not e.temporary and e.dns == "other"

    run(t)
