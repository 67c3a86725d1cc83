"""The pre-delivery hook: a user's Python function that decides each delivery attempt.

The running config names it (``scripting.hooks.predelivery``): ``"package.module:function"``,
``"path/to/file.py"`` or ``"path/to/file.py:function"``; the default function name is
``predelivery``. It is called just before an attempt, once per destination group of
recipients::

    def predelivery(ctx: HookContext, action: Action) -> None:
        if ctx.recipients[0].endswith("@gmail.com"):
            action.try_(proxyprotocol={"server": "192.168.1.2", "port": 2525},
                        sourceip=[{"address": "1.2.3.4", "helo": "smtp4.example.com"}])

``action`` offers Halon's ``Try()``, ``Queue()``, ``Bounce()`` and ``Delete()`` as
``try_()``, ``queue()``, ``bounce()`` and ``delete()``; the first call decides, calling
nothing means ``try_()`` with the transport's own settings. ``action.dkim_sign(domain,
selector)`` (Halon's ``signDKIM()``) chooses the DKIM key(s) the attempt's copy is signed
with, instead of ``dkim.sign``/``dkim.rules``; call it once per key (e.g. RSA and Ed25519).
The function may be ``async``.
A hook that raises, or runs longer than ``scripting.hooks.timeout``, gives ``HookError``;
the engine then leaves the message queued. Sync functions run in a daemon thread, so a hang
neither blocks the event loop nor stops the process from exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import ipaddress
import linecache
import math
import re
import sys
import threading
import traceback
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferrymail.config.types import split_hook

__all__ = [
    "TLS_MODES",
    "Action",
    "DecisionAlreadyMade",
    "HookContext",
    "HookDecision",
    "HookError",
    "PredeliveryHook",
    "ProxyProtocol",
    "SourceIP",
]

TLS_MODES = ("disabled", "optional", "optional_verify", "require", "require_verify")
TRY_OPTIONS = ("proxyprotocol", "sourceip", "sourceip_random", "server", "port", "tls", "timeout")
# Threads of timed-out sync hooks that never returned; past this, calls fail fast instead of
# piling up more stuck threads.
MAX_HUNG_THREADS = 64

_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class HookContext:
    """What the hook sees about the attempt (read-only)."""

    queue_id: str
    sender: str  # "" = null sender
    recipients: tuple[str, ...]  # the recipients of this attempt (one destination)
    transport: str  # transport id chosen by routing
    retry: int  # attempts already made for these recipients (0 on the first)
    server_id: str = ""
    client_ip: str = ""
    helo: str = ""
    size: int = 0
    received_at: float = 0.0
    metadata: Mapping[str, str] = field(default_factory=dict)
    auth: str = ""  # the SMTP AUTH user that submitted the message ("" = none)


@dataclass(frozen=True)
class SourceIP:
    """One source address to send from, with the HELO name to use from it."""

    address: str
    helo: str | None = None


@dataclass(frozen=True)
class ProxyProtocol:
    """An HAProxy (``accept-proxy``) to connect through; its PROXY header names the source."""

    server: str
    port: int
    version: int = 1


@dataclass(frozen=True)
class HookDecision:
    """The hook's verdict. For ``try``, None fields mean "the transport's own setting"."""

    action: str  # "try" | "queue" | "bounce" | "delete"
    sourceip: tuple[SourceIP, ...] | None = None
    proxyprotocol: ProxyProtocol | None = None
    no_proxy: bool = False  # try_(proxyprotocol=False): connect directly
    server: str | None = None
    port: int | None = None
    tls: str | None = None
    timeout: float | None = None  # connect timeout override
    sourceip_random: bool = True
    delay: float | None = None  # queue: seconds until the next attempt (None: retry schedule)
    reason: str | None = None  # queue/bounce/delete: logged, and used in the DSN
    dkim: tuple[tuple[str, str], ...] = ()  # dkim_sign() calls: (domain, selector) pairs


DEFAULT_DECISION = HookDecision("try")


