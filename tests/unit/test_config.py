"""Configuration: YAML -> frozen models, inheritance, cross-references, file:line errors."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pydantic
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferrymail.config import (
    ConfigError,
    ConfigErrors,
    ProxyProtocol,
    RunningConfig,
    StartupConfig,
    check_files,
    cross_check,
    load_running,
    load_startup,
    parse_duration,
    parse_running,
    parse_size,
    parse_startup,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# The seed's three YAML snippets, verbatim apart from indentation (the seed text lost it).
SEED_TRANSPORTGROUPS = """\
transportgroups:
  - id: default
    connection:
      proxyprotocol:
        server: 192.168.1.2 # IP address of the proxy server, can be specified here if all addresses are on the same proxy tier
        port: 2525
"""  # noqa: E501
SEED_ADDRESSES = """\
addresses:
  - id: "proxied-addr-1"
    hostname: host.example.com
    address: 199.60.103.103 # Source IP on the proxy
    proxyprotocol:
      server: 192.168.1.2
      port: 2525
"""
SEED_SERVERS = """\
servers:
  - id: viaproxy
    type: smtp
    listeners:
      - port: 25
        proxyprotocol: true
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line containing ``needle``."""
    hits = [i for i, line in enumerate(textwrap.dedent(text).splitlines(), 1) if needle in line]
    return hits[nth - 1]


def one_error(excinfo: pytest.ExceptionInfo[ConfigError]) -> ConfigError:
    errs = excinfo.value.errors
    assert len(errs) == 1, str(excinfo.value)
    return errs[0]


# ---------------------------------------------------------------------------------------------
# The seed's snippets and the full examples
# ---------------------------------------------------------------------------------------------


def test_seed_transportgroups_snippet_is_a_running_config(tmp_path):
    cfg = load_running(write(tmp_path, "r.yaml", SEED_TRANSPORTGROUPS))
    (group,) = cfg.transportgroups
    assert group.id == "default"
    assert group.connection.proxyprotocol == ProxyProtocol(server="192.168.1.2", port=2525)
    assert group.connection.proxyprotocol.version == 1


def test_seed_addresses_snippet_is_a_running_config(tmp_path):
    cfg = load_running(write(tmp_path, "r.yaml", SEED_ADDRESSES))
    addr = cfg.address("proxied-addr-1")
    assert addr.address == ipaddress.ip_address("199.60.103.103")
    assert addr.hostname == "host.example.com"
    assert addr.proxyprotocol == ProxyProtocol(server="192.168.1.2", port=2525, version=1)
    assert addr.family == 4


def test_seed_servers_snippet_is_a_startup_config(tmp_path):
    cfg = load_startup(write(tmp_path, "s.yaml", SEED_SERVERS))
    server = cfg.server("viaproxy")
    (listener,) = server.listeners
    assert (listener.port, listener.proxyprotocol, listener.address) == (25, True, None)
    assert server.type == "smtp"
    # Issue 7 item 14: the default trusts loopback only, not RFC 1918 / ULA hosts.
    assert server.trusts_proxy("127.0.0.1") and server.trusts_proxy("::1")
    assert not server.trusts_proxy("10.1.2.3") and not server.trusts_proxy("192.168.1.2")
    assert not server.trusts_proxy("fd00::1") and not server.trusts_proxy("8.8.8.8")


def test_check_files_classifies_the_seed_snippets(tmp_path):
    paths = [
        str(write(tmp_path, n, t))
        for n, t in [("a.yaml", SEED_TRANSPORTGROUPS), ("b.yaml", SEED_ADDRESSES),
                     ("c.yaml", SEED_SERVERS)]
    ]
    assert check_files(paths) == []


FULL_STARTUP = """\
environment:
  hostname: mta1.example.com          # our name in banners, Received:, default HELO for DSNs
  pidfile: ./var/ferrymail.pid        # used by `ferrymail reload` to send SIGHUP
  logging: { level: info }            # debug|info|warning|error
servers:
  - id: viaproxy                      # required, unique
    type: smtp                        # only smtp for now
    hostname: null                    # overrides environment.hostname for this server
    listeners:                        # at least one
      - address: null                 # IPv4/IPv6 literal; null = all IPv4 and IPv6 addresses
        port: 25                      # required, 1..65535
        proxyprotocol: false          # expect a PROXY header (v1 or v2) before the banner
        backlog: 1024
    trusted_proxies: [127.0.0.0/8, ::1/128, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7]
    limits:
      line_length: 1000               # max octets of a command line, CRLF included
      message_size: 52428800          # SIZE; bytes
      recipients: 1000                # per message
      errors: 10                      # bad commands per session before 421 + close
      messages: 0                     # per connection, 0 = unlimited
    timeouts:                         # seconds
      proxy: 5                        # to receive the PROXY header
      command: 300
      data: 600
    tls: { cert: null, key: null }    # STARTTLS offered when both are set (files must exist)
spool:
  path: ./var/spool
  fsync: true
"""

CONNECTION = """\
proxyprotocol: { server: 192.168.1.2, port: 2525, version: 1 }
server: 10.0.0.25
port: 25
sourceip: { ipv4: [proxied-addr-1], ipv6: false }
timeout: { connect: 30, banner: 300, command: 300, data: 600 }
tls: { mode: optional }
reuse: { messages: 100, idle: 30 }
"""

FULL_RUNNING = """\
servers:
  - id: viaproxy
    transport: mx            # default transport id for mail received on this server
    domains: [example.com]   # recipient domains accepted from anyone
    relay_networks: []       # CIDRs/IPs that may send to any domain
routing:                     # optional rules, first match wins, else the server's transport
  - recipientdomain: [example.org, "*.example.net"]
    transport: internal
