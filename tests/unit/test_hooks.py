"""The pre-delivery hook module: loading, decisions, option checks, errors, time limits."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrymail.hooks import (
    DecisionAlreadyMade,
    HookContext,
    HookDecision,
    HookError,
    PredeliveryHook,
    ProxyProtocol,
    SourceIP,
    parse_try_options,
)

CTX = HookContext(
    queue_id="q1", sender="s@x.test", recipients=("r@a.test",), transport="mx", retry=0,
    server_id="inbound", client_ip="127.0.0.1", helo="client.test", size=100,
    received_at=1.0, metadata={},
)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def call(hook: PredeliveryHook, ctx: HookContext = CTX) -> HookDecision:
    return asyncio.run(hook(ctx))


def load_body(tmp_path: Path, body: str, *, timeout: float = 5.0,
              name: str = "hook.py") -> PredeliveryHook:
    """A hook file whose predelivery(ctx, action) has ``body``."""
    src = "def predelivery(ctx, action):\n" + textwrap.indent(textwrap.dedent(body), "    ")
    (tmp_path / name).write_text(src)
    return PredeliveryHook.load(str(tmp_path / name), timeout=timeout)


# --------------------------------------------------------------------------- loading


def test_load_by_path_default_function_and_relative_to_base_dir(tmp_path: Path) -> None:
    write(tmp_path / "h.py", """
        def predelivery(ctx, action):
            action.queue(delay=5, reason=ctx.queue_id)
        def other(ctx, action):
            action.delete()
    """)
    assert call(PredeliveryHook.load(str(tmp_path / "h.py"), timeout=1)) == HookDecision(
        "queue", delay=5.0, reason="q1")
    hook = PredeliveryHook.load("h.py:other", timeout=1, base_dir=tmp_path)
    assert call(hook).action == "delete"


def test_load_by_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "hookpkg_a"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg / "rules.py", """
        def predelivery(ctx, action):
            action.bounce("no " + ctx.recipients[0])
        async def later(ctx, action):
            action.queue(reason="later")
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert call(PredeliveryHook.load("hookpkg_a.rules", timeout=1)) == HookDecision(
        "bounce", reason="no r@a.test")
    hook = PredeliveryHook.load("hookpkg_a.rules:later", timeout=1)
    assert hook.is_async
    assert call(hook) == HookDecision("queue", reason="later")


def test_a_file_hook_can_define_dataclasses(tmp_path: Path) -> None:
    write(tmp_path / "h.py", """
        from __future__ import annotations
        from dataclasses import dataclass
        @dataclass
        class Rule:
            host: str
        def predelivery(ctx, action):
            action.try_(server=Rule("mx.a.test").host)
    """)
    assert call(PredeliveryHook.load(str(tmp_path / "h.py"), timeout=1)).server == "mx.a.test"


@pytest.mark.parametrize(
    ("setup", "spec", "message"),
    [
        (None, "missing.py", "not found"),
        ("def predelivery(ctx, action)\n    pass\n", "bad.py", "syntax error"),
        ("raise RuntimeError('boom at import')\n", "bad.py", "boom at import"),
        ("def other(ctx, action): pass\n", "bad.py", "no function 'predelivery'"),
        ("predelivery = 5\n", "bad.py", "not a function"),
        ("def predelivery(ctx): pass\n", "bad.py", "two arguments"),
        (None, "no_such_module_xyz:fn", "module 'no_such_module_xyz' not found"),
        (None, "not a spec!", "expected 'package.module:function'"),
    ],
)
def test_load_errors_are_clear(tmp_path: Path, setup: str | None, spec: str,
                               message: str) -> None:
    if setup is not None:
        (tmp_path / "bad.py").write_text(setup)
    with pytest.raises(ValueError, match=r"scripting\.hooks\.predelivery") as info:
        PredeliveryHook.load(spec, timeout=1, base_dir=tmp_path)
    assert message in str(info.value)


def test_load_rejects_a_bad_timeout(tmp_path: Path) -> None:
    write(tmp_path / "h.py", "def predelivery(ctx, action): pass\n")
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="timeout"):
            PredeliveryHook.load(str(tmp_path / "h.py"), timeout=bad)


def test_reload_rereads_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "h.py"
    write(path, "def predelivery(ctx, action):\n    action.queue(reason='v1')\n")
    assert call(PredeliveryHook.load(str(path), timeout=1)).reason == "v1"
    # Same size and mtime on purpose: a bytecode cache keyed on them would miss this change.
    st_before = path.stat()
    write(path, "def predelivery(ctx, action):\n    action.queue(reason='v2')\n")
    os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert call(PredeliveryHook.load(str(path), timeout=1)).reason == "v2"


