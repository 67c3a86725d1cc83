"""`ferrymail haproxy-config` / `keepalived-config`: generated files pass `haproxy -c` and
`keepalived -t`, and hold what each topology needs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ferrymail.config import parse_running, parse_startup
from ferrymail.proxytier.haproxy import haproxy_config, proxies, select_proxy
from ferrymail.proxytier.keepalived import keepalived_config
from tests.integration.conftest import run_cli
from tests.realpeers import require

RUNNING = """\
addresses:
  - {id: a1, address: 127.0.0.21, hostname: a1.test,
     proxyprotocol: {server: 127.0.0.11, port: 2525, check: {interval: 1, timeout: 1}}}
  - {id: a2, address: 127.0.0.22, proxyprotocol: {server: 127.0.0.11, port: 2525}}
  - {id: b1, address: 127.0.0.31, proxyprotocol: {server: 127.0.0.12, port: 2525}}
  - {id: b6, address: "::1", proxyprotocol: {server: 127.0.0.12, port: 2525}}
transportgroups:
  - id: default
    connection: {sourceip: {ipv4: [a1, a2, b1], ipv6: [b6]}}
    transports: [{id: mx}]
servers: [{id: in, transport: mx}]
"""
STARTUP = """\
servers:
  - id: in
    listeners: [{port: 2526, proxyprotocol: true}, {port: 2587}]
"""
PASSIVE = """\
transportgroups:
  - id: default
    connection:
      proxyprotocol: {server: 10.9.0.100, port: 2525}
      sourceip: {ipv4: [s1, s2]}
    transports: [{id: mx}]
addresses:
  - {id: s1, address: 10.9.0.101}
  - {id: s2, address: 10.9.0.102}
