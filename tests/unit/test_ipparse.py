import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferrymail.delivery.ipparse import ip_version, parse_ip


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_parse_ip_matches_ipaddress(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    text = str(ip)
    assert parse_ip(text) == ipaddress.ip_address(text)
    assert parse_ip(text) is parse_ip(text)  # the second comes from the cache
    assert ip_version(text) == ip.version


@pytest.mark.parametrize("text", ["", "example.com", "256.1.1.1", "[127.0.0.1]", "::1%"])
def test_parse_ip_refuses_what_ipaddress_refuses(text: str) -> None:
    for _ in range(2):  # a failure is not cached as a result
        with pytest.raises(ValueError):
            parse_ip(text)
    with pytest.raises(ValueError):
        ip_version(text)
