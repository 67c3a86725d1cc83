"""The application: everything built from the startup and running configuration.

``App`` owns the spool, the inbound SMTP servers and any further components (the outbound
delivery engine plugs in as one), starts them in order, stops them in order, and swaps the
running configuration on reload. ``run()`` adds the process side: pidfile and signals.

A component is anything with ``name``, ``async start()`` and ``async stop()``; it reads the
current running configuration through ``app.running`` whenever it needs it (the attribute is
replaced as a whole on reload, never mutated) and may register ``app.on_reload(callback)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ferrymail import privileges, sdnotify
from ferrymail.abnf import is_digits
from ferrymail.admin.queue import QueueService
from ferrymail.admin.server import AdminServer
from ferrymail.config import (
    ConfigError,
    RunningConfig,
    StartupConfig,
    cross_check,
    load_running,
    load_startup,
)
from ferrymail.config.models import DEFAULT_TRUSTED_PROXIES
from ferrymail.delivery.engine import DeliveryEngine
from ferrymail.delivery.health import health_store_for
from ferrymail.delivery.loops import OwnListeners
from ferrymail.delivery.scheduler import DESTINATIONS_FILE
from ferrymail.observe import log
from ferrymail.observe.log import log_event
from ferrymail.observe.metrics import CountingSpool, MetricsServer
from ferrymail.observe.metrics import set_enabled as metrics_set_enabled
from ferrymail.observe.metrics import stats as metrics_stats
from ferrymail.orchestrator.limiter import STATUS_FILE, Limiter
from ferrymail.orchestrator.local import LocalLimiter
from ferrymail.smtp.server import SMTPServer
from ferrymail.spool import SqliteSpool

if TYPE_CHECKING:
    from ferrymail.supervisor import WorkerSlot

DEFAULT_GRACE = 5.0


def make_limiter(startup: StartupConfig, worker: WorkerSlot | None = None) -> Limiter:
    """The shaping limiter: cluster-wide through Redis with a ``cluster`` section; else, in
    one of N >= 2 workers, host-wide through the supervisor's limiter service
    (`ferrymail.orchestrator.host`); else in-process (suspensions in the spool directory).

    A worker process (supervisor.py) is a cluster member of its own: its instance id is the
    configured (or default) one plus ``/wK``, and it writes the cluster state file in its
    shard; suspensions stay in the spool directory itself, shared by all workers."""
    if startup.cluster is None:
        if worker is not None and worker.count > 1:
            from ferrymail.orchestrator.host import STATUS_FILE as HOST_STATUS
            from ferrymail.orchestrator.host import HostLimiter
            from ferrymail.orchestrator.hostservice import socket_path

            return HostLimiter(socket_path(startup.spool.path), startup.spool.path,
                               workers=worker.count, worker=worker.index,
                               status_file=worker.spool_path / HOST_STATUS)
        return LocalLimiter.for_spool(startup.spool.path)
    from ferrymail.orchestrator.redis import RedisLimiter

    cfg, status_dir = startup.cluster, Path(startup.spool.path)
    if worker is not None:
        base = cfg.instance or default_instance(startup)
        cfg = cfg.model_copy(update={"instance": f"{base}/w{worker.index}"})
        status_dir = worker.spool_path
    return RedisLimiter(cfg, default_instance=default_instance(startup),
                        status_file=status_dir / STATUS_FILE)


def default_instance(startup: StartupConfig) -> str:
    """Host name + listener ports: unique per instance on one host."""
    ports = sorted({str(lst.port) for s in startup.servers for lst in s.listeners})
    return "-".join([startup.environment.hostname, *ports])


class Component(Protocol):
    """Something the App starts after the spool and stops before closing it."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _InboundServer:
    """Adapts an SMTPServer to the Component interface (stop with the App's grace period)."""

    def __init__(self, server: SMTPServer, grace: float) -> None:
        self.server = server
        self.name = f"smtp:{server.id}"
        self.grace = grace

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(self.grace)


