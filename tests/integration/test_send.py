"""One-shot sending (`ferrymail send`, `MIME().send()`) through the seed's HAProxy to smtp-sink.

The result must have the shape of the seed's expected hsh output, field for field; the sink's
dump shows which source IP and HELO the MX saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferrymail import MIME
from ferrymail.send import send, send_async
from tests.integration.conftest import run_cli
from tests.realpeers import (
    free_port,
    haproxy,
    require_transparent_proxy,
    seed_outbound_haproxy,
    smtp_sink,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

# The seed's "Expected output" of the hsh script, verbatim apart from the escaped slashes.
SEED_OUTPUT = json.loads(r"""
{
    "result": {
        "code": 550,
        "enhanced": [5, 7, 1],
        "reason": [
            "[45.33.68.55] Messages missing a valid address in From: header, or",
            "having no From: header, are not accepted. For more information, go to",
            " https:\/\/support.google.com\/mail\/?p=RfcMessageNonCompliant and review",
            "RFC 5322 specifications. d75a77b69052e-4b11debe8adsi67221561cf.716 - gsmtp"
        ],
        "state": "EOD"
    },
    "connection": {
        "localip": "45.33.68.55",
        "remoteip": "172.253.122.26",
        "remotemx": "",
        "tls": {"started": false}
    },
    "duration": 0.26235413
}
""")


def same_shape(got: Any, want: Any, path: str = "") -> None:
    """Same keys at every level and the same JSON types (int and float both count as number)."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{path}: {got!r} is not an object"
        assert set(got) == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            same_shape(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list), f"{path}: {got!r} is not a list"
        for i, item in enumerate(got):
            same_shape(item, want[0], f"{path}[{i}]")
    elif isinstance(want, bool):
        assert isinstance(got, bool), f"{path}: {got!r} is not a boolean"
    elif isinstance(want, (int, float)):
        assert isinstance(got, (int, float)) and not isinstance(got, bool), f"{path}: {got!r}"
    else:
        assert isinstance(got, type(want)), f"{path}: {got!r} is not {type(want).__name__}"


@pytest.fixture(scope="module")
def proxy_port() -> Iterator[int]:
    """The seed's `listen outboundsmtp` HAProxy on loopback (needs root for usesrc clientip)."""
    require_transparent_proxy()
    port = free_port()
    with haproxy(seed_outbound_haproxy("127.0.0.1", port), [("127.0.0.1", port)]):
        yield port


def cli_send(*args: str, stdin: str | None = None) -> tuple[int, dict[str, Any] | None, str]:
    if stdin is None:
        proc = run_cli("send", *args)
    else:
        proc = subprocess.run([sys.executable, "-m", "ferrymail.cli", "send", *args],
                              input=stdin, capture_output=True, text=True, timeout=30)
    result = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, result, proc.stderr


@pytest.mark.parametrize("version", [1, 2])
def test_cli_through_haproxy_arrives_from_the_source_ip(proxy_port: int, version: int) -> None:
    src = f"127.0.0.{30 + version}"
    with smtp_sink() as sink:
        code, result, stderr = cli_send(
            "--from", "<>", "--to", "someone@example.com", "--server", "127.0.0.1",
            "--port", str(sink.port), "--sourceip", f"{src}=smtp{version}.ferry.test",
            "--proxy", f"127.0.0.1:{proxy_port}", "--proxy-version", str(version),
            "--subject", "Hello", "--body", "Hello World")
        (dump,) = sink.wait_dumps(1)
    assert code == 0, stderr
    assert (f"ferrymail: send: Connecting from [{src}] to [127.0.0.1]:{sink.port} "
            f"via [127.0.0.1]:{proxy_port}") in stderr.splitlines()
    same_shape(result, SEED_OUTPUT)
    assert result["result"] == {"code": 250, "enhanced": [2, 0, 0], "reason": ["Ok"],
                                "state": "EOD"}
    assert result["connection"] == {"localip": src, "remoteip": "127.0.0.1", "remotemx": "",
                                    "tls": {"started": False}}
    assert 0 < result["duration"] < 30
    assert dump.client_addr == src
    assert dump.helo == f"smtp{version}.ferry.test"
    assert dump.mail_from == "<>"
    assert dump.rcpts == ["<someone@example.com>"]
    assert dump.message["Subject"] == "Hello"
    assert dump.message["From"] == "<>"
    assert dump.message["Message-ID"]
    assert dump.message.get_payload().strip() == "Hello World"


