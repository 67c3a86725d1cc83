"""`config check` finds at load what would only fail at delivery (issue 7 item 16), and the
examples neither loop nor carry broken usage lines (items 15, 16)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ferrymail.config import ConfigError, check_files, load_running, parse_running
from ferrymail.config.types import domain_matches

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

PROXIED_NO_SOURCE = """\
servers: [{id: in, transport: out}]
transportgroups:
  - id: g
    connection:
      proxyprotocol: {server: 192.168.1.2, port: 2525}
    transports:
      - id: ok
        connection: {sourceip: {ipv4: [a1]}}
      - id: out
addresses:
  - {id: a1, address: 192.0.2.1}
"""

BASE = "servers: [{id: in, transport: t}]\ntransportgroups: [{id: g, transports: [{id: t}]}]\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_proxied_transport_without_source_address_is_refused_at_load(tmp_path):
    path = _write(tmp_path, "running.yaml", PROXIED_NO_SOURCE)
    (err,) = check_files([str(path)])
    assert err.line == 9 and err.path == "transportgroups[0].transports[1]"
    assert "'out' goes through proxy 192.168.1.2:2525" in err.message
    assert "transportgroups[0].connection.proxyprotocol" in err.message
    assert "no source address" in err.message
    with pytest.raises(ConfigError):
        parse_running(PROXIED_NO_SOURCE)


@pytest.mark.parametrize("transport", [
    "{id: out, connection: {proxyprotocol: false}}",  # direct: the OS picks the source
    "{id: out, connection: {sourceip: {ipv4: [a1]}}}",
])
def test_proxied_transport_checks_pass_when_a_source_or_no_proxy(transport):
    parse_running(PROXIED_NO_SOURCE.replace("- id: out", f"- {transport}"))


def test_transport_level_proxy_without_source_names_its_own_key(tmp_path):
    text = """\
servers: [{id: in, transport: out}]
transportgroups:
  - id: g
    transports:
      - id: out
        connection:
          sourceip: {ipv4: false}
          proxyprotocol: {server: 10.0.0.1, port: 2525, version: 2}
"""
    (err,) = check_files([str(_write(tmp_path, "r.yaml", text))])
    assert "set at transportgroups[0].transports[0].connection.proxyprotocol" in err.message


def test_missing_hook_file_fails_config_check_with_file_line_key(tmp_path):
    text = BASE + "scripting:\n  hooks:\n    predelivery: hooks/nope.py\n"
    path = _write(tmp_path, "running.yaml", text)
    (err,) = check_files([str(path)])
    assert str(err).startswith(f"{path}:5: scripting.hooks.predelivery: ")
    assert "nope.py" in err.message


def test_broken_hook_is_found_and_a_good_one_relative_to_the_running_file(tmp_path):
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "bad.py").write_text("def predelivery(ctx):\n    pass\n")
    (tmp_path / "hooks" / "good.py").write_text("def predelivery(ctx, action):\n    pass\n")
    bad = _write(tmp_path, "bad.yaml", BASE + "scripting: {hooks: {predelivery: hooks/bad.py}}\n")
    good = _write(tmp_path, "good.yaml",
                  BASE + "scripting: {hooks: {predelivery: hooks/good.py}}\n")
    (err,) = check_files([str(bad)])
    assert err.path == "scripting.hooks.predelivery" and err.line == 3
    # Run from elsewhere: the path is resolved against the running file's folder.
    out = subprocess.run([sys.executable, "-m", "ferrymail.cli", "config", "check", str(good)],
                         cwd="/", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"{good}: OK", out


@pytest.mark.parametrize("hook", sorted(p.name for p in (EXAMPLES / "hooks").glob("*.py")))
def test_example_hook_usage_lines_work(tmp_path, hook):
    """The YAML in each example hook's docstring, in a running file in examples/, loads."""
    text = (EXAMPLES / "hooks" / hook).read_text()
    m = re.search(r"\n( +)scripting:\n((?:\1 .*\n)+)", text)
    assert m is not None, f"{hook} has no usage lines"
    indent = len(m.group(1))
    snippet = "scripting:\n" + "\n".join(line[indent:] for line in m.group(2).splitlines())
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    running = (tmp_path / "examples" / "running-active-active.yaml")
    running.write_text(running.read_text() + snippet + "\n")
    assert [str(e) for e in check_files([str(running)])] == []


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("running-*.yaml")))
def test_examples_route_accepted_domains_to_a_fixed_next_hop(name):
    """A domain we accept must not be routed by MX: its MX is us (the seed's topology)."""
    cfg = load_running(EXAMPLES / name)
    for srv in cfg.servers:
        for pattern in srv.domains:
            sample = pattern.replace("*", "sub")
            assert domain_matches(pattern, sample)
            transport = cfg.transport(cfg.transport_for(srv.id, sample))
            assert transport.connection.server is not None, (name, srv.id, pattern)


def test_the_policies_example_says_what_a_limit_counts():
    """Its header said limits hold "per instance" without a cluster; since issue 12 the
    workers of one ``ferrymail run`` share them through the limiter service. An operator
    reading the example must learn all three scopes (and that it loads)."""
    path = EXAMPLES / "running-policies.yaml"
    header = "".join(line[1:] for line in path.read_text().splitlines(keepends=True)
                     if line.startswith("#"))
    words = " ".join(header.split())
    for needed in ("`cluster` section", "same Redis", "several workers",
                   "limiter service", "(host-wide)", "`--workers 1`", "limit / workers",
                   "limit / live instances"):
        assert needed in words, needed
    assert check_files([str(path)]) == []