class HookError(Exception):
    """The hook raised or ran past its time limit; ``traceback`` has the Python traceback
    (for a timeout: where the hook was when time ran out, when that is known)."""

    def __init__(self, message: str, traceback_text: str = "", *, timed_out: bool = False):
        super().__init__(message)
        self.traceback = traceback_text
        self.timed_out = timed_out


class DecisionAlreadyMade(RuntimeError):
    """try_/queue/bounce/delete was called after the hook had already decided."""


# --------------------------------------------------------------------------- option checks


def _host(value: object, what: str) -> str:
    if isinstance(value, str):
        text = value.strip()
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(text))
        if _HOSTNAME.fullmatch(text) and not text.replace(".", "").isdigit():
            return text
    raise ValueError(f"{what}: expected an IP address or a host name, got {value!r}")


def _ip(value: object, what: str) -> str:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(value.strip()))
    raise ValueError(f"{what}: expected an IPv4 or IPv6 address, got {value!r}")


def _port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{what}: expected a port number 1-65535, got {value!r}")
    return value


def _seconds(value: object, what: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        seconds = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(seconds) and (seconds > 0 or (allow_zero and seconds == 0))
    if not ok:
        bound = "0 or more" if allow_zero else "greater than 0"
        raise ValueError(f"{what}: expected a number of seconds {bound}, got {value!r}")
    return seconds


def _reason(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a string, got {value!r}")
    return value


def parse_proxyprotocol(value: object) -> ProxyProtocol | None:
    """``{"server": …, "port": …, "version": 1|2}`` (or a ProxyProtocol), or False → None."""
    if isinstance(value, ProxyProtocol):
        value = {"server": value.server, "port": value.port, "version": value.version}
    if not isinstance(value, Mapping):
        raise ValueError(
            "proxyprotocol: expected {'server': HOST, 'port': PORT[, 'version': 1|2]} or False, "
            f"got {value!r}"
        )
    unknown = sorted(set(value) - {"server", "port", "version"})
    if unknown:
        raise ValueError(f"proxyprotocol: unknown key(s) {', '.join(map(repr, unknown))} "
                         "(known: server, port, version)")
    for key in ("server", "port"):
        if key not in value:
            raise ValueError(f"proxyprotocol: '{key}' is missing")
    version = value.get("version", 1)
    if version not in (1, 2) or isinstance(version, bool):
        raise ValueError(f"proxyprotocol.version: expected 1 or 2, got {version!r}")
    return ProxyProtocol(_host(value["server"], "proxyprotocol.server"),
                         _port(value["port"], "proxyprotocol.port"), int(version))


_ADDRESS_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]*")
_IP_LIKE = re.compile(r"[0-9.]+|[0-9A-Fa-f.]*:[0-9A-Fa-f:.%]*")


def _source_address(value: object, what: str, allow_ids: bool) -> str:
    if allow_ids and isinstance(value, str) and _ADDRESS_ID.fullmatch(value) \
            and not _IP_LIKE.fullmatch(value):
        return value  # an addresses[].id; the engine checks that it exists
    expected = "an IPv4 or IPv6 address" + (" or an address id" if allow_ids else "")
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(value.strip()))
    raise ValueError(f"{what}: expected {expected}, got {value!r}")