@pytest.mark.parametrize("version", [1, 2])
def test_cli_rejected_at_end_of_data_like_the_seed(proxy_port: int, version: int) -> None:
    src = f"127.0.0.{40 + version}"
    with smtp_sink(extra=["-f", "."]) as sink:
        code, result, stderr = cli_send(
            "--from", "<>", "--to", "someone@example.com", "--server", "127.0.0.1",
            "--port", str(sink.port), "--sourceip", src, "--helo", "hsh.ferry.test",
            "--proxy", f"127.0.0.1:{proxy_port}", "--proxy-version", str(version),
            "--subject", "Hello", "--body", "Hello World")
    assert code == 1
    assert f"send: Connecting from [{src}] to [127.0.0.1]:{sink.port} via" in stderr
    same_shape(result, SEED_OUTPUT)
    assert result["result"]["code"] == 500
    assert result["result"]["enhanced"] == [5, 3, 0]
    assert result["result"]["reason"] == ["Error: command failed"]
    assert result["result"]["state"] == "EOD"
    assert result["connection"]["localip"] == src


def test_cli_direct_from_a_source_ip() -> None:
    with smtp_sink() as sink:
        code, result, stderr = cli_send(
            "--from", "sender@ferry.test", "--to", "a@example.com", "--to", "b@example.com",
            "--server", "127.0.0.1", "--port", str(sink.port), "--sourceip", "127.0.0.9",
            "--helo", "direct.ferry.test", "--header", "X-Test: yes", "--body", "hi")
        (dump,) = sink.wait_dumps(1)
    assert code == 0, stderr
    assert f"ferrymail: send: Connecting from [127.0.0.9] to [127.0.0.1]:{sink.port}" \
        in stderr.splitlines()  # no " via …" when direct
    same_shape(result, SEED_OUTPUT)
    assert result["connection"]["localip"] == "127.0.0.9"
    assert dump.client_addr == "127.0.0.9"
    assert dump.helo == "direct.ferry.test"
    assert dump.rcpts == ["<a@example.com>", "<b@example.com>"]
    assert dump.message["X-Test"] == "yes"
    assert dump.message["To"] == "a@example.com, b@example.com"


def test_cli_sends_a_whole_file_from_stdin() -> None:
    message = "From: a@ferry.test\nSubject: from stdin\n\nline 1\n.leading dot\n"
    with smtp_sink() as sink:
        code, result, stderr = cli_send(
            "--from", "a@ferry.test", "--to", "b@example.com", "--server", "127.0.0.1",
            "--port", str(sink.port), "--file", "-", stdin=message)
        (dump,) = sink.wait_dumps(1)
    assert code == 0, stderr
    assert "from [0.0.0.0]" in stderr  # no source IP: the OS picks it
    assert dump.message["Subject"] == "from stdin"
    assert b"\n\nline 1\n.leading dot\n" in dump.raw  # the dot arrived unstuffed