def test_reload_of_a_module_picks_up_changes(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = tmp_path / "hookmod_reload.py"
    write(mod, "def predelivery(ctx, action):\n    action.queue(reason='one')\n")
    assert call(PredeliveryHook.load("hookmod_reload", timeout=1)).reason == "one"
    write(mod, "def predelivery(ctx, action):\n    action.queue(reason='second version')\n")
    later = time.time() + 5
    os.utime(mod, (later, later))
    assert call(PredeliveryHook.load("hookmod_reload", timeout=1)).reason == "second version"
    sys.modules.pop("hookmod_reload", None)


def test_a_broken_reload_keeps_nothing_half_loaded(tmp_path: Path) -> None:
    path = tmp_path / "h.py"
    write(path, "def predelivery(ctx, action):\n    action.delete()\n")
    good = PredeliveryHook.load(str(path), timeout=1)
    write(path, "def predelivery(ctx, action):\n    action.delete(\n")
    with pytest.raises(ValueError, match="syntax error"):
        PredeliveryHook.load(str(path), timeout=1)
    assert call(good).action == "delete"  # the engine keeps using the previous one


# --------------------------------------------------------------------------- decisions


def test_no_call_means_try_with_no_overrides(tmp_path: Path) -> None:
    assert call(load_body(tmp_path, "pass\n")) == HookDecision("try")


def test_try_with_the_seed_options(tmp_path: Path) -> None:
    hook = load_body(tmp_path, """
        action.try_(
            proxyprotocol={"server": "192.168.1.2", "port": 2525},
            sourceip=[
                {"address": "1.2.3.4", "helo": "smtp4.example.com"},
                {"address": "1.2.3.5", "helo": "smtp5.example.com"},
                {"address": "1.2.3.6", "helo": "smtp6.example.com"},
            ])
    """)
    assert call(hook) == HookDecision(
        "try",
        proxyprotocol=ProxyProtocol("192.168.1.2", 2525, 1),
        sourceip=(SourceIP("1.2.3.4", "smtp4.example.com"),
                  SourceIP("1.2.3.5", "smtp5.example.com"),
                  SourceIP("1.2.3.6", "smtp6.example.com")),
    )


def test_try_with_every_option(tmp_path: Path) -> None:
    hook = load_body(tmp_path, """
        action.try_(proxyprotocol=False, sourceip="2001:db8::1", sourceip_random=False,
                    server="mx.b.test", port=2525, tls="require_verify", timeout=7)
    """)
    assert call(hook) == HookDecision(
        "try", no_proxy=True, sourceip=(SourceIP("2001:db8::1"),), sourceip_random=False,
        server="mx.b.test", port=2525, tls="require_verify", timeout=7.0)


def test_sourceip_may_name_address_ids(tmp_path: Path) -> None:
    hook = load_body(tmp_path, """
        action.try_(sourceip=["warm-1", {"address": "bulk.2", "helo": "b.test"}, "10.0.0.1"],
                    sourceip_random=False)
    """)
    assert call(hook).sourceip == (SourceIP("warm-1"), SourceIP("bulk.2", "b.test"),
                                   SourceIP("10.0.0.1"))


def test_each_action(tmp_path: Path) -> None:
    assert call(load_body(tmp_path, "action.queue()\n")) == HookDecision("queue")
    assert call(load_body(tmp_path, "action.queue(0, 'x')\n")) == HookDecision(
        "queue", delay=0.0, reason="x")
    assert call(load_body(tmp_path, "action.bounce('spam')\n")) == HookDecision(
        "bounce", reason="spam")
    assert call(load_body(tmp_path, "action.delete()\n")) == HookDecision("delete")


def test_the_hook_sees_the_context(tmp_path: Path) -> None:
    hook = load_body(tmp_path, """
        action.queue(reason=f"{ctx.queue_id} {ctx.sender} {ctx.recipients} {ctx.retry}")
    """)
    assert call(hook).reason == "q1 s@x.test ('r@a.test',) 0"


def test_a_second_call_raises(tmp_path: Path) -> None:
    hook = load_body(tmp_path, "action.try_()\naction.bounce('x')\n")
    with pytest.raises(HookError, match="DecisionAlreadyMade") as info:
        call(hook)
    assert "already decided (try)" in str(info.value)


def test_a_second_call_that_is_caught_keeps_the_first_decision(tmp_path: Path) -> None:
    hook = load_body(tmp_path, """
        action.delete()
        try:
            action.try_()
        except Exception as exc:
            assert type(exc).__name__ == "DecisionAlreadyMade"
    """)
    assert call(hook).action == "delete"
    assert issubclass(DecisionAlreadyMade, RuntimeError)


def test_returning_a_value_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(HookError, match="should return None"):
        call(load_body(tmp_path, "return 'try'\n"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("bogus=1", "unknown try_() option(s) 'bogus'"),
        ("sourceip='1.2.3.999'", "sourceip[0]: expected an IPv4 or IPv6 address"),
        ("sourceip=['fe80::1::2']", "expected an IPv4 or IPv6 address or an address id"),
        ("sourceip=['bad id!']", "expected an IPv4 or IPv6 address or an address id"),
        ("sourceip=[5]", "sourceip[0]: expected"),
        ("sourceip=[]", "non-empty list"),
        ("sourceip=[{'helo': 'a.test'}]", "'address' is missing"),
        ("sourceip=[{'address': '1.2.3.4', 'hello': 'a'}]", "unknown key(s) 'hello'"),
        ("sourceip=[{'address': '1.2.3.4', 'helo': 'bad name!'}]", "helo: expected a host"),
        ("port=0", "port: expected a port number 1-65535"),
        ("port=65536", "port number"),
        ("port='25'", "port number"),
        ("proxyprotocol={'server': '10.0.0.1'}", "'port' is missing"),
        ("proxyprotocol={'server': '10.0.0.1', 'port': 70000}", "proxyprotocol.port"),
        ("proxyprotocol={'server': '10.0.0.1', 'port': 1, 'version': 3}", "version"),
        ("proxyprotocol={'server': '10.0.0.1', 'port': 1, 'host': 'x'}", "unknown key"),
        ("proxyprotocol={'server': '300.1.1.1', 'port': 1}", "proxyprotocol.server"),
        ("proxyprotocol=True", "or False"),
        ("server='not a host'", "server: expected an IP address or a host name"),
        ("tls='maybe'", "tls: expected one of disabled"),
        ("timeout=0", "timeout: expected a number of seconds greater than 0"),
        ("sourceip_random='no'", "sourceip_random: expected True or False"),
    ],
)
def test_invalid_try_options_are_hook_errors(tmp_path: Path, options: str, message: str) -> None:
    with pytest.raises(HookError, match="ValueError") as info:
        call(load_body(tmp_path, f"action.try_({options})\n"))
    assert message in str(info.value)


def test_invalid_queue_and_reason_arguments(tmp_path: Path) -> None:
    with pytest.raises(HookError, match="delay: expected a number of seconds 0 or more"):
        call(load_body(tmp_path, "action.queue(delay=-1)\n"))
    with pytest.raises(HookError, match="reason: expected a string"):
        call(load_body(tmp_path, "action.bounce(42)\n"))


_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["1.2.3.4", "::1", "mx.a.test", "optional"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["server", "port", "version", "address", "helo", "x"]),
                      inner, max_size=4),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(
    ["proxyprotocol", "sourceip", "sourceip_random", "server", "port", "tls", "timeout", "zz"]),
    _junk, max_size=4))
