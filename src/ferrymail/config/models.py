"""Frozen typed models of the startup and running configuration.

Startup (``StartupConfig``): listeners, trusted proxies, limits, spool; read once at start.
Running (``RunningConfig``): servers' acceptance and default transport, routing, transport
groups, source addresses, hooks, resolver, queues; swapped as a whole on reload.

Cross-references (address ids, transport ids, unique ids) are checked by ``startup_problems``
and ``running_problems``, which return key paths so that the loader can attach lines. Models
validated outside the loader run the same checks in an after-validator.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StrictBool,
    Tag,
    ValidationInfo,
    model_validator,
)

from .accounts import GroupName, UserName
from .auth import ServerAuth
from .dkim import Dkim, dkim_problems
from .inbound import InboundPolicy
from .operations import Admin, Metrics
from .policies import Cluster, Grouping, Policy, shaping_problems
from .proxyha import ProxyCheck, ProxyHealthPolicy
from .types import (
    DomainPattern,
    Duration,
    HookRef,
    Host,
    Hostname,
    Id,
    IPAddress,
    IPAddressType,
    IPNetwork,
    IPNetworkType,
    NonNegativeInt,
    Port,
    PositiveDuration,
    PositiveInt,
    PositiveSize,
    ProxyVersion,
    address_in,
    domain_matches,
    parse_size,
    split_hook,
)

KeyPath: TypeAlias = tuple[str | int, ...]
Problem: TypeAlias = tuple[KeyPath, str]

# Context key the loader sets to run cross-reference checks itself (to attach lines).
DEFER_CHECKS = "ferrymail_defer_checks"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _tagged(value_tag: str, kinds: tuple[type, ...], expected: str, model: Any) -> Any:
    """``model | False`` as a union that validates only the branch the value's type selects.

    Tags are written ``<...>`` so that they never look like a key of the user's data.
    """

    def pick(v: object) -> str | None:
        if v is False:
            return "<false>"
        if isinstance(v, kinds):
            return value_tag
        return None

    return Annotated[
        Annotated[model, Tag(value_tag)] | Annotated[Literal[False], Tag("<false>")],
        Discriminator(pick, custom_error_type="config_union", custom_error_message=expected),
    ]


# ---------------------------------------------------------------------------------------------
# Startup configuration
# ---------------------------------------------------------------------------------------------

# Loopback only: a wider default (RFC 1918, ULA) let any host there claim any client
# address, one inside relay_networks included. `config check` warns when a proxied
# listener relies on this default.
DEFAULT_TRUSTED_PROXIES = (
    "127.0.0.0/8",
    "::1/128",
)


class Logging(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # operations (observe/log.py): line format and where lines go
    format: Literal["logfmt", "json"] = "logfmt"
    destination: Literal["stderr", "file", "syslog"] = "stderr"
    file: Annotated[str, Field(min_length=1, strict=True)] | None = None  # reopened on SIGUSR1
    syslog_socket: Annotated[str, Field(min_length=1, strict=True)] = "/dev/log"
    syslog_facility: Literal["mail", "daemon", "local0", "local1", "local2", "local3",
                             "local4", "local5", "local6", "local7"] = "mail"

    @model_validator(mode="after")
    def _file_needed(self) -> Logging:
        if self.destination == "file" and self.file is None:
            raise ValueError("logging.destination file needs logging.file (the log's path)")
        return self


# Each worker is a whole interpreter (tens of MB) with its own ports and sockets: a count
# beyond any CPU count in use would only fork the host into the ground.
MAX_WORKERS = 256


class Environment(_Model):
    hostname: Hostname = Field(default_factory=socket.getfqdn)
    pidfile: Annotated[str, Field(min_length=1, strict=True)] = "./var/ferrymail.pid"
    logging: Logging = Field(default_factory=Logging)
    # privileges dropped after binding, before the spool opens (privileges.py)
    user: UserName | None = None
    group: GroupName | None = None
    # worker processes of `ferrymail run` (supervisor.py); None: one per CPU
    workers: Annotated[PositiveInt, Field(le=MAX_WORKERS)] | None = None


class Listener(_Model):
    address: IPAddress | None = None
    port: Port
    proxyprotocol: StrictBool = False
    backlog: PositiveInt = 1024
    # starttls: plain SMTP, STARTTLS offered when the server has a certificate;
    # implicit: TLS from the first byte (after the PROXY header, if any), RFC 8314 §3.3
    tls: Literal["starttls", "implicit"] = "starttls"


class Limits(_Model):
    line_length: Annotated[int, Field(ge=512, strict=True)] = 1000
    message_size: PositiveSize = 52428800
    recipients: PositiveInt = 1000
    errors: PositiveInt = 10
    messages: NonNegativeInt = 0
    # NOOP/RSET/VRFY/HELP per session before each counts as an error; 0 = unlimited
    junk_commands: NonNegativeInt = 100
    # simultaneous connections to the server / from one client address (the PROXY-reported
    # one on a proxied listener); 0 = unlimited
    connections: NonNegativeInt = 1000
    connections_per_client: NonNegativeInt = 50


class ServerTimeouts(_Model):
    proxy: PositiveDuration = 5.0
    command: PositiveDuration = 300.0
    data: PositiveDuration = 600.0
    # command/data are deadlines for a whole request, not only idle timers (Postfix
    # smtpd_per_request_deadline); min_data_rate (bytes/s) extends the data deadline as
    # content arrives, never beyond `data` from now (smtpd_min_data_rate)
    deadline: StrictBool = True
    min_data_rate: PositiveInt = 500


class ServerTLS(_Model):
    cert: Annotated[str, Field(min_length=1, strict=True)] | None = None
    key: Annotated[str, Field(min_length=1, strict=True)] | None = None

    @property
    def enabled(self) -> bool:
        """STARTTLS is offered when both files are configured."""
        return self.cert is not None and self.key is not None


def _default_trusted() -> tuple[IPNetworkType, ...]:
    return tuple(ipaddress.ip_network(n) for n in DEFAULT_TRUSTED_PROXIES)


class StartupServer(_Model):
    id: Id
    type: Literal["smtp"] = "smtp"
    hostname: Hostname | None = None
    listeners: Annotated[tuple[Listener, ...], Field(min_length=1)]
    trusted_proxies: tuple[IPNetwork, ...] = Field(default_factory=_default_trusted)
    limits: Limits = Field(default_factory=Limits)
    timeouts: ServerTimeouts = Field(default_factory=ServerTimeouts)
    tls: ServerTLS = Field(default_factory=ServerTLS)
    policy: InboundPolicy = Field(default_factory=InboundPolicy)

    def trusts_proxy(self, ip: str | IPAddressType) -> bool:
        """Whether a PROXY header from the peer ``ip`` may be believed."""
        return address_in(ip, self.trusted_proxies)


class Spool(_Model):
    path: Annotated[str, Field(min_length=1, strict=True)] = "./var/spool"
    fsync: StrictBool = True
    # kept allocated for delivery results; stores refused without it (spool/reserve.py)
    min_free: Annotated[int, BeforeValidator(parse_size)] = 16 * 1024 * 1024


class StartupConfig(_Model):
    """The non-reloadable configuration: who we are, where we listen, where the spool is."""

    environment: Environment = Field(default_factory=Environment)
    servers: tuple[StartupServer, ...] = ()
    spool: Spool = Field(default_factory=Spool)
    cluster: Cluster | None = None  # instances sharing state through Redis (shaping, proxy health)
    admin: Admin = Field(default_factory=Admin)
    metrics: Metrics = Field(default_factory=Metrics)

    _source: str | None = PrivateAttr(default=None)
    _lines: dict[KeyPath, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> StartupConfig:
        if not (info.context or {}).get(DEFER_CHECKS):
            _raise_problems(startup_problems(self))
        return self

    def server(self, server_id: str) -> StartupServer:
        """The server with this id; KeyError if there is none."""
        for server in self.servers:
            if server.id == server_id:
                return server
        raise KeyError(f"no startup server {server_id!r}")

    def hostname_for(self, server_id: str) -> str:
        """The server's own hostname, else ``environment.hostname``."""
        return self.server(server_id).hostname or self.environment.hostname