def test_cli_proxy_down_is_a_proxy_error() -> None:
    dead = free_port()
    code, result, stderr = cli_send(
        "--from", "<>", "--to", "x@example.com", "--server", "127.0.0.1", "--port", "25",
        "--sourceip", "127.0.0.5", "--proxy", f"127.0.0.1:{dead}", "--body", "x",
        "--timeout", "5")
    assert code == 1
    assert f"via [127.0.0.1]:{dead}" in stderr
    assert set(result) == {"error", "connection", "duration"}
    assert result["error"]["type"] == "proxy"
    assert result["error"]["temporary"] is True
    assert f"127.0.0.1:{dead}" in result["error"]["message"]
    same_shape(result["connection"], SEED_OUTPUT["connection"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--file", "msg.eml", "--subject", "x"], "cannot be combined"),
        (["--file", "/nonexistent/msg.eml"], "cannot read --file"),
        (["--proxy", "127.0.0.1"], "expected HOST:PORT"),
        (["--proxy", "127.0.0.1:2525"], "proxyprotocol needs a sourceip"),
        (["--port", "0"], "port: expected a port number"),
        (["--sourceip", "999.1.1.1"], "expected an IPv4 or IPv6 address"),
        (["--tls", "sometimes"], "invalid choice"),
        (["--header", "no colon"], 'expected "Name: value"'),
        (["--header", "Subject: a\rb"], "CR, LF or NUL"),
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    # In-process (the same main() the console script runs): these never reach the network.
    code = cli_main_in_process("--from", "a@ferry.test", "--to", "b@example.com",
                               "--server", "127.0.0.1", *args)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert message in err


def test_cli_bad_addresses_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main_in_process("--from", "not an address", "--to", "b@example.com") == 2
    assert "sender: 'not an address' is not a valid address" in capsys.readouterr().err
    assert cli_main_in_process("--from", "<>", "--to", "<>") == 2
    assert "only allowed as the sender" in capsys.readouterr().err


def cli_main_in_process(*args: str) -> int:
    from ferrymail.cli import main

    try:
        return main(["send", *args])
    except SystemExit as exc:  # argparse's own usage errors
        return int(exc.code or 0)


# --------------------------------------------------------------------------- Python API


def test_python_api_the_seed_script(proxy_port: int) -> None:
    lines: list[str] = []
    mail = (MIME().add_header("Subject", "Hello").set_body("Hello World")
            .add_header("From", "<>").add_header("Message-ID", "<seed-1@example.com>"))
    with smtp_sink(extra=["-f", "."]) as sink:
        result = mail.send("<>", ["someone@example.com"], {
            "server": "127.0.0.1", "port": sink.port, "sourceip": "127.0.0.51",
            "proxyprotocol": {"server": "127.0.0.1", "port": proxy_port},
        })
    same_shape(result, SEED_OUTPUT)
    assert result["result"]["state"] == "EOD" and result["result"]["code"] == 500
    assert result["connection"]["localip"] == "127.0.0.51"
    with smtp_sink() as sink:
        result = send(mail, "<>", ["someone@example.com"], {
            "server": "127.0.0.1", "port": sink.port,
            "sourceip": [{"address": "127.0.0.52", "helo": "api.ferry.test"}],
            "proxyprotocol": {"server": "127.0.0.1", "port": proxy_port, "version": 2},
        }, log=lines.append)
        (dump,) = sink.wait_dumps(1)
    assert result["result"]["code"] == 250
    assert lines == [f"send: Connecting from [127.0.0.52] to [127.0.0.1]:{sink.port} "
                     f"via [127.0.0.1]:{proxy_port}"]
    assert (dump.client_addr, dump.helo) == ("127.0.0.52", "api.ferry.test")
    assert dump.message["Message-ID"] == "<seed-1@example.com>"


def test_the_example_script_reproduces_the_seed(proxy_port: int) -> None:
    with smtp_sink(extra=["-f", "."]) as sink:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "send_hello.py"),
             "--server", "127.0.0.1", "--port", str(sink.port), "--sourceip", "127.0.0.53",
             "--proxy", "127.0.0.1", "--proxy-port", str(proxy_port),
             "--to", "someone@example.com"],
            capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (f"send_hello.py: send: Connecting from [127.0.0.53] to [127.0.0.1]:{sink.port} "
            f"via [127.0.0.1]:{proxy_port}") in proc.stderr
    result = json.loads(proc.stdout)
    same_shape(result, SEED_OUTPUT)
    assert result["result"]["code"] == 500 and result["result"]["state"] == "EOD"


@pytest.mark.parametrize(
    ("flags", "code", "state"),
    [
        (["-f", "CONNECT"], 550, "CONNECT"),
        (["-f", "MAIL"], 550, "MAIL"),
        (["-r", "RCPT"], 450, "RCPT"),
        (["-f", "DATA"], 550, "DATA"),
        (["-r", "."], 450, "EOD"),
    ],
)
def test_state_names_the_phase_of_the_deciding_reply(flags: list[str], code: int,
                                                     state: str) -> None:
    with smtp_sink(extra=flags) as sink:
        result = send(b"Subject: x\n\nbody\n", "a@ferry.test", "b@example.com",
                      {"server": "127.0.0.1", "port": sink.port, "sourceip": "127.0.0.10"},
                      log=lambda line: None)
    same_shape(result, SEED_OUTPUT)
    assert result["result"]["state"] == state
    assert result["result"]["code"] // 100 == code // 100
    assert len(result["result"]["enhanced"]) == 3


def test_sourceip_list_is_tried_in_order_until_one_connects() -> None:
    lines: list[str] = []
    with smtp_sink() as sink:
        result = send(MIME().set_body("x"), "a@ferry.test", ["b@example.com"], {
            "server": "127.0.0.1", "port": sink.port,
            "sourceip": [{"address": "192.0.2.77", "helo": "unbindable.ferry.test"},
                         {"address": "127.0.0.11", "helo": "second.ferry.test"}],
        }, log=lines.append)
        (dump,) = sink.wait_dumps(1)
    assert result["result"]["code"] == 250
    assert [line.split(" to ")[0] for line in lines] == [
        "send: Connecting from [192.0.2.77]", "send: Connecting from [127.0.0.11]"]
    assert (dump.client_addr, dump.helo) == ("127.0.0.11", "second.ferry.test")


