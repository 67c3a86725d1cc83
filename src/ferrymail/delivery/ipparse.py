"""IP address text -> ``ipaddress`` object, memoised for the delivery hot path.

Every delivery attempt parses the same few addresses (the MX's, the source's, the
listeners') several times, and ``ipaddress.ip_address`` is pure Python (about 5 µs a call).
`parse_ip` keeps the last `CACHE_SIZE` distinct texts; the objects are immutable, so handing
out one to several callers is safe.
"""

from __future__ import annotations

import functools
import ipaddress

CACHE_SIZE = 4096  # distinct address texts kept (LRU)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=CACHE_SIZE)
def parse_ip(text: str) -> IPAddress:
    """``ipaddress.ip_address(text)``, cached. ValueError for a text that is no address
    (not cached: such texts are rare and must not fill the cache)."""
    return ipaddress.ip_address(text)


def ip_version(text: str) -> int:
    """4 or 6; ValueError for a text that is no address."""
    return parse_ip(text).version