transportgroups:
  - id: default
    connection:
{group_conn}
    retry: {{ count: 30, intervals: [{{interval: 60}}, {{interval: 900}}, {{interval: 3600, notify: true}}], during: 432000 }}
    dsn: {{ transport: mx }}
    transports:
      - id: mx
        connection:
{transport_conn}
        retry: {{ count: 3, intervals: [{{interval: 5m}}], during: 1h }}
        dsn: {{ transport: internal }}
      - id: internal
addresses:
  - id: proxied-addr-1
    address: 199.60.103.103
    hostname: host.example.com
    proxyprotocol: {{ server: 192.168.1.2, port: 2525, version: 1 }}
scripting:
  hooks:
    predelivery: null
    timeout: 5
resolver:
  nameservers: []
  port: 53
  timeout: 5
  cache_size: 10000
queues:
  concurrency: 20
  total_concurrency: 500
""".format(  # noqa: E501
    group_conn=textwrap.indent(CONNECTION, " " * 6),
    transport_conn=textwrap.indent(CONNECTION, " " * 10),
)


def test_full_startup_example_loads(tmp_path):
    cfg = load_startup(write(tmp_path, "startup.yaml", FULL_STARTUP))
    server = cfg.server("viaproxy")
    assert cfg.environment.hostname == "mta1.example.com"
    assert cfg.hostname_for("viaproxy") == "mta1.example.com"
    assert ipaddress.ip_network("::1/128") in server.trusted_proxies
    assert server.limits.message_size == 52428800 and server.timeouts.proxy == 5
    assert not server.tls.enabled
    assert cfg.spool.fsync and cfg.spool.path == "./var/spool"


def test_full_running_example_loads(tmp_path):
    cfg = load_running(write(tmp_path, "running.yaml", FULL_RUNNING))
    mx = cfg.transport("mx")
    assert mx.group_id == "default"
    assert mx.connection.server == "10.0.0.25" and mx.connection.port == 25
    assert [a.id for a in mx.ipv4] == ["proxied-addr-1"] and mx.ipv6 == ()
    assert mx.use_ipv4 and not mx.use_ipv6
    assert mx.retry.count == 3 and mx.retry.during == 3600
    assert mx.dsn is not None and mx.dsn.transport == "internal"
    internal = cfg.transport("internal")
    assert internal.retry.count == 30 and internal.dsn.transport == "mx"
    assert cfg.transport_for("viaproxy", "Example.ORG.") == "internal"
    assert cfg.transport_for("viaproxy", "a.b.example.net") == "internal"
    assert cfg.transport_for("viaproxy", "example.net") == "mx"


def test_startup_defaults_when_keys_are_omitted(tmp_path):
    cfg = load_startup(write(tmp_path, "s.yaml", "servers: [{id: a, listeners: [{port: 25}]}]"))
    s = cfg.server("a")
    assert s.listeners[0].backlog == 1024 and not s.listeners[0].proxyprotocol
    assert s.limits.line_length == 1000 and s.limits.errors == 10 and s.limits.messages == 0
    assert (s.timeouts.command, s.timeouts.data) == (300, 600)
    assert cfg.environment.pidfile == "./var/ferrymail.pid"
    assert cfg.environment.logging.level == "info"
    assert cfg.environment.hostname  # socket.getfqdn()


def test_running_defaults_when_keys_are_omitted():
    cfg = parse_running("{}")
    assert cfg.queues.concurrency == 20 and cfg.queues.total_concurrency == 500
    assert cfg.resolver.port == 53 and cfg.resolver.cache_size == 10000
    assert cfg.scripting.hooks.timeout == 5 and cfg.scripting.hooks.predelivery is None
    assert parse_running("").servers == ()  # an empty file is an all-defaults file
    assert parse_running("# nothing\n~\n").servers == ()


def test_models_are_frozen():
    cfg = load_running()
    with pytest.raises(pydantic.ValidationError):
        cfg.queues.concurrency = 5  # type: ignore[misc]
    assert hash(cfg) == hash(load_running())


# ---------------------------------------------------------------------------------------------
# Embedded defaults and examples
# ---------------------------------------------------------------------------------------------


def test_embedded_defaults_load_and_agree():
    startup, running = load_startup(), load_running()
    (server,) = startup.servers
    assert server.id == "default"
    (lst,) = server.listeners
    assert (str(lst.address), lst.port, lst.proxyprotocol) == ("127.0.0.1", 2525, False)
    assert startup.spool.path == "./var/spool"
    rs = running.server("default")
    assert rs.transport == "mx" and rs.domains == ()
    assert rs.may_relay("127.0.0.1") and rs.may_relay("::1") and not rs.may_relay("10.0.0.1")
    mx = running.transport("mx")
    assert mx.group_id == "default" and mx.connection.server is None
    assert mx.addresses == () and mx.connection.proxyprotocol is None
    assert [i.interval for i in mx.retry.intervals] == [60, 900, 3600]
    assert mx.retry.during == 432000 and mx.dsn.transport == "mx"
    cross_check(startup, running, "running.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_loads(name):
    path = EXAMPLES / name
    assert check_files([str(path)]) == []
    if name.startswith("startup"):
        load_startup(path)
    else:
        cross_check(load_startup(EXAMPLES / "startup-proxied.yaml"), load_running(path), name)


def test_yaml_blocks_in_the_configuration_doc_load(tmp_path):
    doc = (EXAMPLES.parent / "docs" / "configuration.md").read_text()
    blocks = doc.split("```yaml\n")[1:]
    assert len(blocks) >= 6
    paths = []
    for i, block in enumerate(blocks):
        paths.append(str(write(tmp_path, f"block{i}.yaml", block.split("```")[0])))
    assert [str(e) for e in check_files(paths)] == []
    for seed in (SEED_TRANSPORTGROUPS, SEED_ADDRESSES, SEED_SERVERS):
        assert f"```yaml\n{seed}```" in doc


def test_examples_cover_the_seed_topologies():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"startup-proxied.yaml", "running-active-passive.yaml",
            "running-active-active.yaml", "running-mixed.yaml"} <= names
    startup = load_startup(EXAMPLES / "startup-proxied.yaml")
    assert startup.server("viaproxy").listeners[0].proxyprotocol
    assert not startup.server("submission").listeners[0].proxyprotocol
    passive = load_running(EXAMPLES / "running-active-passive.yaml").transport("mx")
    assert {passive.proxy_for(a).server for a in passive.addresses} == {"192.168.1.2"}
    active = load_running(EXAMPLES / "running-active-active.yaml").transport("mx")
    assert active.connection.proxyprotocol is None
    assert [active.proxy_for(a).server for a in active.ipv4] == ["192.168.1.2", "192.168.1.3"]
    mixed = load_running(EXAMPLES / "running-mixed.yaml").transport("mx")
    assert [mixed.proxy_for(a) is None for a in mixed.ipv4] == [True, False]


# ---------------------------------------------------------------------------------------------
# Inheritance
# ---------------------------------------------------------------------------------------------

INHERIT = """\
addresses:
  - {id: a4, address: 192.0.2.1}
  - {id: a6, address: "2001:db8::1"}
  - id: hosted
    address: 192.0.2.9
    hostname: out9.example.com
    proxyprotocol: {server: 192.168.1.3, port: 2526, version: 2}