def test_try_options_parser_gives_a_decision_or_a_valueerror(options: dict) -> None:
    try:
        decision = parse_try_options(options)
    except ValueError as exc:
        assert str(exc)
        return
    assert decision.action == "try"
    if decision.port is not None:
        assert 1 <= decision.port <= 65535
    for src in decision.sourceip or ():
        assert isinstance(src, SourceIP) and src.address


# --------------------------------------------------------------------------- failures


def test_a_raising_hook_gives_hookerror_with_the_traceback(tmp_path: Path) -> None:
    hook = load_body(tmp_path, "helper = {}\nhelper['missing']\n")
    with pytest.raises(HookError) as info:
        call(hook)
    err = info.value
    assert "raised KeyError: 'missing'" in str(err)
    assert not err.timed_out
    assert "Traceback (most recent call last)" in err.traceback
    assert str(tmp_path / "hook.py") in err.traceback
    assert "helper['missing']" in err.traceback  # the source line is shown
    assert "ferrymail/hooks.py" not in err.traceback  # starts at the hook's own code


def test_an_async_hook_that_raises(tmp_path: Path) -> None:
    write(tmp_path / "h.py", """
        import asyncio
        async def predelivery(ctx, action):
            await asyncio.sleep(0)
            raise LookupError("no route for " + ctx.recipients[0])
    """)
    with pytest.raises(HookError, match=r"LookupError: no route for r@a\.test") as info:
        call(PredeliveryHook.load(str(tmp_path / "h.py"), timeout=1))
    assert "Traceback" in info.value.traceback