def startup_problems(cfg: StartupConfig) -> list[Problem]:
    """Cross-field problems of a startup config, each with the key path it is about."""
    problems: list[Problem] = []
    if cfg.environment.group is not None and cfg.environment.user is None:
        problems.append((("environment", "group"), "environment.group needs environment.user"))
    seen: dict[str, int] = {}
    bound: list[tuple[IPAddressType | None, int, KeyPath]] = []
    for i, server in enumerate(cfg.servers):
        if server.id in seen:
            problems.append(
                (("servers", i, "id"),
                 f"duplicate server id {server.id!r} (also servers[{seen[server.id]}])")
            )
        else:
            seen[server.id] = i
        for j, lst in enumerate(server.listeners):
            here: KeyPath = ("servers", i, "listeners", j)
            for addr, port, where in bound:
                same_host = addr is None or lst.address is None or addr == lst.address
                if port == lst.port and same_host:
                    problems.append(
                        ((*here, "port"), f"listener {_fmt_listen(lst.address, lst.port)} "
                         f"overlaps {_fmt_listen(addr, port)} at {format_path(where)}")
                    )
                    break
            bound.append((lst.address, lst.port, here))
        tls = server.tls
        if (tls.cert is None) != (tls.key is None):
            missing = "key" if tls.key is None else "cert"
            problems.append(
                (("servers", i, "tls", missing), "tls.cert and tls.key must be set together")
            )
        if not tls.enabled:
            for j, lst in enumerate(server.listeners):
                if lst.tls == "implicit":
                    problems.append((("servers", i, "listeners", j, "tls"),
                                     "tls: implicit needs the server's tls.cert and tls.key"))
        for name in ("cert", "key"):
            file = getattr(tls, name)
            if file is not None and not os.path.isfile(file):
                problems.append((("servers", i, "tls", name), f"file not found: {file}"))
    return problems