transportgroups:
  - id: g
    connection:
      proxyprotocol: {server: 192.168.1.2, port: 2525, version: 2}
      port: 2525
      sourceip: {ipv4: [a4], ipv6: [a6]}
      timeout: {connect: 10, banner: 1m}
      tls: {mode: require}
    retry: {count: 5, intervals: [10], during: 1h}
    dsn: {transport: plain}
    transports:
      - id: plain
      - id: other-proxy
        connection:
          proxyprotocol: {server: proxy.example.net, port: 3000}
          timeout: {connect: 3}
          sourceip: {ipv6: false}
      - id: noproxy
        connection:
          proxyprotocol: false
          sourceip: {ipv4: [hosted, a4]}
        retry: {intervals: [{interval: 5, notify: true}]}
        dsn: {transport: other-proxy}
"""


def test_transport_inherits_group_connection_key_by_key():
    cfg = parse_running(INHERIT)
    plain = cfg.transport("plain")
    assert plain.connection.proxyprotocol == ProxyProtocol(
        server="192.168.1.2", port=2525, version=2
    )
    assert plain.connection.port == 2525 and plain.connection.tls.mode == "require"
    assert (plain.connection.timeout.connect, plain.connection.timeout.banner) == (10, 60)
    assert plain.connection.timeout.data == 600  # model default, given by neither
    assert [a.id for a in plain.ipv4] == ["a4"] and [a.id for a in plain.ipv6] == ["a6"]
    assert plain.retry.count == 5 and plain.dsn.transport == "plain"

    other = cfg.transport("other-proxy")
    # proxyprotocol is replaced as a whole: version is not inherited from the group's.
    assert other.connection.proxyprotocol == ProxyProtocol(
        server="proxy.example.net", port=3000, version=1
    )
    assert (other.connection.timeout.connect, other.connection.timeout.banner) == (3, 60)
    assert [a.id for a in other.ipv4] == ["a4"]  # ipv4 inherited, ipv6 turned off
    assert other.ipv6 == () and not other.use_ipv6 and other.use_ipv4


def test_false_turns_off_an_inherited_proxy_but_address_proxy_stays():
    cfg = parse_running(INHERIT)
    t = cfg.transport("noproxy")
    assert t.connection.proxyprotocol is None
    hosted, a4 = t.ipv4
    assert hosted.proxyprotocol == ProxyProtocol(server="192.168.1.3", port=2526, version=2)
    assert t.proxy_for(hosted) == hosted.proxyprotocol
    assert t.proxy_for(a4) is None and t.proxy_for(None) is None
    assert cfg.transport("plain").proxy_for(None).server == "192.168.1.2"
    assert cfg.address("hosted").hostname == "out9.example.com"
    # retry replaced as a whole: count/during are the model defaults, not the group's
    assert (t.retry.count, t.retry.during) == (30, 432000)
    assert t.retry.intervals[0].notify and t.retry.delay(7).interval == 5
    assert t.dsn.transport == "other-proxy"


def test_group_connection_itself_is_unchanged_by_resolution():
    cfg = parse_running(INHERIT)
    cfg.transport("other-proxy")
    assert cfg.transportgroups[0].connection.timeout.connect == 10
    assert cfg.transportgroups[0].transports[1].connection.sourceip.ipv6 is False


def test_lookup_helpers_raise_keyerror_for_unknown_ids():
    cfg = parse_running(INHERIT)
    for call in (lambda: cfg.transport("x"), lambda: cfg.address("x"), lambda: cfg.server("x"),
                 lambda: cfg.transport_for("x", "example.com")):
        with pytest.raises(KeyError):
            call()
    assert cfg.transport_ids() == ["plain", "other-proxy", "noproxy"]


def test_server_acceptance_and_relay():
    cfg = parse_running("""\
servers:
  - id: s
    transport: t
    domains: [Example.com, "*.example.org"]
    relay_networks: [10.0.0.0/8, "2001:db8::/32", 192.0.2.7]
