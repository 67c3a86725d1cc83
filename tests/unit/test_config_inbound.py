"""The startup keys of issue 7's inbound items: defaults, validation, line-precise errors."""

from __future__ import annotations

import textwrap

import pytest

from ferrymail.config import ConfigError, load_startup
from ferrymail.smtp.server import SMTPServer

BASE = """\
environment: {hostname: mx.example.com}
servers:
  - id: in
    listeners: [{port: 2525}]
"""


def load(tmp_path, extra: str = ""):
    path = tmp_path / "startup.yaml"
    path.write_text(BASE + textwrap.indent(textwrap.dedent(extra), "    "))
    return load_startup(str(path))




def test_defaults_are_safe(tmp_path):
    srv = load(tmp_path).server("in")
    assert (srv.limits.connections, srv.limits.connections_per_client) == (1000, 50)
    assert srv.timeouts.deadline is True and srv.timeouts.min_data_rate == 500
    p = srv.policy
    assert (p.bare_newline, p.helo, p.routed_addresses) == ("reject", "reject", "reject")
    assert [str(n) for n in srv.trusted_proxies] == ["127.0.0.0/8", "::1/128"]


def test_keys_reach_the_sessions(tmp_path):
    cfg = load(tmp_path, """\
        limits: {connections: 0, connections_per_client: 3}
        timeouts: {deadline: false, min_data_rate: 1000}
        policy: {bare_newline: accept, helo: accept, routed_addresses: accept}
    """).server("in")
    srv = SMTPServer(cfg, hostname="mx.example.com", spool=None, running=lambda: None)
    pol = srv.settings.policy
    assert not (pol.bare_newline_reject or pol.helo_reject or pol.routed_reject)
    assert (srv.limiter.max_total, srv.limiter.max_per_client) == (0, 3)
    assert srv.timeouts.deadline is False and srv.timeouts.min_data_rate == 1000


@pytest.mark.parametrize("extra,line,key,message", [
    ("policy: {helo: quote}\n", 5, "servers[0].policy.helo", "'reject', 'accept'"),
    ("policy: {bare_lf: reject}\n", 5, "servers[0].policy.bare_lf", "unknown key"),
    ("timeouts: {min_data_rate: 0}\n", 5, "servers[0].timeouts.min_data_rate", ""),
    ("limits:\n  connections: -1\n", 6, "servers[0].limits.connections", ""),
    ("timeouts: {deadline: 'yes'}\n", 5, "servers[0].timeouts.deadline", ""),
])
def test_bad_values_name_file_line_and_key(tmp_path, extra, line, key, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    text = str(info.value)
    assert f"startup.yaml:{line}: {key}: " in text and message in text