def parse_sourceip(value: object, *, allow_ids: bool = True) -> tuple[SourceIP, ...]:
    """A single address, or a list of addresses / ``{"address", "helo"}``.

    An address is an IP literal or (``allow_ids``) the id of an ``addresses[]`` entry.
    """
    items = [value] if isinstance(value, (str, SourceIP, Mapping)) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(
            "sourceip: expected an address, or a non-empty list of addresses or "
            f"{{'address': IP, 'helo': NAME}}, got {value!r}"
        )
    out = []
    for i, item in enumerate(items):
        where = f"sourceip[{i}]"
        if isinstance(item, SourceIP):
            item = {"address": item.address, "helo": item.helo}
        if isinstance(item, str):
            out.append(SourceIP(_source_address(item, where, allow_ids)))
            continue
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: expected an address or {{'address', 'helo'}}, "
                             f"got {item!r}")
        unknown = sorted(set(item) - {"address", "helo"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                             "(known: address, helo)")
        if "address" not in item:
            raise ValueError(f"{where}: 'address' is missing")
        helo = item.get("helo")
        if helo is not None and (not isinstance(helo, str) or not _HOSTNAME.fullmatch(helo)):
            raise ValueError(f"{where}.helo: expected a host name, got {helo!r}")
        out.append(SourceIP(_source_address(item["address"], f"{where}.address", allow_ids),
                            helo))
    return tuple(out)


def parse_try_options(options: Mapping[str, Any]) -> HookDecision:
    """Check ``Try()`` options and turn them into a ``try`` decision; ValueError if bad."""
    unknown = sorted(set(options) - set(TRY_OPTIONS))
    if unknown:
        raise ValueError(f"unknown try_() option(s) {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(TRY_OPTIONS)})")
    kw: dict[str, Any] = {}
    if options.get("proxyprotocol") is False:
        kw["no_proxy"] = True
    elif options.get("proxyprotocol") is not None:
        kw["proxyprotocol"] = parse_proxyprotocol(options["proxyprotocol"])
    if options.get("sourceip") is not None:
        kw["sourceip"] = parse_sourceip(options["sourceip"])
    if "sourceip_random" in options:
        if not isinstance(options["sourceip_random"], bool):
            raise ValueError(f"sourceip_random: expected True or False, "
                             f"got {options['sourceip_random']!r}")
        kw["sourceip_random"] = options["sourceip_random"]
    if options.get("server") is not None:
        kw["server"] = _host(options["server"], "server")
    if options.get("port") is not None:
        kw["port"] = _port(options["port"], "port")
    if options.get("tls") is not None:
        if options["tls"] not in TLS_MODES:
            raise ValueError(f"tls: expected one of {', '.join(TLS_MODES)}, got {options['tls']!r}")
        kw["tls"] = options["tls"]
    if options.get("timeout") is not None:
        kw["timeout"] = _seconds(options["timeout"], "timeout")
    return HookDecision("try", **kw)


# --------------------------------------------------------------------------- action


class Action:
    """The decision functions handed to the hook. The first call decides."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decision: HookDecision | None = None
        self._closed = False
        self._dkim: list[tuple[str, str]] = []

    @property
    def decision(self) -> HookDecision | None:
        return self._decision

    def try_(self, **options: Any) -> None:
        """Deliver now; options override the transport's: ``proxyprotocol`` (a mapping, or
        False for a direct connection), ``sourceip``, ``sourceip_random``, ``server``,
        ``port``, ``tls``, ``timeout``."""
        self._decide(parse_try_options(options))

    def queue(self, delay: float | None = None, reason: str | None = None) -> None:
        """Skip this attempt and retry later: after ``delay`` seconds, or by the schedule."""
        if delay is not None:
            delay = _seconds(delay, "delay", allow_zero=True)
        self._decide(HookDecision("queue", delay=delay, reason=_reason(reason, "reason")))

    def bounce(self, reason: str | None = None) -> None:
        """Give up on these recipients now and send a DSN to the sender."""
        self._decide(HookDecision("bounce", reason=_reason(reason, "reason")))

    def delete(self, reason: str | None = None) -> None:
        """Drop these recipients without a DSN."""
        self._decide(HookDecision("delete", reason=_reason(reason, "reason")))

    def dkim_sign(self, domain: str, selector: str) -> None:
        """Sign this attempt's copy with the ``dkim.keys`` entry of ``domain``/``selector``
        (replaces the configured choice of signing domain; several calls, several
        signatures). An unknown key defers the attempt with a config error."""
        if not isinstance(domain, str) or not isinstance(selector, str) or not domain \
                or not selector:
            raise TypeError("dkim_sign(domain, selector) takes two non-empty strings")
        with self._lock:
            if self._closed:
                raise DecisionAlreadyMade("the hook's time is up; dkim_sign is ignored")
            self._dkim.append((domain.lower().rstrip("."), selector))

    def _decide(self, decision: HookDecision) -> None:
        with self._lock:
            if self._closed:
                raise DecisionAlreadyMade("the hook's time is up; this decision is ignored")
            if self._decision is not None:
                raise DecisionAlreadyMade(
                    f"the hook already decided ({self._decision.action}); call only one of "
                    "try_/queue/bounce/delete, once"
                )
            self._decision = decision

    def _close(self) -> HookDecision:
        with self._lock:
            self._closed = True
            decision = self._decision or DEFAULT_DECISION
            if self._dkim:
                decision = dataclasses.replace(decision, dkim=tuple(self._dkim))
            return decision


# --------------------------------------------------------------------------- loading

HookFunction = Callable[[HookContext, Action], Any]


def _load_error(spec: str, message: str) -> ValueError:
    return ValueError(f"scripting.hooks.predelivery {spec!r}: {message}")


def _module_name_for(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode(), usedforsecurity=False).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    return f"ferrymail_hook_{stem}_{digest}"


def _load_file(spec: str, path: Path) -> types.ModuleType:
    try:
        source = path.read_bytes()
    except FileNotFoundError as exc:
        raise _load_error(spec, f"file {path} not found") from exc
    except OSError as exc:
        raise _load_error(spec, f"cannot read {path}: {exc.strerror}") from exc
    try:
        code = compile(source, str(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise _load_error(spec, f"{path}:{exc.lineno}: syntax error: {exc.msg}") from exc
    name = _module_name_for(path)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    previous = sys.modules.get(name)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    linecache.checkcache(str(path))  # tracebacks show the file as it is now
    try:
        exec(code, module.__dict__)
    except BaseException as exc:
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        if not isinstance(exc, Exception):
            raise
        raise _load_error(spec, f"{path} raised while loading:\n{traceback.format_exc()}") from exc
    return module


def _load_module(spec: str, name: str) -> types.ModuleType:
    importlib.invalidate_caches()
    try:
        if name in sys.modules:
            return importlib.reload(sys.modules[name])
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            raise _load_error(spec, f"module {exc.name!r} not found (is it on sys.path?)") \
                from exc
        raise _load_error(spec, f"importing {name} failed:\n{traceback.format_exc()}") from exc
    except SyntaxError as exc:
        raise _load_error(spec, f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}") from exc
    except Exception as exc:
        raise _load_error(spec, f"importing {name} failed:\n{traceback.format_exc()}") from exc


# --------------------------------------------------------------------------- the hook


class PredeliveryHook:
    """A loaded hook function with its time limit; ``await hook(ctx)`` gives the decision."""

    def __init__(self, function: HookFunction, *, timeout: float, name: str) -> None:
        self.function = function
        self.timeout = timeout
        self.name = name
        self.is_async = inspect.iscoroutinefunction(function)

    @classmethod
    def load(cls, spec: str, *, timeout: float, base_dir: Path | None = None) -> PredeliveryHook:
        """Load (or load again: files are re-read, modules reloaded) the hook ``spec``.

        Raises ValueError naming the spec and what is wrong with it.
        """
        try:
            target, function, is_path = split_hook(spec, "predelivery")
        except ValueError as exc:
            raise _load_error(spec, str(exc)) from exc
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise _load_error(spec, f"timeout must be a number of seconds > 0, got {timeout!r}")
        if is_path:
            path = Path(target).expanduser()
            if not path.is_absolute():
                path = (base_dir or Path.cwd()) / path
            module = _load_file(spec, path.resolve())
        else:
            module = _load_module(spec, target)
        fn = getattr(module, function, None)
        if fn is None:
            raise _load_error(spec, f"{module.__name__} has no function {function!r}")
        if not callable(fn):
            raise _load_error(spec, f"{function!r} is a {type(fn).__name__}, not a function")
        try:
            inspect.signature(fn).bind(None, None)
        except TypeError as exc:
            raise _load_error(
                spec, f"{function}() must take two arguments (ctx, action): {exc}"
            ) from exc
        except ValueError:
            pass  # builtins without a signature: find out when called
        return cls(fn, timeout=float(timeout), name=spec)

    async def __call__(self, ctx: HookContext) -> HookDecision:
        """Run the hook for one attempt; raises HookError if it raised or timed out."""
        action = Action()
        try:
            if self.is_async:
                result = await self._run_async(self.function(ctx, action), action)
            else:
                result = await self._run_in_thread(ctx, action)
        finally:
            decision = action._close()
        if result is not None:
            raise HookError(
                f"predelivery hook {self.name} returned {result!r}; it should return None and "
                "call action.try_/queue/bounce/delete"
            )
        return decision

    async def _run_async(self, coro: Awaitable[Any], action: Action) -> Any:
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            buf = io.StringIO()
            task.print_stack(limit=20, file=buf)
            action._close()
            task.cancel()
            task.add_done_callback(_consume)
            raise HookError(
                f"predelivery hook {self.name} exceeded its time limit of {self.timeout:g}s "
                "and was cancelled", buf.getvalue(), timed_out=True,
            )
        if task.cancelled():
            raise HookError(f"predelivery hook {self.name} was cancelled (by itself)")
        exc = task.exception()
        if exc is not None:
            raise self._raised(exc)
        return task.result()

    async def _run_in_thread(self, ctx: HookContext, action: Action) -> Any:
        if _hung.count() >= MAX_HUNG_THREADS:
            raise HookError(f"predelivery hook {self.name}: {MAX_HUNG_THREADS} earlier calls "
                            "are still stuck past their time limit; not starting another")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()

        def deliver(outcome: tuple[bool, Any]) -> None:
            if not future.done():
                future.set_result(outcome)

        call = _hung.start()

        def run() -> None:
            try:
                outcome: tuple[bool, Any] = (True, self.function(ctx, action))
            except BaseException as exc:
                outcome = (False, exc)
            finally:
                _hung.finish(call)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(deliver, outcome)

        thread = threading.Thread(target=run, name=f"predelivery-hook:{ctx.queue_id}",
                                  daemon=True)
        try:
            thread.start()
        except BaseException:
            _hung.finish(call)
            raise
        try:
            ok, value = await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            _hung.abandon(call)
            action._close()
            raise HookError(
                f"predelivery hook {self.name} exceeded its time limit of {self.timeout:g}s "
                f"(its thread is abandoned; the decision is ignored)",
                _thread_stack(thread), timed_out=True,
            ) from None
        finally:
            if not future.done():
                _hung.abandon(call)  # cancelled from outside while the hook still runs
        if not ok:
            raise self._raised(value)
        if inspect.isawaitable(value):  # a sync callable that returned a coroutine
            return await self._run_async(value, action)
        return value

    def _raised(self, exc: BaseException) -> HookError:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None and _ours(tb.tb_frame.f_code.co_filename):
            tb = tb.tb_next  # start at the hook's own code
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        return HookError(f"predelivery hook {self.name} raised "
                         f"{type(exc).__name__}: {exc}", text)


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _ours(filename: str) -> bool:
    return filename in (__file__, threading.__file__, asyncio.tasks.__file__)


def _thread_stack(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return ""
    stack = traceback.extract_stack(frame)
    while len(stack) > 1 and _ours(stack[0].filename):  # start at the hook's own code
        del stack[0]
    return "Stack of the hung hook (most recent call last):\n" + "".join(
        traceback.format_list(stack)
    )


class _HungThreads:
    """Counts sync hook calls that timed out and whose thread has not returned yet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, bool] = {}  # call id -> abandoned
        self._next = 0

    def start(self) -> int:
        with self._lock:
            self._next += 1
            self._running[self._next] = False
            return self._next

    def finish(self, call: int) -> None:
        with self._lock:
            self._running.pop(call, None)

    def abandon(self, call: int) -> None:
        with self._lock:
            if call in self._running:
                self._running[call] = True

    def count(self) -> int:
        with self._lock:
            return sum(self._running.values())


_hung = _HungThreads()
