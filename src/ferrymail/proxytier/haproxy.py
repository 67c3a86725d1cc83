"""HAProxy configuration for the proxy tier, written from ferrymail's own configuration.

`outbound_listen` is the seed's ``listen outboundsmtp`` section: HAProxy accepts a PROXY header
from ferrymail and connects to the MX transparently from the source address the header names
(``usesrc clientip``; HAProxy must run as root, so the file has no ``user`` directive).

`haproxy_config` writes a whole ``haproxy.cfg`` for one proxy host: the outbound ``listen``
section on the proxy's address and port, restricted to the MTA hosts' networks (the seed's
access policy, applied by ``tcp-request connection`` to the real peer) and to the source IPs
this proxy hosts (``tcp-request session`` sees the address the PROXY header names), and, for
inbound mail, a frontend/backend per startup server with a proxied listener, relaying to every
ferrymail instance with ``send-proxy-v2 check`` (the seed's inbound example).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from ferrymail.config.models import RunningConfig, StartupConfig


def _hp(host: str, port: int | None = None) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port is None else f"{h}:{port}"


def outbound_listen(bind_host: str, bind_port: int, *, allowed: str | Sequence[str] = "127.0.0.0/8",
                    name: str = "outboundsmtp", sources: Sequence[str] = ()) -> str:
    """The seed's outbound ``listen`` section, binding ``bind_host:bind_port``.

    ``allowed`` is the network(s) whose MTAs may connect (the seed's access policy ACL);
    ``sources`` (optional) are the source IPs this proxy hosts: a PROXY header naming any other
    address is refused before HAProxy tries to bind it.
    """
    nets = [allowed] if isinstance(allowed, str) else list(allowed)
    lines = [
        f"listen {name}",
        f"    acl is_local src {' '.join(nets)}",
        "    tcp-request connection reject if !is_local",
    ]
    if sources:
        lines += [f"    acl own_source src {' '.join(sources)}",
                  "    tcp-request session reject if !own_source"]
    lines += [
        f"    bind {_hp(bind_host, bind_port)} accept-proxy",
        "    mode tcp",
        "    option tcplog",
        "    use-server v4 if { src 0.0.0.0/0 }",
        "    use-server v6 if { src ::/0 }",
        "    server v4 0.0.0.0 source 0.0.0.0 usesrc clientip",
        "    server v6 ::: source ::: usesrc clientip",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ProxyHost:
    """One proxy of the running config (``server:port``) and the source IPs sent through it."""

    server: str
    port: int
    sources: tuple[str, ...]

    def __str__(self) -> str:
        return _hp(self.server, self.port)


def proxies(running: RunningConfig) -> list[ProxyHost]:
    """Every proxy the transports use, in file order, each with its source IPs (an address's
    own proxy wins over the transport's, as at delivery)."""
    found: dict[tuple[str, int], dict[str, None]] = {}
    for tid in running.transport_ids():
        transport = running.transport(tid)
        default = transport.proxy_for(None)
        if default is not None:
            found.setdefault((default.server, default.port), {})
        for a in transport.addresses:
            p = transport.proxy_for(a)
            if p is not None:
                found.setdefault((p.server, p.port), {})[str(a.address)] = None
    for a in running.addresses:  # addresses hosted on a proxy but used by no transport yet
        if a.proxyprotocol is not None:
            found.setdefault((a.proxyprotocol.server, a.proxyprotocol.port),
                             {})[str(a.address)] = None
    return [ProxyHost(s, p, tuple(ips)) for (s, p), ips in found.items()]


def select_proxy(running: RunningConfig, wanted: str | None) -> ProxyHost:
    """The proxy named ``host:port`` (or the only one); ValueError naming the choices."""
    hosts = proxies(running)
    if not hosts:
        raise ValueError("the running config sends through no proxy "
                         "(no proxyprotocol in transportgroups, transports or addresses)")
    if wanted is None:
        if len(hosts) == 1:
            return hosts[0]
        raise ValueError("several proxies in the running config; choose one with --proxy: "
                         + ", ".join(str(h) for h in hosts))
    host, _, port = wanted.rpartition(":")
    host = host.strip("[]")
    for h in hosts:
        if h.server == host and str(h.port) == port:
            return h
    raise ValueError(f"proxy {wanted} is not in the running config; known: "
                     + ", ".join(str(h) for h in hosts))


def _net(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP network") from None


def haproxy_config(startup: StartupConfig, running: RunningConfig, *, proxy: str | None = None,
                   instances: Sequence[str] = (), allowed: Sequence[str] = (),
                   inbound_bind: str = "0.0.0.0", timeout_connect: str = "10s",
                   retries: int = 0, pidfile: str | None = None) -> str:
    """A whole ``haproxy.cfg`` for the proxy ``proxy`` (``host:port``; None: the only one).

    ``instances``: ferrymail hosts (IPs) that inbound mail goes to; ``allowed``: networks whose
    MTAs may use the outbound listener (default: the instances' addresses, else 127.0.0.0/8).
    ``retries`` 0: MX fallback is the MTA's job, and a failed bind should surface at once.
    ValueError for a proxy that is not configured or a malformed network.
    """
    host = select_proxy(running, proxy)
    nets = [_net(n) for n in allowed] or [_net(i) for i in instances] or ["127.0.0.0/8"]
    out = [
        "# haproxy.cfg for proxy " + str(host) + ", generated by `ferrymail haproxy-config`.",
        "# HAProxy must run as root (usesrc clientip): no `user` directive.",
    ]
    if host.sources:
        out.append("# Source IPs this host must hold (ip addr add … on this host): "
                   + " ".join(host.sources))
    out += ["global", "    log stdout format raw local0 info"]
    if pidfile:
        out.append(f"    pidfile {pidfile}")
    out += [
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        f"    timeout connect {timeout_connect}",
        "    timeout client 10m",
        "    timeout server 10m",
        f"    retries {retries}",
        "",
        outbound_listen(host.server, host.port, allowed=nets, sources=host.sources),
    ]
    proxied = [s for s in startup.servers if any(lst.proxyprotocol for lst in s.listeners)]
    for server in proxied:
        for lst in server.listeners:
            if not lst.proxyprotocol:
                continue
            name = f"smtp-inbound-{server.id}-{lst.port}"
            out += [f"frontend {name}",
                    f"    bind {_hp(inbound_bind, lst.port)}",
                    "    mode tcp",
                    "    option tcplog",
                    f"    default_backend {name}-backend",
                    "",
                    f"backend {name}-backend",
                    "    mode tcp",
                    "    balance roundrobin"]
            if not instances:
                out.append("    # no --instance given: add `server NAME HOST:PORT check "
                           "send-proxy-v2` per ferrymail instance")
            for i, inst in enumerate(instances, 1):
                out.append(f"    server ferrymail{i} {_hp(inst, lst.port)} check send-proxy-v2")
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
