"""The queue commands and ``ferrymail reload`` against a running daemon, through the admin API.

Mail in every state: deferred (a dead MX, retry in an hour), held, and in flight to slow
smtp-sinks (one accepting after a pause, one deferring after a pause), with real DSNs going
to a third sink. Every command runs as the CLI a user would type.
"""

from __future__ import annotations

import json
import re
import smtplib
import time
from datetime import UTC, datetime
from pathlib import Path

from ferrymail.admin.client import AdminClient
from tests.integration.conftest import listener, run_cli, server, startup_yaml
from tests.realpeers import free_port, smtp_sink

HOST = "127.0.0.1"
SLOW = 6  # seconds the slow sinks wait before answering DATA


def running(fast: int, slow: int, fail: int, dead: int) -> str:
    return f"""
servers:
  - {{id: in, transport: fast, domains: [fast.test, slow.test, fail.test, dead.test],
      relay_networks: [127.0.0.0/8]}}
routing:
  - {{recipientdomain: slow.test, transport: slow}}
  - {{recipientdomain: fail.test, transport: fail}}
  - {{recipientdomain: dead.test, transport: dead}}
transportgroups:
  - id: g
    retry: {{count: 30, intervals: [3600]}}
    dsn: {{transport: fast}}
    transports:
      - {{id: fast, connection: {{server: {HOST}, port: {fast}}}}}
      - {{id: slow, connection: {{server: {HOST}, port: {slow}}}}}
      - {{id: fail, connection: {{server: {HOST}, port: {fail}}}}}
      - {{id: dead, connection: {{server: {HOST}, port: {dead}, timeout: {{connect: 2}}}}}}
"""