def _fmt_listen(addr: IPAddressType | None, port: int) -> str:
    if addr is None:
        return f"*:{port}"
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


# ---------------------------------------------------------------------------------------------
# Running configuration
# ---------------------------------------------------------------------------------------------


class ProxyProtocol(_Model):
    """An HAProxy to connect through; the PROXY header names our chosen source address."""

    server: Host
    port: Port
    version: ProxyVersion = 1
    check: ProxyCheck | None = None


ProxyOrFalse = _tagged(
    "<mapping>", (dict, ProxyProtocol),
    "expected a mapping {server, port, version} or false", ProxyProtocol,
)
AddressIds = _tagged(
    "<list>", (list, tuple),
    "expected a list of address ids, or false to use no source of this family",
    tuple[Id, ...],
)


class SourceIP(_Model):
    """Source address ids per family; empty = the OS chooses, false = never use the family."""

    ipv4: AddressIds = ()
    ipv6: AddressIds = ()


class ConnectionTimeout(_Model):
    connect: PositiveDuration = 30.0
    banner: PositiveDuration = 300.0
    command: PositiveDuration = 300.0
    data: PositiveDuration = 600.0
    # A reply that has started must keep arriving at this many bytes/s on average (0: off),
    # judged once min_rate_grace seconds have passed since its first byte: a dripping MX is cut.
    min_rate: NonNegativeInt = 16
    min_rate_grace: PositiveDuration = 10.0


class ConnectionTLS(_Model):
    mode: Literal["disabled", "optional", "optional_verify", "require", "require_verify"] = (
        "optional"
    )