servers: [{id: in, transport: mx}]
"""


def files(tmp_path: Path, running: str = RUNNING) -> tuple[Path, Path]:
    s, r = tmp_path / "startup.yaml", tmp_path / "running.yaml"
    s.write_text(STARTUP)
    r.write_text(running)
    return s, r


def haproxy_check(path: Path) -> None:
    check = subprocess.run([require("haproxy"), "-c", "-f", str(path)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr + path.read_text()


def test_active_active_one_file_per_proxy_with_only_its_own_sources(tmp_path: Path) -> None:
    s, r = files(tmp_path)
    out = {}
    for proxy in ("127.0.0.11:2525", "127.0.0.12:2525"):
        dest = tmp_path / f"{proxy}.cfg"
        res = run_cli("haproxy-config", "--startup", str(s), "--running", str(r), "--proxy",
                      proxy, "--instance", "127.0.0.5", "--instance", "127.0.0.6", "-o",
                      str(dest))
        assert res.returncode == 0, res.stderr
        haproxy_check(dest)
        out[proxy] = dest.read_text()
    a, b = out["127.0.0.11:2525"], out["127.0.0.12:2525"]
    assert "bind 127.0.0.11:2525 accept-proxy" in a
    assert "acl own_source src 127.0.0.21 127.0.0.22" in a
    assert "127.0.0.31" not in a
    assert "bind 127.0.0.12:2525 accept-proxy" in b and "acl own_source src 127.0.0.31 ::1" in b
    for text in (a, b):
        assert "server v4 0.0.0.0 source 0.0.0.0 usesrc clientip" in text
        assert "server v6 ::: source ::: usesrc clientip" in text
        assert "acl is_local src 127.0.0.5/32 127.0.0.6/32" in text
        assert "\n    user " not in text and "\nuser" not in text
        assert "server ferrymail1 127.0.0.5:2526 check send-proxy-v2" in text
        assert "server ferrymail2 127.0.0.6:2526 check send-proxy-v2" in text
        assert ":2587" not in text  # a direct listener gets no frontend


def test_haproxy_config_errors_name_the_choices(tmp_path: Path) -> None:
    s, r = files(tmp_path)
    res = run_cli("haproxy-config", "--startup", str(s), "--running", str(r))
    assert res.returncode == 1
    assert "choose one with --proxy: 127.0.0.11:2525, 127.0.0.12:2525" in res.stderr
    res = run_cli("haproxy-config", "--startup", str(s), "--running", str(r), "--proxy",
                  "127.0.0.99:1")
    assert res.returncode == 1 and "127.0.0.99:1 is not in the running config" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(RUNNING.replace("interval: 1,", "interval: soon,"))
    res = run_cli("haproxy-config", "--startup", str(s), "--running", str(bad))
    assert res.returncode == 2 and "bad.yaml:3:" in res.stderr and "check.interval" in res.stderr
    res = run_cli("haproxy-config", "--startup", str(s), "--running", str(r), "--proxy",
                  "127.0.0.11:2525", "--allow", "not-a-net")
    assert res.returncode == 1 and "'not-a-net' is not an IP network" in res.stderr


def test_proxies_follow_delivery_precedence() -> None:
    running = parse_running(RUNNING, "r.yaml")
    assert [(str(p), p.sources) for p in proxies(running)] == [
        ("127.0.0.11:2525", ("127.0.0.21", "127.0.0.22")),
        ("127.0.0.12:2525", ("127.0.0.31", "::1")),
    ]
    passive = parse_running(PASSIVE, "p.yaml")
    assert select_proxy(passive, None).sources == ("10.9.0.101", "10.9.0.102")
    text = haproxy_config(parse_startup(STARTUP, "s.yaml"), passive)
    assert "acl is_local src 127.0.0.0/8" in text  # no instances, no --allow
    assert "# no --instance given" in text


def vrrp_interface() -> str:
    """A non-loopback interface of this host (keepalived -t checks that it exists)."""
    names = sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name != "lo")
    if not names:
        pytest.skip("keepalived -t needs an existing non-loopback interface; this host has none")
    return names[0]


def test_keepalived_config_moves_listener_and_every_source(tmp_path: Path) -> None:
    s, r = files(tmp_path, PASSIVE)
    iface = vrrp_interface()
    dest = tmp_path / "keepalived.conf"
    res = run_cli("keepalived-config", "--startup", str(s), "--running", str(r),
                  "--interface", iface, "--unicast-src", "10.9.0.1", "--unicast-peer",
                  "10.9.0.2", "--priority", "150", "-o", str(dest))
    assert res.returncode == 0, res.stderr
    text = dest.read_text()
    for vip in ("10.9.0.100/32", "10.9.0.101/32", "10.9.0.102/32"):
        assert f"{vip} dev {iface}" in text
    for line in ("nopreempt", "state BACKUP", "unicast_src_ip 10.9.0.1", "priority 150",
                 "track_script", "vrrp_script chk_haproxy", "ip_nonlocal_bind"):
        assert line in text
    check = subprocess.run([require("keepalived"), "-t", "-f", str(dest), "--log-console"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # and keepalived -t does refuse a broken file (the check is not a no-op)
    dest.write_text(text.replace("virtual_router_id 51", "virtual_router_id 51\n    bogus 1"))
    check = subprocess.run([require("keepalived"), "-t", "-f", str(dest), "--log-console"],
                           capture_output=True, text=True)
    assert check.returncode != 0


def test_keepalived_config_mixed_families_and_bad_values() -> None:
    running = parse_running(RUNNING, "r.yaml")
    text = keepalived_config(running, proxy="127.0.0.12:2525", interface="lo")
    assert "virtual_ipaddress_excluded {\n        ::1/128 dev lo" in text
    assert "unicast_peer" not in text  # multicast unless peers are given
    split = keepalived_config(running, proxy="127.0.0.12:2525", interface="vrrp",
                              vip_interface="front")
    assert "interface vrrp" in split and "127.0.0.12/32 dev front" in split
    with pytest.raises(ValueError, match="virtual_router_id"):
        keepalived_config(running, proxy="127.0.0.12:2525", router_id=0)
    with pytest.raises(ValueError, match="priority"):
        keepalived_config(running, proxy="127.0.0.12:2525", priority=255)


def test_proxy_status_without_cluster_or_daemon_says_where_health_lives(tmp_path: Path) -> None:
    s, r = files(tmp_path)
    res = run_cli("proxy", "status", "--startup", str(s), "--running", str(r))
    assert res.returncode == 1
    assert "cluster.redis" in res.stderr and "lives in the running daemon" in res.stderr


def test_health_keys_are_validated_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "running.yaml"
    bad.write_text(RUNNING + "proxyhealth:\n  bind: {failures: 0}\n")
    res = run_cli("config", "check", str(bad))
    assert res.returncode == 1
    assert f"{bad}:13: proxyhealth.bind.failures: expected a value >= 1" in res.stdout, \
        res.stdout
    bad.write_text(RUNNING + "proxyhealth:\n  suspend: 60\n  suspend_max: 10\n")
    res = run_cli("config", "check", str(bad))
    assert res.returncode == 1
    assert "proxyhealth: " in res.stdout, res.stdout
    assert "suspend_max must be at least suspend" in res.stdout, res.stdout
    start = tmp_path / "startup.yaml"
    start.write_text(STARTUP + "cluster: {redis: 'http://x'}\n")
    res = run_cli("config", "check", str(start))
    assert res.returncode == 1 and f"{start}:4: cluster.redis:" in res.stdout, res.stdout