transportgroups: [{id: g, transports: [{id: t}]}]
""")
    s = cfg.server("s")
    assert s.accepts_domain("example.com") and s.accepts_domain("EXAMPLE.COM.")
    assert not s.accepts_domain("sub.example.com")
    assert s.accepts_domain("a.example.org") and s.accepts_domain("a.b.example.org")
    assert not s.accepts_domain("example.org") and not s.accepts_domain("badexample.org")
    assert s.may_relay("10.1.2.3") and s.may_relay(ipaddress.ip_address("2001:db8::5"))
    assert s.may_relay("192.0.2.7") and not s.may_relay("192.0.2.8")
    assert s.may_relay("::ffff:10.9.9.9")  # IPv4-mapped, as a dual-stack socket reports it
    assert not s.may_relay("11.0.0.1")


# ---------------------------------------------------------------------------------------------
# Cross-reference errors: file, key path of the referring key, line
# ---------------------------------------------------------------------------------------------

XREF = """\
addresses:
  - id: proxied-addr-1
    address: 199.60.103.103
  - id: proxied-addr-2
    address: 199.60.103.104
  - id: v6
    address: "2001:db8::1"
transportgroups:
  - id: default
    transports:
      - id: mx
        connection:
          sourceip:
            ipv4:
              - proxied-addr-1
              - proxied-addr-9