class Reuse(_Model):
    messages: PositiveInt = 100
    idle: Duration = 30.0


class Connection(_Model):
    """How a transport connects. In a transport, keys not given inherit from its group."""

    proxyprotocol: ProxyOrFalse | None = None
    server: Host | None = None
    port: Port = 25
    sourceip: SourceIP = Field(default_factory=SourceIP)
    timeout: ConnectionTimeout = Field(default_factory=ConnectionTimeout)
    tls: ConnectionTLS = Field(default_factory=ConnectionTLS)
    reuse: Reuse = Field(default_factory=Reuse)


class RetryInterval(_Model):
    interval: PositiveDuration
    notify: StrictBool = False


def _interval_items(value: object) -> object:
    # A bare duration is shorthand for {interval: <duration>}.
    if isinstance(value, list):
        return [v if isinstance(v, (dict, RetryInterval)) else {"interval": v}
                for v in value]
    return value


_DEFAULT_INTERVALS = (
    RetryInterval(interval=60),
    RetryInterval(interval=900),
    RetryInterval(interval=3600, notify=True),
)


class Retry(_Model):
    count: NonNegativeInt = 30
    intervals: Annotated[
        tuple[RetryInterval, ...], BeforeValidator(_interval_items), Field(min_length=1)
    ] = _DEFAULT_INTERVALS
    during: PositiveDuration = 432000.0

    def delay(self, attempt: int) -> RetryInterval:
        """The interval after the ``attempt``-th failure (1-based); the last one repeats."""
        return self.intervals[min(max(attempt, 1), len(self.intervals)) - 1]


class Dsn(_Model):
    transport: Id


class Transport(_Model):
    id: Id
    connection: Connection = Field(default_factory=Connection)
    retry: Retry | None = None
    dsn: Dsn | None = None


class TransportGroup(_Model):
    id: Id
    connection: Connection = Field(default_factory=Connection)
    retry: Retry = Field(default_factory=Retry)
    dsn: Dsn | None = None
    transports: tuple[Transport, ...] = ()


class Address(_Model):
    """A named source address, optionally hosted on a proxy (active/active)."""

    id: Id
    address: IPAddress
    hostname: Hostname | None = None
    proxyprotocol: ProxyProtocol | None = None

    @property
    def family(self) -> int:
        """4 or 6."""
        return self.address.version


class ServerRunning(_Model):
    """Reloadable per-server settings: what is accepted and where it goes by default."""

    id: Id
    transport: Id
    domains: tuple[DomainPattern, ...] = ()
    relay_networks: tuple[IPNetwork, ...] = ()
    auth: ServerAuth | None = None  # SMTP AUTH (see config/auth.py)

    def accepts_domain(self, domain: str) -> bool:
        """Whether mail to ``domain`` is accepted from anyone (exact or ``*.`` match)."""
        return any(domain_matches(p, domain) for p in self.domains)

    def may_relay(self, ip: str | IPAddressType) -> bool:
        """Whether the client ``ip`` (PROXY-reported when proxied) may send to any domain."""
        return address_in(ip, self.relay_networks)


def _one_or_more(value: object) -> object:
    return [value] if isinstance(value, str) else value


class RoutingRule(_Model):
    recipientdomain: Annotated[
        tuple[DomainPattern, ...], BeforeValidator(_one_or_more), Field(min_length=1)
    ]
    transport: Id

    def matches(self, domain: str) -> bool:
        return any(domain_matches(p, domain) for p in self.recipientdomain)


class Hooks(_Model):
    predelivery: HookRef | None = None
    timeout: PositiveDuration = 5.0

    def predelivery_target(self) -> tuple[str, str, bool] | None:
        """``(module_or_path, function, is_path)`` of the pre-delivery hook, or None."""
        if self.predelivery is None:
            return None
        return split_hook(self.predelivery, "predelivery")


class Scripting(_Model):
    hooks: Hooks = Field(default_factory=Hooks)


