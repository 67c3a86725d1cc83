"""``ferrymail suspend add|list|remove`` without a cluster: the spool directory's file."""

from __future__ import annotations

import json

from tests.integration.conftest import listener, run_cli, server, startup_yaml


def test_add_list_remove_and_bad_input(tmp_path):
    startup = tmp_path / "startup.yaml"
    startup.write_text(startup_yaml(tmp_path, [server("in", [listener(2525)])]))
    add = run_cli("suspend", "add", "--startup", str(startup), "--field", "localip=192.0.2.0/24",
                  "--field", "grouping=&gmail", "--duration", "10m", "--reason", "abuse desk")
    assert add.returncode == 0, add.stderr
    ident = add.stdout.strip()
    (stored,) = json.loads((tmp_path / "spool" / "suspensions.json").read_text())
    assert stored["id"] == ident
    assert stored["fields"] == {"localip": "192.0.2.0/24", "grouping": "&gmail"}
    listed = run_cli("suspend", "list", "--startup", str(startup))
    assert listed.returncode == 0
    assert ident in listed.stdout and "reason='abuse desk'" in listed.stdout
    assert "1 suspension(s)" in listed.stdout

    for args, message in [
        (["--field", "colour=red", "--duration", "1m"], "unknown field 'colour'"),
        (["--field", "localip", "--duration", "1m"], "expected FIELD=VALUE"),
        (["--field", "localip=mx.example", "--duration", "1m"], "not an IP address"),
        (["--field", "localip=192.0.2.1", "--duration", "soon"], "expected a duration"),
    ]:
        bad = run_cli("suspend", "add", "--startup", str(startup), *args)
        assert bad.returncode == 1 and message in bad.stderr, (args, bad.stderr)

    assert run_cli("suspend", "remove", "--startup", str(startup), ident).returncode == 0
    again = run_cli("suspend", "remove", "--startup", str(startup), ident)
    assert again.returncode == 1 and "no suspension" in again.stderr
    assert "0 suspension(s)" in run_cli("suspend", "list", "--startup", str(startup)).stdout