"""


def test_unknown_address_id_names_file_path_and_line(tmp_path):
    path = write(tmp_path, "running.yaml", XREF)
    with pytest.raises(ConfigError) as exc:
        load_running(path)
    err = one_error(exc)
    assert err.file == str(path)
    assert err.path == "transportgroups[0].transports[0].connection.sourceip.ipv4[1]"
    assert err.line == line_of(XREF, "proxied-addr-9")
    assert err.message == (
        "unknown address id 'proxied-addr-9' (expected one of: proxied-addr-1, proxied-addr-2, v6)"
    )
    assert str(err) == f"{path}:{err.line}: {err.path}: {err.message}"


@pytest.mark.parametrize(
    ("text", "path", "needle", "words"),
    [
        (
            "addresses: [{id: v6, address: '2001:db8::1'}]\n"
            "transportgroups:\n- id: g\n  connection:\n    sourceip:\n      ipv4: [v6]\n",
            "transportgroups[0].connection.sourceip.ipv4[0]", "ipv4: [v6]",
            "an IPv6 address, listed under ipv4",
        ),
        (
            "addresses: [{id: v4, address: 192.0.2.1}]\n"
            "transportgroups:\n- id: g\n  transports:\n  - id: t\n    connection:\n"
            "      sourceip: {ipv6: [v4]}\n",
            "transportgroups[0].transports[0].connection.sourceip.ipv6[0]", "ipv6: [v4]",
            "an IPv4 address, listed under ipv6",
        ),
        (
            "transportgroups:\n- id: g\n  dsn:\n    transport: nowhere\n  transports: [{id: t}]\n",
            "transportgroups[0].dsn.transport", "nowhere",
            "unknown transport 'nowhere' (expected one of: t)",
        ),
        (
            "transportgroups:\n- id: g\n  transports:\n  - id: t\n    dsn: {transport: x}\n",
            "transportgroups[0].transports[0].dsn.transport", "transport: x",
            "unknown transport 'x'",
        ),
        (
            "servers:\n- id: s\n  transport: missing\ntransportgroups: [{id: g}]\n",
            "servers[0].transport", "missing", "unknown transport 'missing' (no transports",
        ),
        (
            "routing:\n- recipientdomain: example.org\n  transport: nope\n"
            "transportgroups: [{id: g, transports: [{id: t}]}]\n",
            "routing[0].transport", "nope", "unknown transport 'nope' (expected one of: t)",
        ),
        (
            "transportgroups:\n- id: a\n  transports:\n  - id: mx\n"
            "- id: b\n  transports:\n  - id: other\n  - id: mx\n",
            "transportgroups[1].transports[1].id", "id: mx", "duplicate transport id 'mx'",
        ),
        (
            "addresses:\n- {id: a, address: 192.0.2.1}\n- {id: a, address: 192.0.2.2}\n",
            "addresses[1].id", "192.0.2.2", "duplicate address id 'a'",
        ),
        (
            "transportgroups:\n- id: g\n- id: g\n",
            "transportgroups[1].id", "- id: g", "duplicate transportgroup id 'g'",
        ),
    ],
)
def test_cross_reference_errors(tmp_path, text, path, needle, words):
    file = write(tmp_path, "running.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_running(file)
    err = one_error(exc)
    nth = 2 if "duplicate" in words and needle.startswith(("id:", "- id")) else 1
    assert (err.file, err.path) == (str(file), path)
    assert err.line == line_of(text, needle, nth), str(err)
    assert words in err.message
    assert str(err).startswith(f"{file}:{err.line}: {path}: ")


def test_all_cross_reference_errors_are_reported_together(tmp_path):
    text = XREF + "    dsn: {transport: gone}\nservers: [{id: s, transport: nope}]\n"
    file = write(tmp_path, "running.yaml", text)
    with pytest.raises(ConfigErrors) as exc:
        load_running(file)
    paths = [e.path for e in exc.value.errors]
    assert paths == [
        "transportgroups[0].transports[0].connection.sourceip.ipv4[1]",
        "transportgroups[0].dsn.transport",
        "servers[0].transport",
    ]
    assert [e.line for e in exc.value.errors] == sorted(e.line for e in exc.value.errors)
    assert len(str(exc.value).splitlines()) == 3


def test_model_validate_outside_the_loader_still_checks_references():
    with pytest.raises(pydantic.ValidationError, match="unknown transport 'x'"):
        RunningConfig.model_validate({"servers": [{"id": "s", "transport": "x"}]})


@pytest.mark.parametrize(
    ("text", "path", "needle", "words"),
    [
        ("transportgroups:\n- id: g\n  retry:\n    intervals: []\n",
         "transportgroups[0].retry.intervals", "intervals", "at least 1 item"),
        ("transportgroups:\n- id: g\n  retry:\n    intervals:\n    - interval: 0\n",
         "transportgroups[0].retry.intervals[0].interval", "interval: 0", "greater than 0"),
        ("transportgroups:\n- id: g\n  retry:\n    intervals:\n    - -5\n",
         "transportgroups[0].retry.intervals[0]", "- -5", "0 seconds or more"),
    ],
)
def test_retry_intervals_must_be_non_empty_and_positive(text, path, needle, words):
    with pytest.raises(ConfigError) as exc:
        parse_running(text, "r.yaml")
    err = one_error(exc)
    assert (err.path, err.line) == (path, line_of(text, needle))
    assert words in err.message


# ---------------------------------------------------------------------------------------------
# Schema errors, each as FILE:LINE: PATH: MESSAGE
# ---------------------------------------------------------------------------------------------

SCHEMA_CASES = [
    # unknown key, with a suggestion
    ("startup", "servers:\n- id: a\n  listeners:\n  - port: 25\n    proxy_protocol: true\n",
     "servers[0].listeners[0].proxy_protocol", "proxy_protocol",
     "unknown key 'proxy_protocol'; did you mean 'proxyprotocol'?"),
    ("running", "queues:\n  concurency: 5\n", "queues.concurency", "concurency",
     "unknown key 'concurency'; did you mean 'concurrency'? (expected one of: concurrency, "
     "total_concurrency, hold, destination)"),
    ("running", "bogus: 1\n", "bogus", "bogus", "unknown key 'bogus'"),
    # wrong type
    ("startup", "servers:\n- id: a\n  listeners:\n  - port: '25'\n",
     "servers[0].listeners[0].port", "port", "expected an integer, got string '25'"),
    ("startup", "servers:\n- id: a\n  listeners:\n  - port: 25\n    proxyprotocol: 'yes'\n",
     "servers[0].listeners[0].proxyprotocol", "proxyprotocol",
     "expected true or false, got string 'yes'"),
    ("running", "transportgroups: {id: g}\n", "transportgroups", "transportgroups",
     "expected a list, got a mapping"),
    ("running", "transportgroups:\n- id: g\n  connection:\n    proxyprotocol: 5\n",
     "transportgroups[0].connection.proxyprotocol", "proxyprotocol: 5",
     "expected a mapping {server, port, version} or false, got integer 5"),
    ("running", "transportgroups:\n- id: g\n  connection:\n    tls: {mode: dane}\n",
     "transportgroups[0].connection.tls.mode", "tls:",
     "expected one of: 'disabled', 'optional', 'optional_verify', 'require', 'require_verify'"),
    ("running", "addresses:\n- id: a\n  address: 192.0.2.1\n  proxyprotocol:\n"
     "    server: 10.0.0.1\n    port: 2525\n    version: 3\n",
     "addresses[0].proxyprotocol.version", "version", "expected PROXY protocol version 1 or 2"),
    # out of range
    ("startup", "servers:\n- id: a\n  listeners:\n  - port: 70000\n",
     "servers[0].listeners[0].port", "70000", "expected a value <= 65535, got integer 70000"),
    # missing required key: the line of the parent mapping
    ("startup", "servers:\n- id: a\n  listeners:\n  - address: 127.0.0.1\n    backlog: 5\n",
     "servers[0].listeners[0].port", "address: 127.0.0.1", "missing required key 'port'"),
    ("running", "transportgroups:\n- connection: {port: 25}\n", "transportgroups[0].id",
     "connection", "missing required key 'id'"),
    ("running", "addresses:\n- id: a\n  hostname: x.example.com\n", "addresses[0].address",
     "id: a", "missing required key 'address'"),
    ("running", "transportgroups:\n- id: g\n  connection:\n    proxyprotocol:\n"
     "      server: 10.0.0.1\n", "transportgroups[0].connection.proxyprotocol.port",
     "proxyprotocol:", "missing required key 'port'"),
    # bad CIDR, bad IP
    ("startup", "servers:\n- id: a\n  listeners: [{port: 25}]\n  trusted_proxies:\n"
     "  - 10.0.0.0/33\n", "servers[0].trusted_proxies[0]", "10.0.0.0/33",
     "expected a network in CIDR notation"),
    ("running", "servers:\n- id: s\n  transport: t\n  relay_networks: [10.0.0.1/8]\n",
     "servers[0].relay_networks[0]", "10.0.0.1/8", "has host bits set (the network is 10.0.0.0/8)"),
    ("running", "addresses:\n- id: a\n  address: 199.60.103.300\n", "addresses[0].address",
     "199.60.103.300", "expected an IPv4 or IPv6 address literal, got string '199.60.103.300'"),
    ("startup", "servers:\n- id: a\n  listeners:\n  - address: localhost\n    port: 25\n",
     "servers[0].listeners[0].address", "localhost", "expected an IPv4 or IPv6 address literal"),
    ("running", "addresses:\n- id: a\n  address: 2001:0:0:0:0:0:0:1\n", "addresses[0].address",
     "2001:0", "YAML read it as a number: quote it"),
    ("running", "resolver:\n  nameservers: [8.8.8.8, dns.google]\n", "resolver.nameservers[1]",
     "nameservers", "got string 'dns.google'"),
    # other value checks
    ("running", "addresses:\n- id: a\n  address: 192.0.2.1\n  hostname: bad_name!\n",
     "addresses[0].hostname", "bad_name", "expected a host name"),
    ("running", "servers:\n- id: s\n  transport: t\n  domains: ['*']\n", "servers[0].domains[0]",
     "domains", "expected a domain"),
    ("running", "addresses:\n- id: has space\n  address: 192.0.2.1\n", "addresses[0].id",
     "has space", "expected an id"),
    ("running", "scripting:\n  hooks:\n    predelivery: 'not a module'\n",
     "scripting.hooks.predelivery", "predelivery", "expected 'package.module:function'"),
    ("running", "transportgroups:\n- id: g\n  connection:\n    sourceip: {ipv6: true}\n",
     "transportgroups[0].connection.sourceip.ipv6", "sourceip",
     "expected a list of address ids, or false"),
    ("startup", "environment:\n  logging: {level: verbose}\n", "environment.logging.level",
     "logging", "expected one of: 'debug', 'info', 'warning', 'error'"),
    ("startup", "servers:\n- id: a\n  listeners: []\n", "servers[0].listeners", "listeners",
     "expected at least 1 item(s), got a list"),
    ("startup", "servers:\n- id: a\n  listeners: [{port: 25}]\n  limits: {line_length: 100}\n",
     "servers[0].limits.line_length", "limits", "expected a value >= 512"),
    ("startup", "servers:\n- id: a\n  type: http\n  listeners: [{port: 80}]\n",
     "servers[0].type", "type", "expected one of: 'smtp', got string 'http'"),
    ("startup", "servers:\n- id: a\n  listeners: [{port: 25}]\n  timeouts: {data: 0}\n",
     "servers[0].timeouts.data", "timeouts", "expected a duration greater than 0"),
]


@pytest.mark.parametrize(("kind", "text", "path", "needle", "words"), SCHEMA_CASES)
def test_schema_errors_name_file_line_and_path(tmp_path, kind, text, path, needle, words):
    file = write(tmp_path, f"{kind}.yaml", text)
    loader = load_startup if kind == "startup" else load_running
    with pytest.raises(ConfigError) as exc:
        loader(file)
    err = one_error(exc)
    assert (err.file, err.path) == (str(file), path), str(err)
    assert err.line == line_of(text, needle), str(err)
    assert words in err.message, str(err)
    assert str(err) == f"{file}:{err.line}: {path}: {err.message}"
    assert "\n" not in str(err)


def test_several_schema_errors_are_all_reported(tmp_path):
    text = "servers:\n- id: a\n  listeners:\n  - port: 0\n  - port: x\n  bogus: 1\n"
    with pytest.raises(ConfigErrors) as exc:
        load_startup(write(tmp_path, "s.yaml", text))
    assert [(e.line, e.path) for e in exc.value.errors] == [
        (4, "servers[0].listeners[0].port"),
        (5, "servers[0].listeners[1].port"),
        (6, "servers[0].bogus"),
    ]
    assert exc.value.line == 4  # the first error's attributes


def test_duplicate_server_id_and_overlapping_listeners(tmp_path):
    text = ("servers:\n- id: a\n  listeners: [{port: 25}]\n"
            "- id: a\n  listeners: [{port: 26}]\n"
            "- id: b\n  listeners:\n  - {address: 127.0.0.1, port: 25}\n")
    with pytest.raises(ConfigErrors) as exc:
        load_startup(write(tmp_path, "s.yaml", text))
    (dup, overlap) = exc.value.errors
    assert (dup.path, dup.line) == ("servers[1].id", 4)
    assert "duplicate server id 'a'" in dup.message
    assert (overlap.path, overlap.line) == ("servers[2].listeners[0].port", 8)
    assert "127.0.0.1:25 overlaps *:25 at servers[0].listeners[0]" in overlap.message


def test_tls_files_must_exist_and_come_in_pairs(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    text = (f"servers:\n- id: a\n  listeners: [{{port: 25}}]\n  tls:\n    cert: {cert}\n"
            f"    key: {tmp_path}/missing.pem\n")
    with pytest.raises(ConfigError) as exc:
        load_startup(write(tmp_path, "s.yaml", text))
    err = one_error(exc)
    assert (err.path, err.line) == ("servers[0].tls.key", 6)
    assert err.message == f"file not found: {tmp_path}/missing.pem"
    half = f"servers:\n- id: a\n  listeners: [{{port: 25}}]\n  tls:\n    cert: {cert}\n"
    with pytest.raises(ConfigError, match=r"s2.yaml:4: servers\[0\]\.tls\.key: tls.cert and "):
        load_startup(write(tmp_path, "s2.yaml", half))
    (tmp_path / "key.pem").write_text("x")
    ok = half + f"    key: {tmp_path}/key.pem\n"
    assert load_startup(write(tmp_path, "s3.yaml", ok)).server("a").tls.enabled


# ---------------------------------------------------------------------------------------------
# YAML-level errors
# ---------------------------------------------------------------------------------------------


def test_yaml_syntax_error_has_file_and_line(tmp_path):
    text = "servers:\n- id: a\n  listeners:\n  - port: 25\n   bad: [1\n"
    file = write(tmp_path, "s.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_startup(file)
    err = one_error(exc)
    assert err.file == str(file) and err.path == "(yaml)"
    assert err.line == 5
    assert str(err).startswith(f"{file}:5: (yaml): ")


def test_unclosed_flow_list_reports_a_line(tmp_path):
    with pytest.raises(ConfigError) as exc:
        parse_running("servers:\n- id: a\n  domains: [a.com,\n", "r.yaml")
    assert one_error(exc).line is not None


def test_duplicate_mapping_key_is_an_error(tmp_path):
    text = "queues:\n  concurrency: 5\n  total_concurrency: 9\n  concurrency: 6\n"
    file = write(tmp_path, "r.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_running(file)
    err = one_error(exc)
    assert (err.path, err.line) == ("queues.concurrency", 4)
    assert err.message == "duplicate key 'concurrency' (first at line 2)"
    assert str(err) == f"{file}:4: queues.concurrency: {err.message}"


def test_duplicate_top_level_key(tmp_path):
    with pytest.raises(ConfigError) as exc:
        parse_running("addresses: []\nqueues: {}\naddresses: []\n", "r.yaml")
    assert str(one_error(exc)) == "r.yaml:3: addresses: duplicate key 'addresses' (first at line 1)"


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError) as exc:
        parse_running("- a\n- b\n", "r.yaml")
    assert str(one_error(exc)) == (
        "r.yaml:1: (top level): expected a mapping at the top level, got a list"
    )


def test_non_string_keys_and_custom_tags_and_multiple_documents():
    with pytest.raises(ConfigError, match=r"r.yaml:2: queues: keys must be strings"):
        parse_running("queues:\n  5: x\n", "r.yaml")
    with pytest.raises(ConfigError, match=r"r.yaml:1: queues: unsupported YAML tag .*python"):
        parse_running("queues: !!python/object:os.system {}\n", "r.yaml")
    with pytest.raises(ConfigError, match=r"r.yaml:2: \(yaml\): could not determine a constructor"):
        parse_running("queues:\n  concurrency: !!python/name:os.system ''\n", "r.yaml")
    with pytest.raises(ConfigError, match=r"r.yaml:2: \(yaml\): expected a single document"):
        parse_running("queues: {}\n---\nqueues: {}\n", "r.yaml")


def test_recursive_alias_is_an_error_not_a_hang():
    with pytest.raises(ConfigError, match="recursive alias"):
        parse_running("a: &x [*x]\n", "r.yaml")


def test_absurd_nesting_is_a_config_error():
    with pytest.raises(ConfigError, match="nesting too deep"):
        parse_running("a: " + "[" * 5000 + "]" * 5000, "r.yaml")


def test_anchors_and_merge_keys_work():
    text = """\