class Resolver(_Model):
    nameservers: tuple[IPAddress, ...] = ()
    port: Port = 53
    timeout: PositiveDuration = 5.0
    cache_size: NonNegativeInt = 10000


class DestinationPolicy(_Model):
    """Per-destination slow start, failure feedback and dead-destination parking.

    See `ferrymail.delivery.destinations` for the rules these numbers drive.
    """

    initial_concurrency: PositiveInt = 2  # a new or recovering destination starts here
    # Share of total_concurrency that destinations with no recent success may hold together.
    unproven_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    recent_success: PositiveDuration = 300.0  # a success younger than this "proves" a destination
    dead_after: PositiveInt = 3  # consecutive connection-level failures that mark it dead
    dead_backoff: PositiveDuration = 60.0  # first parking period; doubles per failed probe
    dead_backoff_max: PositiveDuration = 600.0


class Queues(_Model):
    concurrency: PositiveInt = 20
    total_concurrency: PositiveInt = 500
    hold: bool = False  # true: accept and keep mail, start no deliveries (reloadable)
    destination: DestinationPolicy = Field(default_factory=DestinationPolicy)


@dataclass(frozen=True)
class ResolvedTransport:
    """A transport with everything inherited from its group applied.

    ``connection.proxyprotocol`` is a ProxyProtocol or None (``false`` was turned into None).
    ``ipv4``/``ipv6`` are the source addresses in configured order (repeats kept: they weight
    the choice); empty means the OS chooses. ``use_ipv4``/``use_ipv6`` are False when the
    family was switched off with ``sourceip.ipvN: false``.
    """

    id: str
    group_id: str
    connection: Connection
    retry: Retry
    dsn: Dsn | None
    ipv4: tuple[Address, ...]
    ipv6: tuple[Address, ...]
    use_ipv4: bool
    use_ipv6: bool

    @property
    def addresses(self) -> tuple[Address, ...]:
        """All configured source addresses, IPv4 first."""
        return self.ipv4 + self.ipv6

    def proxy_for(self, address: Address | None) -> ProxyProtocol | None:
        """The proxy to connect through when sending from ``address``.

        An address hosted on a proxy (``addresses[].proxyprotocol``) always uses that proxy;
        otherwise the transport's effective ``connection.proxyprotocol`` applies.
        """
        if address is not None and address.proxyprotocol is not None:
            return address.proxyprotocol
        proxy = self.connection.proxyprotocol
        return proxy if isinstance(proxy, ProxyProtocol) else None


def merge_connection(base: Connection, override: Connection) -> Connection:
    """``override``'s explicitly given keys over ``base``, key by key into sub-mappings.

    ``proxyprotocol`` is replaced as a whole (a proxy is one unit); ``false`` stays ``false``.
    """
    return _merge(base, override)


def _merge(base: _Model, override: _Model) -> Any:
    update: dict[str, Any] = {}
    for name in override.model_fields_set:
        new, old = getattr(override, name), getattr(base, name)
        if (
            isinstance(new, _Model)
            and type(new) is type(old)
            and not isinstance(new, ProxyProtocol)
        ):
            update[name] = _merge(old, new)
        else:
            update[name] = new
    return base.model_copy(update=update)