def send(port: int, rcpt: str, subject: str) -> str:
    with smtplib.SMTP(HOST, port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("s@x.test")
        assert smtp.rcpt(rcpt)[0] == 250
        code, text = smtp.data(f"Subject: {subject}\r\nX-Test: {subject}\r\n\r\nbody of "
                               f"{subject}\r\n".encode())
    assert code == 250, text
    return text.decode().split()[-1]


def ts(line: str) -> float:
    """The time of a log line (its ``ts=`` field)."""
    stamp = re.search(r"^ts=(\S+)Z ", line)
    assert stamp, line
    return datetime.fromisoformat(stamp.group(1)).replace(tzinfo=UTC).timestamp()


def cli(startup: Path, *args: str, ok: bool = True) -> str:
    out = run_cli("queue", *args, "--startup", str(startup))
    if ok:
        assert out.returncode == 0, out.stderr
    return out.stdout if ok else out.stderr


def cli_json(startup: Path, *args: str) -> dict:
    return json.loads(cli(startup, *args, "--json"))


def states(startup: Path) -> dict[str, str]:
    return {m["id"]: m["state"] for m in cli_json(startup, "list")["messages"]}


def wait_state(startup: Path, qid: str, state: str | None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if states(startup).get(qid) == state:
            return
        time.sleep(0.2)
    raise AssertionError(f"{qid} not {state} after {timeout}s: {states(startup)}")


def test_queue_commands_against_a_running_daemon(ferrymail_proc, tmp_path: Path):
    port, dead = free_port(), free_port()
    with smtp_sink() as fast, smtp_sink(extra=["-w", str(SLOW)]) as slow, \
            smtp_sink(extra=["-w", str(SLOW), "-r", "."]) as fail:
        proc = ferrymail_proc(startup_yaml(tmp_path, [server("in", [listener(port)])]),
                              running(fast.port, slow.port, fail.port, dead),
                              wait=[(HOST, port)])
        startup = proc.startup_path
        assert startup is not None
        sock = tmp_path / "ferrymail.sock"
        assert sock.stat().st_mode & 0o777 == 0o600

        d1 = send(port, "a@dead.test", "dead-one")
        d2 = send(port, "b@dead.test", "dead-two")
        for qid in (d1, d2):
            proc.wait_log(rf"event=delivery.error qid={qid} .*result=deferred")
        s_ok = send(port, "c@slow.test", "slow-ok")
        s_fail = send(port, "d@fail.test", "slow-fail")
        time.sleep(1.0)  # both slow attempts are now waiting for the sinks' DATA reply
        now = {m["id"]: m["state"] for m in AdminClient(socket_path=str(sock)).get(
            "/v1/queue")["messages"]}
        assert now == {d1: "deferred", d2: "deferred", s_ok: "in-flight",
                       s_fail: "in-flight"}, now

        # in flight: delete (the attempt succeeds: nothing to delete, delivered once) and
        # bounce (the attempt defers: bounced when it ends, one DSN). Straight through the
        # API (what the CLI sends), so that both surely land while the attempts run.
        api = AdminClient(socket_path=str(sock))
        out = api.post("/v1/queue/delete", {"filter": {"id": [s_ok]}})
        assert (out["matched"], out["changed"], out["in_flight"]) == (1, 0, 1)
        out = api.post("/v1/queue/bounce", {"filter": {"to": ["fail.test"]},
                                            "reason": "misrouted"})
        assert (out["matched"], out["changed"], out["in_flight"]) == (1, 0, 1)
        shown = cli_json(startup, "show", s_fail)
        assert shown["pending_actions"] == ["bounce"]
        proc.wait_log(rf"event=queue.action_applied qid={s_ok} action=delete changed=0 "
                      r"gone=true", timeout=SLOW + 10)
        proc.wait_log(rf"event=queue.action_applied qid={s_fail} action=bounce changed=1",
                      timeout=SLOW + 10)
        assert len(slow.wait_dumps(1)) == 1  # delivered exactly once, never deleted
        dsn = fast.wait_dumps(1)
        assert len(dsn) == 1 and dsn[0].rcpts == ["<s@x.test>"], dsn
        assert b"misrouted" in dsn[0].raw and b"d@fail.test" in dsn[0].raw
        assert b"Subject: slow-fail" in dsn[0].raw
        proc.wait_log(rf"event=delivery.attempt qid={s_fail} .*reply_code=450 .*"
                      r"result=deferred")  # the sink refused it: the bounce came after
        wait_state(startup, s_ok, None)
        wait_state(startup, s_fail, None)

        # hold / list by state / release: a held message is not tried, a released one is
        out = cli_json(startup, "hold", "--id", d1)
        assert out["changed"] == 1
        assert [m["id"] for m in cli_json(startup, "list", "--state", "held")["messages"]] == [d1]
        text = cli(startup, "summary")
        assert re.search(r"dead\s+dead\.test .* hold \(queue hold\); retry at ", text), text

        # retry: deferred mail is due within a second (by the daemon's own clock: from the
        # action's log line to the end of the new attempt, which the dead MX refuses at once)
        out = cli_json(startup, "retry", "--to", "b@dead.test")
        assert out["changed"] == 1
        acted = ts(proc.wait_log(r"event=queue.action action=retry ")[-1])
        tried = ts(proc.wait_log(rf"event=delivery.error qid={d2} .*attempt=2 ", timeout=5)[0])
        assert 0 <= tried - acted < 1.0, (acted, tried)
        assert not re.search(rf"qid={d1} .*attempt=2 ", proc.log_text())  # held: untouched

        out = cli_json(startup, "release", "--state", "held")
        assert out["changed"] == 1
        proc.wait_log(rf"event=delivery.error qid={d1} .*attempt=2 ", timeout=5)

        # show: envelope, per-recipient state, attempts, last reply, headers, --body
        shown = cli_json(startup, "show", d1, "--body")
        assert shown["sender"] == "s@x.test" and shown["state"] == "deferred"
        (rcpt,) = shown["recipients"]
        assert rcpt["attempts"] == 2 and rcpt["transport"] == "dead"
        assert "network" in rcpt["last_reply"] or "refused" in rcpt["last_reply"]
        assert "X-Test: dead-one" in shown["headers"]
        assert "body of dead-one" in shown["message"]
        text = cli(startup, "show", d1)
        assert "last reply:" in text and "X-Test: dead-one" in text

        # filters: --last-error, --older-than, --from
        assert {m["id"] for m in cli_json(startup, "list", "--last-error", "refused|network")[
            "messages"]} == {d1, d2}
        assert cli_json(startup, "list", "--older-than", "1h")["messages"] == []
        assert len(cli_json(startup, "list", "--from", "x.test")["messages"]) == 2

        # delete and bounce of queued mail
        out = cli_json(startup, "delete", "--id", d1)
        assert out["changed"] == 1
        out = cli_json(startup, "bounce", "--id", d2, "--reason", "no such host")
        assert out["changed"] == 1
        dsn = fast.wait_dumps(2)
        assert b"no such host" in dsn[-1].raw and b"b@dead.test" in dsn[-1].raw
        wait_state(startup, d2, None)
        assert cli_json(startup, "list")["messages"] == []
        # an action needs a filter or --all
        assert "give a filter" in cli(startup, "delete", ok=False)

        # the spool fallback: read-only commands work without the daemon, changes refuse
        d3 = send(port, "e@dead.test", "dead-three")
        proc.wait_log(rf"event=delivery.error qid={d3} .*result=deferred")
        assert proc.stop() == 0
        listed = cli_json(startup, "list")
        assert listed["source"] == "spool" and [m["id"] for m in listed["messages"]] == [d3]
        assert cli_json(startup, "show", d3)["recipients"][0]["state"] == "deferred"
        assert "dead.test" in cli(startup, "summary")
        err = cli(startup, "retry", "--all", ok=False)
        assert "changes are made by the running daemon" in err


def test_reload_reports_the_daemons_verdict(ferrymail_proc, tmp_path: Path):
    port = free_port()
    proc = ferrymail_proc(
        startup_yaml(tmp_path, [server("s", [listener(port)])]),
        "servers: [{id: s, transport: t, domains: [a.test]}]\n"
        "transportgroups: [{id: g, transports: [{id: t}]}]\nqueues: {hold: true}\n",
        wait=[(HOST, port)])
    assert proc.running_path is not None and proc.startup_path is not None
    proc.running_path.write_text(
        "servers:\n  - id: s\n    transport: nowhere\ntransportgroups:\n  - id: g\n")
    out = run_cli("reload", "--startup", str(proc.startup_path))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert f"{proc.running_path}:3: servers[0].transport:" in out.stderr
    assert "nowhere" in out.stderr and "keeps the previous one" in out.stderr
    proc.running_path.write_text(
        "servers: [{id: s, transport: t, domains: [b.test]}]\n"
        "transportgroups: [{id: g, transports: [{id: t}]}]\n")
    out = run_cli("reload", "--startup", str(proc.startup_path))
    assert out.returncode == 0, out.stderr
    assert f"pid {proc.pid}" in out.stdout and "in force" in out.stdout


def test_show_and_bounce_a_large_message(ferrymail_proc, tmp_path: Path):
    port, dead = free_port(), free_port()
    big = b"x" * 998 + b"\r\n"
    with smtp_sink() as fast:
        proc = ferrymail_proc(startup_yaml(tmp_path, [server("in", [listener(port)])]),
                              running(fast.port, dead, dead, dead), wait=[(HOST, port)])
        startup = proc.startup_path
        assert startup is not None
        with smtplib.SMTP(HOST, port, timeout=10) as smtp:
            smtp.sendmail("s@x.test", ["a@dead.test"],
                          b"Subject: big\r\nX-Test: big\r\n\r\n" + big * 400)  # ~400 KB
        (qid,) = [m.split("qid=")[1].split()[0]
                  for m in proc.wait_log(r"event=smtp.transaction .*qid=")]
        proc.wait_log(rf"event=delivery.error qid={qid} .*result=deferred")
        shown = cli_json(startup, "show", qid, "--body")
        assert "X-Test: big" in shown["headers"] and shown["data_size"] > 400_000
        assert shown["message"].count("x" * 998) == 400 and shown["truncated"] is False
        out = cli_json(startup, "bounce", "--id", qid, "--reason", "too big to wait")
        assert out["changed"] == 1
        (dsn,) = fast.wait_dumps(1)
        assert b"too big to wait" in dsn.raw and b"X-Test: big" in dsn.raw
        assert len(dsn.raw) < 100_000  # the DSN quotes the header section only
        wait_state(startup, qid, None)