class App:
    """Spool + inbound servers + further components, with a swappable running config."""

    def __init__(self, startup: StartupConfig, running: RunningConfig, *,
                 startup_file: str | None = None, running_file: str | None = None,
                 grace: float = DEFAULT_GRACE, worker: WorkerSlot | None = None) -> None:
        self.startup = startup
        self.running = running
        self.startup_file = startup_file
        self.running_file = running_file
        self.grace = grace
        # one of several worker processes (supervisor.py): its own spool shard, the
        # supervisor's listening sockets, no pidfile of its own
        self.worker = worker
        self.spool = SqliteSpool(
            startup.spool.path if worker is None else worker.spool_path,
            fsync=startup.spool.fsync, min_free=startup.spool.min_free,
            shard=(0, 1) if worker is None else (worker.index, worker.count))
        # Outbound: reads self.running at each attempt; servers wake it when they store mail.
        self.delivery = DeliveryEngine(
            self.spool, lambda: self.running, hostname=startup.environment.hostname,
            hook_base_dir=Path(running_file).resolve().parent if running_file else None,
            own_listeners=OwnListeners.of((lst.address, lst.port) for s in startup.servers
                                          for lst in s.listeners),
            state_path=self.spool.path / DESTINATIONS_FILE,  # a worker: in its shard
            limiter=make_limiter(startup, worker),
            health_store=health_store_for(startup))
        metrics_set_enabled(startup.metrics.listen is not None)
        inbound_spool = self.delivery.notifying(self.spool)
        if startup.metrics.listen is not None:
            inbound_spool = CountingSpool(inbound_spool)  # type: ignore[assignment]
        self.servers: list[SMTPServer] = [
            SMTPServer(cfg, hostname=startup.hostname_for(cfg.id), spool=inbound_spool,
                       running=lambda: self.running,
                       sockets=worker.sockets[cfg.id] if worker is not None else None)
            for cfg in startup.servers
        ]
        # Started in this order after the spool, stopped in this order before it closes:
        # inbound first (stop taking mail), then whatever was added (e.g. delivery).
        self.components: list[Component] = [_InboundServer(s, grace) for s in self.servers]
        self.components.append(self.delivery)
        # Operations: the admin API (routes: admin.routes.add) and the queue commands over it.
        self.last_reload: dict[str, object] | None = None
        self.admin = AdminServer(self)
        self.queue = QueueService(self)
        self.queue.register(self.admin.routes)
        self.components.append(self.admin)
        self.metrics = MetricsServer(self)
        self.components.append(self.metrics)
        self.admin.routes.add("GET", "/v1/stats", self._stats)
        self.admin.routes.add("GET", "/v1/proxies", self._proxies)
        self.ready = False  # all components started and not stopping (metrics /ready)
        self._reload_callbacks: list[Callable[[RunningConfig], None]] = [
            self.delivery.config_changed]
        self._started: list[Component] = []
        self._stop_requested: asyncio.Event | None = None

    @classmethod
    def from_files(cls, startup_file: str | None = None, running_file: str | None = None,
                   **kwargs: float | WorkerSlot | None) -> App:
        """Load and cross-check both files (None: embedded defaults); raises ConfigError."""
        startup = load_startup(startup_file)
        running = load_running(running_file)
        cross_check(startup, running, running_file or "<embedded running.yaml>")
        return cls(startup, running, startup_file=startup_file, running_file=running_file,
                   **kwargs)  # type: ignore[arg-type]

    # -- composition

    def add_component(self, component: Component) -> None:
        """Add a component (e.g. the outbound delivery engine); call before ``start()``."""
        self.components.append(component)

    def on_reload(self, callback: Callable[[RunningConfig], None]) -> None:
        """Call ``callback(new_running)`` after each successful reload."""
        self._reload_callbacks.append(callback)

    # -- lifecycle

    async def start(self) -> None:
        """Bind the admin API, then the listeners (one process: the spool and every port
        proven free first, so no ``smtp.listening`` precedes a start refused for them), drop
        privileges (``environment.user``), open the spool, then start every component; on
        failure undo what was started."""
        for key, name in hostname_problems(self.startup):
            log_event("config.hostname", "warning", key=key, hostname=name,
                      error=f"{name!r} is not a fully qualified domain name: the banner, "
                            "HELO and Message-IDs will say it, and many receivers refuse "
                            "such mail; set environment.hostname")
        env = self.startup.environment
        creds = None if env.user is None else privileges.resolve(env.user, env.group)
        try:
            if self.worker is None:  # (a worker's supervisor checked both before it)
                from ferrymail.supervisor import check_ports_free, check_spool_free

                check_spool_free(self.spool.path)
                check_ports_free(list(self.startup.servers))
            # the admin socket first (its folder, the pidfile's, may be writable by root
            # only): a refusal there must not follow the listeners' smtp.listening lines
            await self.admin.bind(None if creds is None else (creds.uid, creds.gid))
            for srv in self.servers:
                await srv.bind()
            if creds is not None:
                privileges.prepare_spool_dir(self.startup.spool.path, creds)
                if self.spool.path != Path(self.startup.spool.path):  # a worker's shard
                    privileges.prepare_spool_dir(self.spool.path, creds)
                privileges.drop_privileges(creds)
            await self.spool.start()
        except BaseException:
            for srv in self.servers:
                await srv.stop(0)
            await self.admin.stop()
            raise
        try:
            for component in self.components:
                await component.start()
                self._started.append(component)
        except BaseException:
            await self.stop()
            raise
        self.ready = True
        log_event("app.started", servers=",".join(s.id for s in self.servers),
                  listeners=",".join(f"{h}:{p}" for s in self.servers for h, p in s.listeners),
                  spool=str(self.spool.path), pid=os.getpid())

    async def stop(self) -> None:
        """Stop components in start order, then close the spool."""
        self.ready = False
        started, self._started = self._started, []
        for component in started:
            try:
                await component.stop()
            except Exception as exc:
                log_event("app.stop_failed", "error", component=component.name,
                          error=f"{type(exc).__name__}: {exc}")
        await self.spool.close()

    def reload(self) -> bool:
        """Re-read the running file; on any error keep the current config and log why."""
        return not self.reload_verdict()

    def reload_verdict(self) -> list[dict[str, object]]:
        """Reload and return the errors (``file``, ``line``, ``key``, ``message``, ``detail``:
        the ``FILE:LINE: KEYPATH: MESSAGE`` line); [] when the new config is in force."""
        name = self.running_file or "<embedded running.yaml>"
        sdnotify.reloading()
        try:
            new = load_running(self.running_file)
            cross_check(self.startup, new, name)
        except ConfigError as exc:
            errors: list[dict[str, object]] = []
            for err in exc.errors:
                log_event("config.reload_failed", "error", file=err.file, line=err.line,
                          key=err.path, error=err.message, detail=str(err))
                errors.append({"file": err.file, "line": err.line, "key": err.path,
                               "message": err.message, "detail": str(err)})
            self.last_reload = {"at": time.time(), "ok": False, "errors": errors}
            sdnotify.ready(f"reload refused: {errors[0]['detail'] if errors else '?'}")
            return errors
        self.set_running(new)
        self.last_reload = {"at": time.time(), "ok": True, "file": name}
        log_event("config.reloaded", file=name)
        sdnotify.ready("running; configuration reloaded")
        return []

    def set_running(self, running: RunningConfig) -> None:
        """Swap the running configuration (sessions see it at their next RCPT)."""
        self.running = running
        for callback in self._reload_callbacks:
            try:
                callback(running)
            except Exception as exc:
                log_event("config.reload_callback_failed", "error",
                          error=f"{type(exc).__name__}: {exc}")

    def request_stop(self) -> None:
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def run(self) -> None:
        """Start, write the pidfile, serve until SIGTERM/SIGINT (SIGHUP reloads), stop."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_log_loop_exception)
        self._stop_requested = asyncio.Event()
        pidfile = Path(self.startup.environment.pidfile)
        if self.worker is None:  # a worker's supervisor holds the pidfile
            claim_pidfile(pidfile)
        # Handlers go in before the listeners open: a SIGHUP's default action would kill us.
        # A reload asked for while starting is done once everything has started.
        # (a worker also counts the SIGHUPs that came between its fork and this point)
        hup_during_start: list[bool] = self.worker.hups if self.worker is not None else []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, hup_during_start.append, True)
        try:
            await self.start()
        except BaseException:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            remove_pidfile(pidfile)
            raise
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        loop.add_signal_handler(signal.SIGUSR1, self._on_usr1)
        if self.worker is not None:
            self.worker.ready()  # the supervisor tells systemd once every worker is
        else:
            sdnotify.ready("running")
        if hup_during_start:
            self.reload()
        try:
            await self._stop_requested.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            sdnotify.stopping()
            await self.stop()
            remove_pidfile(pidfile)
            log_event("app.stopped", pid=os.getpid())

    async def _stats(self, req: object) -> dict[str, object]:
        return metrics_stats(self)

    async def _proxies(self, req: object) -> dict[str, object]:
        """``GET /v1/proxies``: this instance's proxy and (proxy, source) health entries
        (``delivery/health.py``; states as ``ferrymail proxy status`` shows them)."""
        book = self.delivery.rotation.health
        return {"entries": [dataclasses.asdict(e) for e in book.entries(time.time())]}

    def _on_stop_signal(self, sig: int) -> None:
        log_event("app.stopping", signal=signal.Signals(sig).name)
        self.request_stop()

    def _on_hup(self) -> None:
        self.reload()

    def _on_usr1(self) -> None:
        """SIGUSR1: reopen the log file (after logrotate moved it)."""
        log.reopen()
        log_event("log.reopened")


def is_fqdn(name: str) -> bool:
    """A name with at least two labels that is neither ``localhost…`` nor ``….localdomain``
    nor an IP literal (RFC 5321 §4.1.1.1 asks for the FQDN in HELO)."""
    name = name.rstrip(".").lower()
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return False
    labels = name.split(".")
    return len(labels) >= 2 and labels[0] != "localhost" and labels[-1] != "localdomain"


def hostname_problems(startup: StartupConfig) -> list[tuple[str, str]]:
    """``(key path, name)`` of every host name we would announce that is not an FQDN."""
    out: list[tuple[str, str]] = []
    for i, server in enumerate(startup.servers):
        if server.hostname is not None and not is_fqdn(server.hostname):
            out.append((f"servers[{i}].hostname", server.hostname))
    env = startup.environment.hostname
    if not is_fqdn(env) and (not startup.servers
                             or any(s.hostname is None for s in startup.servers)):
        out.append(("environment.hostname", env))
    return out


def startup_warnings(startup: StartupConfig, file: str) -> list[str]:
    """``FILE:LINE: KEYPATH: warning: MESSAGE`` lines for ``config check``: what loads but
    is probably not meant (a proxied listener trusting the default proxies, a host name
    that is no FQDN)."""
    lines = startup._lines
    out: list[str] = []

    def where(path: tuple[str | int, ...]) -> str:
        for n in range(len(path), -1, -1):
            if path[:n] in lines:
                return f"{file}:{lines[path[:n]]}"
        return file

    for i, server in enumerate(startup.servers):
        if "trusted_proxies" in server.model_fields_set:
            continue
        for j, lst in enumerate(server.listeners):
            if lst.proxyprotocol:
                path = ("servers", i, "listeners", j, "proxyprotocol")
                out.append(
                    f"{where(path)}: servers[{i}].listeners[{j}].proxyprotocol: warning: "
                    f"server {server.id!r} has no trusted_proxies, so only the default "
                    f"({', '.join(DEFAULT_TRUSTED_PROXIES)}) may send PROXY headers; list "
                    "your proxies in servers[].trusted_proxies")
                break
    for key, name in hostname_problems(startup):
        path = tuple(int(p) if is_digits(p) else p
                     for p in key.replace("[", ".").replace("]", "").split("."))
        out.append(f"{where(path)}: {key}: warning: {name!r} is not a fully qualified domain "
                   "name (banner, HELO and Message-IDs say it; many receivers refuse it)")
    return out


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Unhandled errors in callbacks and tasks: one log line instead of a traceback dump."""
    exc = context.get("exception")
    where = exc.__traceback__ if exc is not None else None
    while where is not None and where.tb_next is not None:
        where = where.tb_next
    log_event(
        "app.unhandled", "error", message=context.get("message"),
        error=f"{type(exc).__name__}: {exc}" if exc is not None else None,
        at=(f"{where.tb_frame.f_code.co_filename}:{where.tb_lineno}" if where else None),
    )


def claim_pidfile(pidfile: Path) -> None:
    """Write our pid to ``pidfile``; RuntimeError if another live ferrymail holds it."""
    other = running_pid(pidfile)
    if other is not None:
        raise RuntimeError(f"ferrymail is already running (pid {other} in {pidfile})")
    try:
        write_pidfile(pidfile)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write pidfile {pidfile}: {exc.strerror}") from exc


def write_pidfile(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pidfile(path: Path) -> None:
    """Remove the pidfile if it is still ours."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


def running_pid(path: Path) -> int | None:
    """The pid in ``path`` if that process is alive (and not us), else None."""
    try:
        pid = read_pidfile(path)
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def read_pidfile(path: Path) -> int:
    """The pid in ``path``; OSError/ValueError when missing or not a pid."""
    text = path.read_text().strip()
    pid = int(text)
    if pid <= 0:
        raise ValueError(f"{path}: {text!r} is not a process id")
    return pid