class RunningConfig(_Model):
    """The reloadable configuration."""

    servers: tuple[ServerRunning, ...] = ()
    routing: tuple[RoutingRule, ...] = ()
    transportgroups: tuple[TransportGroup, ...] = ()
    addresses: tuple[Address, ...] = ()
    scripting: Scripting = Field(default_factory=Scripting)
    resolver: Resolver = Field(default_factory=Resolver)
    queues: Queues = Field(default_factory=Queues)
    dkim: Dkim = Field(default_factory=Dkim)
    # Received: header fields at which a message is failed as a mail loop (5.4.6) instead of
    # being relayed again (RFC 5321 §6.3; Postfix hopcount_limit).
    hop_limit: Annotated[int, Field(ge=1, le=1000, strict=True)] = 50
    policies: tuple[Policy, ...] = ()  # delivery shaping (orchestrator), reloadable
    groupings: tuple[Grouping, ...] = ()
    proxyhealth: ProxyHealthPolicy = Field(default_factory=ProxyHealthPolicy)

    _source: str | None = PrivateAttr(default=None)
    _lines: dict[KeyPath, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> RunningConfig:
        if not (info.context or {}).get(DEFER_CHECKS):
            _raise_problems(running_problems(self))
        return self

    @cached_property
    def _resolved(self) -> dict[str, ResolvedTransport]:
        addresses = {a.id: a for a in self.addresses}
        out: dict[str, ResolvedTransport] = {}
        for group in self.transportgroups:
            for t in group.transports:
                conn = merge_connection(group.connection, t.connection)
                if conn.proxyprotocol is False:
                    conn = conn.model_copy(update={"proxyprotocol": None})
                v4, v6 = conn.sourceip.ipv4, conn.sourceip.ipv6
                out[t.id] = ResolvedTransport(
                    id=t.id,
                    group_id=group.id,
                    connection=conn,
                    retry=t.retry if t.retry is not None else group.retry,
                    dsn=t.dsn if t.dsn is not None else group.dsn,
                    ipv4=tuple(addresses[i] for i in v4) if v4 is not False else (),
                    ipv6=tuple(addresses[i] for i in v6) if v6 is not False else (),
                    use_ipv4=v4 is not False,
                    use_ipv6=v6 is not False,
                )
        return out

    def transport(self, transport_id: str) -> ResolvedTransport:
        """The transport with group inheritance applied; KeyError if unknown."""
        try:
            return self._resolved[transport_id]
        except KeyError:
            raise KeyError(f"no transport {transport_id!r}") from None

    def transport_ids(self) -> list[str]:
        """Every transport id, in file order."""
        return list(self._resolved)

    def address(self, address_id: str) -> Address:
        """The source address with this id; KeyError if unknown."""
        for a in self.addresses:
            if a.id == address_id:
                return a
        raise KeyError(f"no address {address_id!r}")

    def server(self, server_id: str) -> ServerRunning:
        """The running settings of a server; KeyError if unknown."""
        for s in self.servers:
            if s.id == server_id:
                return s
        raise KeyError(f"no running server {server_id!r}")

    def transport_for(self, server_id: str, recipient_domain: str) -> str:
        """Transport id for a recipient domain: first matching routing rule, else the
        server's default transport."""
        for rule in self.routing:
            if rule.matches(recipient_domain):
                return rule.transport
        return self.server(server_id).transport


def _iter_connections(cfg: RunningConfig) -> Iterator[tuple[KeyPath, Connection]]:
    for g, group in enumerate(cfg.transportgroups):
        yield ("transportgroups", g, "connection"), group.connection
        for t, transport in enumerate(group.transports):
            yield ("transportgroups", g, "transports", t, "connection"), transport.connection


def _choices(ids: list[str], what: str) -> str:
    if not ids:
        return f"(no {what} are defined)"
    shown = ", ".join(ids[:20]) + (", ..." if len(ids) > 20 else "")
    return f"(expected one of: {shown})"


def running_problems(cfg: RunningConfig) -> list[Problem]:
    """Cross-reference problems of a running config, each with the key path it is about."""
    problems: list[Problem] = []

    def unique(items: list[tuple[str, KeyPath]], what: str) -> dict[str, KeyPath]:
        first: dict[str, KeyPath] = {}
        for ident, path in items:
            if ident in first:
                problems.append(
                    (path, f"duplicate {what} id {ident!r} (also at {format_path(first[ident])})")
                )
            else:
                first[ident] = path
        return first

    addresses = unique(
        [(a.id, ("addresses", i, "id")) for i, a in enumerate(cfg.addresses)], "address"
    )
    by_id = {a.id: a for a in cfg.addresses}
    unique([(s.id, ("servers", i, "id")) for i, s in enumerate(cfg.servers)], "server")
    unique(
        [(g.id, ("transportgroups", i, "id")) for i, g in enumerate(cfg.transportgroups)],
        "transportgroup",
    )
    transports = unique(
        [
            (t.id, ("transportgroups", g, "transports", i, "id"))
            for g, group in enumerate(cfg.transportgroups)
            for i, t in enumerate(group.transports)
        ],
        "transport",
    )
    transport_ids = list(transports)

    def known_transport(ident: str, path: KeyPath) -> None:
        if ident not in transports:
            problems.append(
                (path, f"unknown transport {ident!r} {_choices(transport_ids, 'transports')}")
            )

    for i, s in enumerate(cfg.servers):
        known_transport(s.transport, ("servers", i, "transport"))
    for i, rule in enumerate(cfg.routing):
        known_transport(rule.transport, ("routing", i, "transport"))
    for g, group in enumerate(cfg.transportgroups):
        if group.dsn is not None:
            known_transport(group.dsn.transport, ("transportgroups", g, "dsn", "transport"))
        for i, t in enumerate(group.transports):
            if t.dsn is not None:
                known_transport(
                    t.dsn.transport, ("transportgroups", g, "transports", i, "dsn", "transport")
                )

    address_ids = list(addresses)
    for path, conn in _iter_connections(cfg):
        for family in ("ipv4", "ipv6"):
            ids = getattr(conn.sourceip, family)
            if ids is False:
                continue
            for k, ident in enumerate(ids):
                here = (*path, "sourceip", family, k)
                addr = by_id.get(ident)
                if addr is None:
                    problems.append(
                        (here, f"unknown address id {ident!r} {_choices(address_ids, 'addresses')}")
                    )
                elif f"ipv{addr.family}" != family:
                    problems.append(
                        (here, f"address {ident!r} is {addr.address}, an IPv{addr.family} "
                         f"address, listed under {family}")
                    )
    problems += shaping_problems(cfg.policies, cfg.groupings)
    problems.extend(dkim_problems(cfg.dkim))
    if cfg.scripting.hooks.predelivery is None:  # a hook may give the sources per message
        problems.extend(_proxy_without_source(cfg))
    return problems


def _proxy_without_source(cfg: RunningConfig) -> list[Problem]:
    """Transports that go through a proxy but name no source address.

    The PROXY header must name the source IP the proxy binds, so such a transport could only
    defer every message until ``retry.during`` runs out; it is refused at load instead.
    """
    problems: list[Problem] = []
    for g, group in enumerate(cfg.transportgroups):
        for i, t in enumerate(group.transports):
            conn = merge_connection(group.connection, t.connection)
            proxy = conn.proxyprotocol
            if not isinstance(proxy, ProxyProtocol):
                continue
            ids = [a for fam in (conn.sourceip.ipv4, conn.sourceip.ipv6) if fam is not False
                   for a in fam]
            if ids:
                continue
            here: KeyPath = ("transportgroups", g, "transports", i)
            where = (format_path((*here, "connection", "proxyprotocol"))
                     if isinstance(t.connection.proxyprotocol, ProxyProtocol)
                     else format_path(("transportgroups", g, "connection", "proxyprotocol")))
            problems.append((here, f"transport {t.id!r} goes through proxy "
                             f"{proxy.server}:{proxy.port} (set at {where}) but names no "
                             "source address: the PROXY header needs one, so every message "
                             "would be deferred; list addresses in connection.sourceip "
                             "(or set the source in a pre-delivery hook)"))
    return problems


def format_path(path: KeyPath) -> str:
    """``('a', 0, 'b')`` -> ``a[0].b``; the empty path is ``(top level)``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _raise_problems(problems: list[Problem]) -> None:
    if problems:
        raise ValueError("; ".join(f"{format_path(p)}: {m}" for p, m in problems))