def test_a_hung_sync_hook_times_out_without_blocking_the_loop(tmp_path: Path) -> None:
    release = threading.Event()
    write(tmp_path / "h.py", """
        import time
        release = None
        def wait_here():
            release.wait(30)
        def predelivery(ctx, action):
            wait_here()
            action.bounce("too late")
    """)
    hook = PredeliveryHook.load(str(tmp_path / "h.py"), timeout=0.4)
    sys.modules[hook.function.__module__].release = release

    async def main() -> tuple[int, HookError]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        with pytest.raises(HookError) as info:
            await hook(CTX)
        t.cancel()
        return ticks, info.value

    try:
        ticks, err = asyncio.run(main())
        assert err.timed_out
        assert "exceeded its time limit of 0.4s" in str(err)
        assert "wait_here" in err.traceback  # where it was stuck
        first_frame = err.traceback.splitlines()[1]
        assert str(tmp_path / "h.py") in first_frame, err.traceback
        # The loop kept running while the hook hung in its thread.
        assert ticks >= 10
    finally:
        release.set()  # let the abandoned thread finish: its late bounce is ignored


def test_a_late_decision_from_an_abandoned_thread_is_ignored(tmp_path: Path) -> None:
    release = threading.Event()
    done = threading.Event()
    write(tmp_path / "h.py", """
        gate = done = None
        outcome = []
        def predelivery(ctx, action):
            gate.wait(30)
            try:
                action.bounce("late")
            except Exception as exc:
                outcome.append(type(exc).__name__)
            done.set()
    """)
    hook = PredeliveryHook.load(str(tmp_path / "h.py"), timeout=0.2)
    mod = sys.modules[hook.function.__module__]
    mod.gate, mod.done = release, done
    with pytest.raises(HookError, match="time limit"):
        call(hook)
    release.set()
    assert done.wait(5)
    assert mod.outcome == ["DecisionAlreadyMade"]


def test_a_hung_async_hook_is_cancelled(tmp_path: Path) -> None:
    write(tmp_path / "h.py", """
        import asyncio
        state = []
        async def predelivery(ctx, action):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                state.append("cancelled")
                raise
    """)
    hook = PredeliveryHook.load(str(tmp_path / "h.py"), timeout=0.2)

    async def main() -> HookError:
        with pytest.raises(HookError) as info:
            await hook(CTX)
        await asyncio.sleep(0.05)  # let the cancellation land
        return info.value

    err = asyncio.run(main())
    assert err.timed_out and "was cancelled" in str(err)
    assert sys.modules[hook.function.__module__].state == ["cancelled"]
    assert "predelivery" in err.traceback


def test_sync_and_async_hooks_run_concurrently(tmp_path: Path) -> None:
    write(tmp_path / "h.py", """
        import time
        def predelivery(ctx, action):
            time.sleep(0.2)
            action.queue(reason=ctx.queue_id)
    """)
    hook = PredeliveryHook.load(str(tmp_path / "h.py"), timeout=5)

    async def main() -> list[HookDecision]:
        ctxs = [HookContext(f"q{i}", "", ("r@a.test",), "mx", 0) for i in range(10)]
        return await asyncio.gather(*(hook(c) for c in ctxs))

    start = time.monotonic()
    decisions = asyncio.run(main())
    assert [d.reason for d in decisions] == [f"q{i}" for i in range(10)]
    assert time.monotonic() - start < 1.5  # ten 0.2 s hooks did not run one after another


# --------------------------------------------------------------------------- the examples

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "hooks"


def _ctx(rcpt: str, retry: int = 0) -> HookContext:
    return HookContext("q9", "s@x.test", (rcpt,), "mx", retry)


def test_example_seed_try() -> None:
    hook = PredeliveryHook.load("seed_try.py", timeout=1, base_dir=EXAMPLES)
    d = call(hook)
    assert d.action == "try"
    assert d.proxyprotocol == ProxyProtocol("192.168.1.2", 2525, 1)
    assert [(s.address, s.helo) for s in d.sourceip] == [
        ("1.2.3.4", "smtp4.example.com"), ("1.2.3.5", "smtp5.example.com"),
        ("1.2.3.6", "smtp6.example.com")]


def test_example_per_domain() -> None:
    hook = PredeliveryHook.load(str(EXAMPLES / "per_domain.py"), timeout=1)
    gmail = call(hook, _ctx("a@gmail.com"))
    assert gmail.proxyprotocol == ProxyProtocol("192.168.1.2", 2525)
    assert gmail.sourceip_random
    assert not call(hook, _ctx("a@outlook.com")).sourceip_random
    corp = call(hook, _ctx("a@corp.example"))
    assert corp.no_proxy and corp.server == "10.0.0.25" and corp.tls == "require"
    assert call(hook, _ctx("a@spamtrap.example")).action == "bounce"
    assert call(hook, _ctx("a@blackhole.example")).action == "delete"
    assert call(hook, _ctx("a@greylisting.example", retry=1)) == HookDecision("try")
    slow = call(hook, _ctx("a@greylisting.example", retry=3))
    assert (slow.action, slow.delay) == ("queue", 1800.0)
    assert call(hook, _ctx("a@elsewhere.example")) == HookDecision("try")