def test_no_server_uses_mx_lookup_of_the_recipient_domain() -> None:
    # An address literal is its own MX: no DNS is needed, and remotemx names it.
    with smtp_sink(host="127.0.0.60") as sink:
        result = send(MIME().set_body("x"), "a@ferry.test", ["b@[127.0.0.60]"],
                      {"port": sink.port, "sourceip": "127.0.0.12"}, log=lambda line: None)
        (dump,) = sink.wait_dumps(1)
    assert result["result"]["code"] == 250
    assert result["connection"]["remoteip"] == "127.0.0.60"
    assert result["connection"]["remotemx"] == "127.0.0.60"
    assert dump.client_addr == "127.0.0.12"


def test_api_errors_and_async_use() -> None:
    import asyncio

    with pytest.raises(ValueError, match="unknown send option"):
        send(b"x", "<>", ["a@example.com"], {"server": "127.0.0.1", "bogus": 1})
    with pytest.raises(ValueError, match="at least one recipient"):
        send(b"x", "<>", [], {"server": "127.0.0.1"})

    async def inside_a_loop() -> dict[str, Any]:
        with pytest.raises(RuntimeError, match="await send_async"):
            send(b"x", "<>", ["a@example.com"], {"server": "127.0.0.1"})
        with smtp_sink() as sink:
            return await send_async(b"Subject: a\n\nb\n", "<>", "a@example.com",
                                    {"server": "localhost", "port": sink.port},
                                    log=lambda line: None)

    result = asyncio.run(inside_a_loop())
    assert result["result"]["code"] == 250  # a host name for server works too
    assert result["connection"]["remotemx"] == ""


# --------------------------------------------------------------------------- scripted peers


def run_async(coro_fn) -> Any:
    import asyncio

    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), 20)

    return asyncio.run(bounded())


def quiet(line: str) -> None:
    pass


def test_tls_started_is_reported(tmp_path: Path) -> None:
    from tests.integration.smtpscript import ScriptedSMTP, self_signed, server_context

    ctx = server_context(*self_signed(tmp_path))

    async def main() -> dict[str, Any]:
        async with ScriptedSMTP(tls_context=ctx) as srv:
            result = await send_async(MIME().set_body("x"), "a@ferry.test", "b@example.com",
                                      {"server": "127.0.0.1", "port": srv.port,
                                       "tls": "require"}, log=quiet)
            assert srv.sessions[0].messages[0].tls
            return result

    result = run_async(main)
    assert result["result"]["code"] == 250
    tls = result["connection"]["tls"]
    assert tls["started"] is True and tls["protocol"].startswith("TLSv1") and tls["cipher"]


def test_tls_required_but_not_offered_is_a_tls_error() -> None:
    with smtp_sink() as sink:
        result = send(b"Subject: x\n\nx\n", "a@ferry.test", "b@example.com",
                      {"server": "127.0.0.1", "port": sink.port, "tls": "require"}, log=quiet)
    assert result["error"]["type"] == "tls"
    assert "STARTTLS" in result["error"]["message"]


def test_partial_rejection_names_the_refused_recipients() -> None:
    from tests.integration.smtpscript import ScriptedSMTP

    def rcpt(addr: str) -> str:
        return "550 5.1.1 no such user" if addr.startswith("bad") else "250 2.1.5 ok"

    async def main() -> dict[str, Any]:
        async with ScriptedSMTP(rcpt=rcpt) as srv:
            return await send_async(b"Subject: x\n\nx\n", "a@ferry.test",
                                    ["good@example.com", "bad@example.com"],
                                    {"server": "127.0.0.1", "port": srv.port}, log=quiet)

    result = run_async(main)
    assert result["result"]["code"] == 250 and result["result"]["state"] == "EOD"
    assert result["rejected"] == [{"recipient": "bad@example.com", "code": 550,
                                   "enhanced": [5, 1, 1], "reason": ["no such user"],
                                   "state": "RCPT"}]
    from ferrymail.send import succeeded

    assert not succeeded(result)  # the CLI exits 1


def test_ehlo_refusal_and_replies_without_enhanced_codes() -> None:
    from tests.integration.smtpscript import ScriptedSMTP

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with ScriptedSMTP(ehlo="554 go away", helo="554 still no") as srv:
            refused = await send_async(b"x\n", "a@ferry.test", "b@example.com",
                                       {"server": "127.0.0.1", "port": srv.port}, log=quiet)
        async with ScriptedSMTP(eod="452 try later") as srv:
            later = await send_async(b"x\n", "a@ferry.test", "b@example.com",
                                     {"server": "127.0.0.1", "port": srv.port}, log=quiet)
        return refused, later

    refused, later = run_async(main)
    assert refused["result"] == {"code": 554, "enhanced": [], "reason": ["still no"],
                                 "state": "EHLO"}
    assert later["result"] == {"code": 452, "enhanced": [], "reason": ["try later"],
                               "state": "EOD"}
    same_shape(later, SEED_OUTPUT)
