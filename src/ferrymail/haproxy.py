"""HAProxy configuration text for the seed's proxy tier.

`outbound_listen` is the seed's `listen outboundsmtp` section: HAProxy accepts a PROXY header
from ferrymail and connects to the MX transparently from the source address the header names
(`usesrc clientip`; HAProxy must run as root or with CAP_NET_ADMIN).
"""

from __future__ import annotations


def outbound_listen(bind_host: str, bind_port: int, *, allowed: str = "127.0.0.0/8",
                    name: str = "outboundsmtp") -> str:
    """The seed's outbound `listen` section, binding ``bind_host:bind_port``.

    ``allowed`` is the network whose MTAs may connect (the seed's access policy ACL).
    """
    host = f"[{bind_host}]" if ":" in bind_host else bind_host
    return f"""listen {name}
    acl is_local src {allowed}
    tcp-request connection reject if !is_local
    bind {host}:{bind_port} accept-proxy
    mode tcp
    option tcplog
    use-server v4 if {{ src 0.0.0.0/0 }}
    use-server v6 if {{ src ::/0 }}
    server v4 0.0.0.0 source 0.0.0.0 usesrc clientip
    server v6 ::: source ::: usesrc clientip
"""