transportgroups:
  - id: g
    connection: &base
      port: 2525
      timeout: {connect: 5}
    transports:
      - id: t
        connection:
          <<: *base
          port: 26
"""
    cfg = parse_running(text)
    t = cfg.transport("t")
    assert t.connection.port == 26 and t.connection.timeout.connect == 5


def test_ipv6_literals_in_flow_lists_need_no_quotes():
    cfg = parse_running("servers:\n- id: s\n  transport: t\n  relay_networks: [::1, ::ffff:0:0/96, "
                        "fc00::/7]\ntransportgroups: [{id: g, transports: [{id: t}]}]\n")
    assert [str(n) for n in cfg.server("s").relay_networks] == ["::1/128", "::ffff:0:0/96",
                                                                "fc00::/7"]
    assert parse_running("resolver: {nameservers: [::1, 127.0.0.1]}").resolver.nameservers == (
        ipaddress.ip_address("::1"), ipaddress.ip_address("127.0.0.1"))
    assert parse_running('queues: {"concurrency":3}').queues.concurrency == 3


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_running(tmp_path / "absent.yaml")
    assert exc.value.line is None and "cannot read" in exc.value.message
    assert str(exc.value) == f"{tmp_path / 'absent.yaml'}: (file): {exc.value.message}"
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"queues: {concurrency: 5} # caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_running(bad)


def test_config_errors_pickle_and_compare_as_text():
    import pickle

    errs = ConfigErrors([ConfigError("f", "a", 1, "x"), ConfigError("f", "b", None, "y")])
    again = pickle.loads(pickle.dumps(errs))
    assert str(again) == "f:1: a: x\nf: b: y" and len(again.errors) == 2
    one = pickle.loads(pickle.dumps(ConfigError("f", "a", 3, "m")))
    assert str(one) == "f:3: a: m" and one.errors[0] is one


# ---------------------------------------------------------------------------------------------
# Durations and sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(5, 5), (0.25, 0.25), ("5", 5), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("2d", 172800),
     ("1d2h3m4s", 93784), ("250ms", 0.25), ("1.5h", 5400), (" 10s ", 10)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5x", "m5", "1m1h", "5 m", "-5", -1, True, None, [1],
                                 float("nan"), float("inf"), "1h1h"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [(1000, 1000), ("1000", 1000), ("512KiB", 512 * 1024), ("10MiB", 10 << 20),
     ("1GiB", 1 << 30), ("2TiB", 2 << 40), ("7B", 7), ("10 MiB", 10 << 20)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["10MB", "1.5MiB", "MiB", "", -1, 1.5, True, None, "10mib"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_durations_and_sizes_in_config():
    cfg = parse_startup("servers:\n- id: a\n  listeners: [{port: 25}]\n"
                        "  limits: {message_size: 10MiB}\n  timeouts: {proxy: 500ms, data: 1h}\n")
    s = cfg.server("a")
    assert s.limits.message_size == 10 << 20
    assert (s.timeouts.proxy, s.timeouts.data) == (0.5, 3600)
    with pytest.raises(ConfigError, match=r"s.yaml:2: servers\[0\].limits.message_size: "
                                          r"expected a size"):
        parse_startup("servers:\n- {id: a, listeners: [{port: 25}], limits: {message_size: 10MB}}",
                      "s.yaml")


@given(d=st.integers(0, 30), h=st.integers(0, 23), m=st.integers(0, 59), s=st.integers(0, 59))
def test_duration_strings_sum_their_parts(d, h, m, s):
    parts = [(d, "d"), (h, "h"), (m, "m"), (s, "s")]
    text = "".join(f"{n}{u}" for n, u in parts if n) or "0s"
    assert parse_duration(text) == d * 86400 + h * 3600 + m * 60 + s


# ---------------------------------------------------------------------------------------------
# check_files and cross_check
# ---------------------------------------------------------------------------------------------


def test_check_files_classifies_and_reports(tmp_path):
    startup = write(tmp_path, "startup.yaml", "spool: {path: /tmp/x}\n")  # startup by `spool`
    running = write(tmp_path, "running.yaml", "servers:\n- id: a\n  transport: t\n")
    env = write(tmp_path, "env.yaml", "environment: {hostname: mx.example.com}\nqueues: {}\n")
    errors = check_files([str(startup), str(running), str(env)])
    assert [str(e) for e in errors] == [
        f"{running}:3: servers[0].transport: unknown transport 't' (no transports are defined)",
        f"{env}:2: queues: unknown key 'queues' (expected one of: environment, servers, spool, "
        "cluster, admin, metrics)",
    ]
    assert check_files([str(tmp_path / "none.yaml")])[0].message.startswith("cannot read")
    syntax = write(tmp_path, "syntax.yaml", "a: [\n")
    (err,) = check_files([str(syntax)])
    assert err.file == str(syntax) and err.line is not None


def test_check_files_cross_checks_a_startup_running_pair(tmp_path):
    startup = write(tmp_path, "s.yaml", SEED_SERVERS)
    running = write(tmp_path, "r.yaml", "servers:\n- id: viaproxy\n  transport: mx\n"
                                        "- id: other\n  transport: mx\n"
                                        "transportgroups: [{id: g, transports: [{id: mx}]}]\n")
    (err,) = check_files([str(startup), str(running)])
    assert (err.file, err.path, err.line) == (str(running), "servers[1].id", 4)
    assert "'other' is not in the startup configuration (startup servers: viaproxy)" in err.message


def test_cross_check_requires_running_settings_for_every_startup_server(tmp_path):
    startup = load_startup(EXAMPLES / "startup-proxied.yaml")
    running = load_running()  # embedded: server `default` only
    with pytest.raises(ConfigErrors) as exc:
        cross_check(startup, running, "running.yaml")
    msgs = [str(e) for e in exc.value.errors]
    assert msgs[0].startswith("running.yaml:")
    assert "servers[0].id: server 'default' is not in the startup configuration" in msgs[0]
    assert any("startup server 'submission' has no running settings" in m for m in msgs)
    cross_check(load_startup(), running, "running.yaml")  # the embedded pair agrees


def test_startup_detection_rules(tmp_path):
    from ferrymail.config import is_startup_data

    assert is_startup_data({"spool": {}}) and is_startup_data({"environment": {}})
    assert is_startup_data({"servers": [{"id": "a", "listeners": []}]})
    assert not is_startup_data({"servers": [{"id": "a", "transport": "t"}]})
    assert not is_startup_data({}) and not is_startup_data(None) and not is_startup_data([1])


# ---------------------------------------------------------------------------------------------
# Property: whatever lands in a port field, the outcome is a model or a ConfigError with lines
# ---------------------------------------------------------------------------------------------

port_values = st.one_of(
    st.integers(-5, 70000),
    st.integers(1, 65535),
    st.text(max_size=6),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(0, 70000), max_size=2),
    st.dictionaries(st.sampled_from(["port", "x", "server"]), st.integers(0, 70000), max_size=2),
)


def _valid_port(v: object) -> bool:
    return type(v) is int and 1 <= v <= 65535


@st.composite
def running_with_ports(draw):
    ports: list[object] = []

    def port() -> object:
        v = draw(port_values)
        ports.append(v)
        return v

    def connection() -> dict:
        conn: dict = {}
        if draw(st.booleans()):
            conn["port"] = port()
        if draw(st.booleans()):
            conn["proxyprotocol"] = {"server": "192.168.1.2", "port": port()}
        return conn

    groups = []
    for g in range(draw(st.integers(0, 2))):
        transports = [
            {"id": f"t{g}-{t}", "connection": connection()}
            for t in range(draw(st.integers(0, 2)))
        ]
        groups.append({"id": f"g{g}", "connection": connection(), "transports": transports})
    # A hook may name sources per message, so proxied transports without sourceip load.
    data: dict = {"transportgroups": groups,
                  "scripting": {"hooks": {"predelivery": "hooks/route.py"}}}
    if draw(st.booleans()):
        data["addresses"] = [{"id": "a", "address": "192.0.2.1",
                              "proxyprotocol": {"server": "proxy.example", "port": port()}}]
    if draw(st.booleans()):
        data["resolver"] = {"port": port()}
    return data, ports


@st.composite
def startup_with_ports(draw):
    ports: list[object] = []
    servers = []
    for s in range(draw(st.integers(1, 3))):
        listeners = []
        for _ in range(draw(st.integers(1, 2))):
            v = draw(port_values)
            ports.append(v)
            listeners.append({"port": v, "address": f"127.0.0.{len(ports)}"})
        servers.append({"id": f"s{s}", "listeners": listeners})
    return {"servers": servers}, ports


def _assert_model_or_located_error(text: str, load, ports: list[object]) -> None:
    try:
        load(text, "cfg.yaml")
    except ConfigError as exc:
        assert not all(_valid_port(p) for p in ports), str(exc)
        lines = text.count("\n") + 1
        for err in exc.errors:
            assert err.line is not None and 1 <= err.line <= lines, str(err)
            assert str(err).startswith(f"cfg.yaml:{err.line}: "), str(err)
            assert "port" in err.path, str(err)
    else:
        assert all(_valid_port(p) for p in ports)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(running_with_ports(), st.sampled_from([None, False, True]))
def test_running_ports_yield_model_or_located_error(case, flow):
    data, ports = case
    text = yaml.safe_dump(data, default_flow_style=flow, sort_keys=False)
    _assert_model_or_located_error(text, parse_running, ports)


@settings(max_examples=100, deadline=None)
@given(startup_with_ports(), st.sampled_from([None, False]))
def test_startup_ports_yield_model_or_located_error(case, flow):
    data, ports = case
    text = yaml.safe_dump(data, default_flow_style=flow, sort_keys=False)
    _assert_model_or_located_error(text, parse_startup, ports)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{},#&*!|>'\"%@ \n\t0123456789.")),
               max_size=60))
def test_arbitrary_text_never_raises_anything_but_config_error(text):
    for load in (parse_running, parse_startup):
        try:
            cfg = load(text, "fuzz.yaml")
        except ConfigError as exc:
            assert all(str(e).startswith("fuzz.yaml") for e in exc.errors)
        else:
            assert isinstance(cfg, (RunningConfig, StartupConfig))
