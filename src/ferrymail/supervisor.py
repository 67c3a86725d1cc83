"""Worker processes: one ``ferrymail run``, N whole pipelines, each over its own spool shard.

The supervisor (the process ``ferrymail run --workers N`` starts as, N >= 2) holds the
pidfile, opens every listening socket once, and forks N workers. Each worker is an ordinary
``App`` (inbound servers, delivery, spool) that accepts on the shared sockets and stores into
and delivers from its own shard: worker 0 the spool directory itself (so one worker is
today's layout), worker k the subdirectory ``shard-k``. Queue ids are unique across shards
(shard k hands out ids equal to k modulo N, see ``QueueIdGenerator``).

- SIGHUP to the supervisor is forwarded to every worker; each re-reads the running file and
  logs ``config.reloaded`` (or ``config.reload_failed``) itself.
- SIGTERM/SIGINT stop every worker (each finishes as a single ``ferrymail run`` would), then
  the supervisor removes the pidfile.
- A worker that dies is started again on the same shard after a back-off (0.5 s, doubling up
  to 10 s while it keeps dying within 5 s of its start): the new worker opens the shard and
  delivers what its predecessor had acknowledged. A worker that fails before it served at
  the first start fails the whole command (bad spool, port in use): nothing is half up.
- Workers get SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``).

Sockets are opened before the fork, one per worker and listener, sharing the port through
SO_REUSEPORT (see ``listen_sockets``); the supervisor keeps them all open, so a restarted
worker takes up its socket with the connections that queued meanwhile.

Limits: without a ``cluster`` section the supervisor also runs the **limiter service**
(`ferrymail.orchestrator.hostservice`) as a child process of its own, started before the
workers and restarted like one when it dies (``limiter.exited``); every worker's
`ferrymail.orchestrator.host.HostLimiter` asks it, so policies and per-destination
connection caps hold for the host. It is a process, not a thread here: the supervisor forks
workers, and a fork copies a thread's locks but not the thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ferrymail import sdnotify
from ferrymail.config import StartupConfig
from ferrymail.config.models import StartupServer
from ferrymail.observe.log import flush as flush_log
from ferrymail.observe.log import log_event

SHARD_PREFIX = "shard-"
RESTART_MIN = 0.5  # seconds before restarting a dead worker, doubled while it keeps dying
RESTART_MAX = 10.0
STABLE_AFTER = 5.0  # a worker that lived this long resets the back-off
READY_TIMEOUT = 60.0  # first start: every worker must be serving within this


def shard_path(root: str | Path, index: int) -> Path:
    """The spool directory of worker ``index``: the spool itself for 0, ``shard-K`` below."""
    root = Path(root)
    return root if index == 0 else root / f"{SHARD_PREFIX}{index}"


def shard_paths(root: str | Path) -> list[Path]:
    """Every spool shard that exists under ``root`` (root first, then shard-1, shard-2, ...),
    whatever the current worker count: mail of a shard whose worker no longer runs is still
    listed."""
    root = Path(root)
    found = [root] if root.is_dir() else []
    if root.is_dir():
        extra = []
        for child in root.iterdir():
            suffix = child.name.removeprefix(SHARD_PREFIX)
            if child.name.startswith(SHARD_PREFIX) and suffix.isdigit() and child.is_dir():
                extra.append((int(suffix), child))
        found += [p for _, p in sorted(extra)]
    return found


def unserved_shards(root: str | Path, count: int) -> list[Path]:
    """Shards under ``root`` holding a spool that ``count`` workers leave alone (left by a
    larger worker count before): their mail is kept but not delivered until the count is
    raised again. A shard whose spool lock another process holds is served (by another run
    on this spool, which the start then refuses) and is not listed."""
    out = []
    for path in shard_paths(root)[1:]:
        index = int(path.name.removeprefix(SHARD_PREFIX))
        if index >= count and (path / "spool.db").exists() and not _locked(path):
            out.append(path)
    return out


def _locked(path: Path) -> bool:
    """Whether a process holds ``path``'s spool lock (`SqliteSpool` flocks its directory)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops a lock just taken
    return False


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_workers(option: int | None, configured: int | None, cpus: int
                   ) -> tuple[int, str]:
    """(worker count, why) for ``ferrymail run``: ``--workers``, else
    ``environment.workers``, else ``cpus`` (`default_workers`): limits stay exact across
    workers (the limiter service, or Redis with a ``cluster``), so every core is used."""
    if option is not None:
        return option, "--workers"
    if configured is not None:
        return configured, "environment.workers"
    return cpus, f"default: the CPUs this process may run on ({cpus})"


@dataclass
class WorkerSlot:
    """What a worker process needs from its supervisor."""

    index: int
    count: int
    spool_path: Path
    sockets: dict[str, list[socket.socket]]  # server id -> one socket per listener
    ready_fd: int | None = None
    hups: list[bool] = field(default_factory=list)  # SIGHUPs before the App's handler

    def catch_hup(self, sig: int, frame: object) -> None:
        self.hups.append(True)

    def ready(self) -> None:
        """Tell the supervisor this worker is serving (once)."""
        if self.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, b"r")
                os.close(self.ready_fd)
            self.ready_fd = None


def _bind(host: str | None, port: int, backlog: int, reuse_port: bool) -> socket.socket:
    """One listening socket as ``loop.create_server`` opens it (SO_REUSEADDR; no address:
    IPv6 and IPv4 on one socket where the system allows it)."""
    if host is None:
        family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
        return socket.create_server(("", port), family=family, backlog=backlog,
                                    reuse_port=reuse_port,
                                    dualstack_ipv6=family == socket.AF_INET6)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog,
                                reuse_port=reuse_port)


def check_spool_free(path: Path) -> None:
    """RuntimeError when another process holds the spool directory ``path`` (the spool's
    own flock, taken and dropped at once: the spool takes it for good when it opens); a
    directory that does not exist yet is free."""
    import fcntl

    if not path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise RuntimeError(f"spool directory {path} is in use by another process "
                           "(or spool)") from None
    finally:
        os.close(fd)


def listener_name(host: str | None, port: int) -> str:
    """``127.0.0.1:25``, ``[::1]:25``, ``*:25`` (no address: every address)."""
    return f"[{host}]:{port}" if host and ":" in host else f"{host or '*'}:{port}"


@contextlib.contextmanager
def _naming_listener(server_id: str, host: str | None, port: int) -> Iterator[None]:
    """Any OSError inside as ``server ID: cannot listen on ADDRESS: REASON``."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, f"server {server_id}: cannot listen on "
                      f"{listener_name(host, port)}: {exc.strerror}") from exc


def check_ports_free(servers: list[StartupServer]) -> None:
    """Bind each listener of ``servers`` once with a plain bind (no SO_REUSEPORT) and close
    it again: OSError ``server ID: cannot listen on ADDRESS: REASON`` for the first one
    taken. A single process proves its ports before binding any, since each bound listener
    logs ``smtp.listening``: a start refused at a later listener must not have said that an
    earlier one listened; the supervisor, before binding the workers' copies."""
    for server in servers:
        for lst in server.listeners:
            host = None if lst.address is None else str(lst.address)
            with _naming_listener(server.id, host, lst.port):
                _bind(host, lst.port, lst.backlog, reuse_port=False).close()


def listen_sockets(server: StartupServer, copies: int) -> list[list[socket.socket]]:
    """Per worker (``copies`` of them), one listening socket for each of ``server``'s
    listeners: ``result[worker][listener]``.

    The copies share the port through SO_REUSEPORT, so the kernel spreads new connections
    evenly over the workers (one shared socket let whichever worker woke first take them:
    77/23 splits measured, see docs/architecture.md). The supervisor keeps every copy open,
    so connections for a worker being restarted wait in its backlog rather than being
    refused. A plain bind first proves the port is free (`check_ports_free`): SO_REUSEPORT
    alone would let a second ferrymail of the same user share it silently. OSError names
    the listener."""
    check_ports_free([server])
    out: list[list[socket.socket]] = [[] for _ in range(copies)]
    try:
        for lst in server.listeners:
            host = None if lst.address is None else str(lst.address)
            with _naming_listener(server.id, host, lst.port):
                for k in range(copies):
                    sock = _bind(host, lst.port, lst.backlog, reuse_port=True)
                    sock.setblocking(False)
                    out[k].append(sock)
    except BaseException:
        for group in out:
            for sock in group:
                sock.close()
        raise
    return out


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Worker:
    index: int
    pid: int = 0
    started: float = 0.0
    backoff: float = RESTART_MIN
    restart_at: float | None = None
    ready_r: int | None = None
    exits: int = 0


def host_limiter_wanted(startup: StartupConfig, count: int) -> bool:
    """Workers share limits through the limiter service: N >= 2 and no Redis ``cluster``."""
    return count > 1 and startup.cluster is None


def run_limiter_service(startup: StartupConfig, ready_fd: int) -> int:
    """The limiter service's process body (forked by the supervisor): serve until SIGTERM."""
    import uvloop

    from ferrymail import privileges
    from ferrymail.observe import log
    from ferrymail.orchestrator.hostservice import serve

    log.set_context(worker="limiter")
    env = startup.environment
    if env.user is not None:
        creds = privileges.resolve(env.user, env.group)
        privileges.prepare_spool_dir(startup.spool.path, creds)
        privileges.drop_privileges(creds)

    def ready() -> None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"r")
            os.close(ready_fd)

    uvloop.run(serve(startup.spool.path, ready))
    return 0


@dataclass
class Supervisor:
    """Start, watch, restart and stop ``count`` workers. ``run_worker(slot)`` is what a worker
    process runs (returns its exit status); it is called in the forked child.
    ``run_service(ready_fd)``, when given, is the limiter service's body (index -1 in the
    logs' ``limiter.*`` lines), started before the workers."""

    startup: StartupConfig
    count: int
    run_worker: Callable[[WorkerSlot], int]
    run_service: Callable[[int], int] | None = None
    workers: list[_Worker] = field(default_factory=list)
    service: _Worker | None = None
    _signals: list[int] = field(default_factory=list)
    _sockets: dict[str, list[list[socket.socket]]] = field(default_factory=dict)
    _stopping: bool = False  # set by _stop_all: an exit is then expected, nothing restarts

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0, or 1 if the first start failed."""
        from ferrymail.app import claim_pidfile, remove_pidfile

        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD,
                    signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        pidfile = Path(self.startup.environment.pidfile)
        try:
            claim_pidfile(pidfile)
        except (OSError, RuntimeError) as exc:
            log_event("app.start_failed", "error", error=f"{type(exc).__name__}: {exc}")
            return 1
        try:
            try:
                self._check_shards_free()
                for server in self.startup.servers:
                    self._sockets[server.id] = listen_sockets(server, self.count)
            except (OSError, RuntimeError) as exc:
                log_event("app.start_failed", "error", error=f"{type(exc).__name__}: {exc}")
                return 1
            if self.run_service is not None:
                self.service = _Worker(-1)
                self._spawn_service(self.service)
                if not self._wait_service():
                    self._stop_all()
                    return 1
            self.workers = [_Worker(i) for i in range(self.count)]
            for w in self.workers:
                self._spawn(w)
            if not self._wait_ready():
                self._stop_all()
                # asked to stop while starting (e.g. as soon as a first worker logged that it
                # serves): a clean stop, not a failed start
                stopping = any(s in (signal.SIGTERM, signal.SIGINT) for s in self._signals)
                return 0 if stopping else 1
            log_event("supervisor.started", workers=self.count, pid=os.getpid(),
                      spool=str(self.startup.spool.path))
            sdnotify.ready(f"running with {self.count} workers")
            return self._serve()
        finally:
            for copies in self._sockets.values():
                for group in copies:
                    for sock in group:
                        sock.close()
            remove_pidfile(pidfile)

    # -- signals: recorded by the handler, acted on by the loop

    def _on_signal(self, sig: int, frame: object) -> None:
        self._signals.append(sig)

    def _serve(self) -> int:
        while True:
            while self._signals:
                sig = self._signals.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT):
                    log_event("app.stopping", signal=signal.Signals(sig).name)
                    sdnotify.stopping()
                    self._stop_all()
                    log_event("supervisor.stopped", pid=os.getpid())
                    return 0
                if sig == signal.SIGUSR1:  # logrotate: every process reopens its log file
                    from ferrymail.observe import log

                    log.reopen()
                    for w in [*self.workers, *([self.service] if self.service else [])]:
                        if w.pid:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(w.pid, signal.SIGUSR1)
                if sig == signal.SIGHUP:
                    live = [w for w in self.workers if w.pid]
                    log_event("supervisor.reload", workers=len(live))
                    for w in live:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w.pid, signal.SIGHUP)
            self._reap()
            now = time.monotonic()
            for w in self.workers:
                if not w.pid and w.restart_at is not None and now >= w.restart_at:
                    self._spawn(w)
            s = self.service
            if s is not None and not s.pid and s.restart_at is not None and now >= s.restart_at:
                self._spawn_service(s)
            time.sleep(0.05)

    def _reap(self) -> list[_Worker]:
        """Collect exited workers; schedule each one's restart. Returns those that exited."""
        gone = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if self.service is not None and pid == self.service.pid:
                # workers answer from their split fallback meanwhile
                self._exited(self.service, status, "limiter.exited")
                continue
            w = next((w for w in self.workers if w.pid == pid), None)
            if w is None:
                continue
            self._exited(w, status, "worker.exited", worker=w.index)
            gone.append(w)
        return gone

    def _spawn(self, w: _Worker) -> None:
        r, wfd = os.pipe()
        mine = {sid: copies[w.index] for sid, copies in self._sockets.items()}
        slot = WorkerSlot(w.index, self.count, shard_path(self.startup.spool.path, w.index),
                          mine, wfd)
        slot.spool_path.mkdir(parents=True, exist_ok=True)
        close = [r, *(o.ready_r for o in [*self.workers, *([self.service] if self.service else [])]
                      if o.ready_r is not None)]
        # a reload sent while this worker starts is done once it serves (App.run), neither
        # lost nor (the default action) fatal
        pid = self._fork(lambda: self.run_worker(slot), close, "worker.failed",
                         hup=slot.catch_hup, worker=w.index)
        os.close(wfd)
        if w.ready_r is not None:
            os.close(w.ready_r)
        w.pid, w.started, w.restart_at, w.ready_r = pid, time.monotonic(), None, r
        log_event("worker.started", worker=w.index, pid=pid, spool=str(slot.spool_path))

    def _fork(self, body: Callable[[], int], close: list[int], failed: str,
              hup: Callable[[int, object], None] | int = signal.SIG_DFL,
              **fields: object) -> int:
        """Fork a child (a worker or the limiter service) that runs ``body`` and exits with
        its status (never returns into the supervisor's loop); ``close``: descriptors the
        child must not keep; ``failed``: the event logged (with ``fields``) if ``body``
        raises; ``hup``: the child's SIGHUP disposition until its own handler."""
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            for fd in close:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, hup)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the child's own handler
            os.environ.pop("NOTIFY_SOCKET", None)
            _die_with_parent()
            code = body()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                log_event(failed, "error", **fields, error=f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                flush_log()  # lines batched in the last loop iteration (os._exit skips atexit)
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _spawn_service(self, s: _Worker) -> None:
        assert self.run_service is not None
        run_service = self.run_service
        r, wfd = os.pipe()
        # the service must not hold the listening sockets (a restarted one would keep
        # ports open after the supervisor closed them) nor the workers' ready pipes
        close = [r, *(sock.fileno() for copies in self._sockets.values()
                      for group in copies for sock in group),
                 *(w.ready_r for w in self.workers if w.ready_r is not None)]
        pid = self._fork(lambda: run_service(wfd), close, "limiter.failed")
        os.close(wfd)
        if s.ready_r is not None:
            os.close(s.ready_r)
        s.pid, s.started, s.restart_at, s.ready_r = pid, time.monotonic(), None, r
        log_event("limiter.spawned", pid=pid)

    def _wait_service(self) -> bool:
        """The first start: wait until the service listens (False if it exited first)."""
        s = self.service
        assert s is not None and s.ready_r is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            os.set_blocking(s.ready_r, False)
            with contextlib.suppress(BlockingIOError):
                if os.read(s.ready_r, 1):
                    return True
            self._reap()
            if s.exits:
                log_event("app.start_failed", "error", error="the limiter service exited "
                          "before it served")
                return False
            time.sleep(0.02)
        log_event("app.start_failed", "error", error="the limiter service is not serving")
        return False

    def _exited(self, child: _Worker, status: int, event: str, **fields: object) -> None:
        """Bookkeeping for a child (worker or limiter service) that exited with ``status``:
        its restart back-off (doubled while it keeps dying within STABLE_AFTER), one
        ``event`` line (a warning with the restart delay, or info while stopping)."""
        lived = time.monotonic() - child.started
        child.backoff = (RESTART_MIN if lived >= STABLE_AFTER
                         else min(child.backoff * 2, RESTART_MAX))
        child.restart_at = time.monotonic() + child.backoff
        child.exits += 1
        how = (f"signal {signal.Signals(-os.waitstatus_to_exitcode(status)).name}"
               if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}")
        if self._stopping:
            child.restart_at = None
            log_event(event, **fields, pid=child.pid, status=how, lived=f"{lived:.1f}s",
                      why="stopping")
        else:
            log_event(event, "warning", **fields, pid=child.pid, status=how,
                      lived=f"{lived:.1f}s", restart_in=f"{child.backoff:g}s")
        child.pid = 0

    def _wait_ready(self) -> bool:
        """Wait until every worker reported ready; False if one exited first or timed out."""
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = {w.index for w in self.workers}
        while waiting:
            for w in self.workers:
                if w.index in waiting and w.ready_r is not None:
                    os.set_blocking(w.ready_r, False)
                    with contextlib.suppress(BlockingIOError):
                        if os.read(w.ready_r, 1):
                            waiting.discard(w.index)
            if any(w.exits for w in self._reap() if w.index in waiting):
                log_event("app.start_failed", "error",
                          error="a worker exited before it served; stopping the others")
                return False
            if any(s in (signal.SIGTERM, signal.SIGINT) for s in self._signals):
                return False
            if time.monotonic() > deadline:
                log_event("app.start_failed", "error",
                          error=f"workers {sorted(waiting)} not serving after "
                                f"{READY_TIMEOUT:g}s")
                return False
            time.sleep(0.02)
        return True

    def _check_shards_free(self) -> None:
        """A clear error before any fork when another process holds one of our shards."""
        for i in range(self.count):
            check_spool_free(shard_path(self.startup.spool.path, i))

    def _stop_all(self, grace: float = 30.0) -> None:
        """SIGTERM every live worker; SIGKILL what still runs after ``grace`` seconds."""
        self._stopping = True
        for w in self.workers:
            w.restart_at = None
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGTERM)
        self._stop_procs(self.workers, grace)
        if self.service is not None:  # last: workers stopping still release their leases
            self.service.restart_at = None
            if self.service.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.service.pid, signal.SIGTERM)
            self._stop_procs([self.service], grace)

    def _stop_procs(self, procs: list[_Worker], grace: float) -> None:
        deadline = time.monotonic() + grace
        while any(w.pid for w in procs):
            self._reap()
            if time.monotonic() > deadline:
                for w in procs:
                    if w.pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w.pid, signal.SIGKILL)
                deadline = time.monotonic() + grace
            time.sleep(0.02)
        for w in procs:
            w.restart_at = None


def per_worker(startup: StartupConfig, index: int) -> StartupConfig:
    """Worker ``index``'s view of the startup config: its own admin socket and admin/metrics
    TCP ports (``config.operations.worker_socket_path`` / ``for_worker``); worker 0 keeps
    the configured ones. Worker K binds its metrics port only with ``metrics.worker_listen``:
    worker 0 serves the host's metrics (observe/hostmetrics.py)."""
    if index == 0:
        return startup
    from ferrymail.config.operations import admin_socket_path, for_worker, worker_socket_path

    path = admin_socket_path(startup.admin, startup.environment.pidfile)
    admin = startup.admin.model_copy(update={
        "socket": False if path is None else worker_socket_path(path, index),
        "listen": for_worker(startup.admin.listen, index)})
    metrics = startup.metrics.model_copy(update={
        "listen": for_worker(startup.metrics.listen, index)})
    return startup.model_copy(update={"admin": admin, "metrics": metrics})


def share_inbound_limits(startup: StartupConfig, count: int) -> StartupConfig:
    """Each worker's share of every server's ``limits.connections`` and
    ``limits.connections_per_client``: ⌈limit / count⌉ (0, unlimited, stays 0), so that N
    workers accept at most about the configured number on the host, never N times it. The
    kernel spreads connections over the workers (SO_REUSEPORT hashes each connection), so
    one client's connections may land unevenly: a client can be refused a little before its
    host-wide count reaches the limit, never much after it."""
    if count <= 1:
        return startup
    servers = []
    for srv in startup.servers:
        lim = srv.limits
        share = lim.model_copy(update={
            "connections": math.ceil(lim.connections / count),
            "connections_per_client": math.ceil(lim.connections_per_client / count)})
        servers.append(srv.model_copy(update={"limits": share}))
    return startup.model_copy(update={"servers": tuple(servers)})


def run_workers(startup_file: str | None, running_file: str | None, startup: StartupConfig,
                count: int) -> int:
    """``ferrymail run`` with ``count`` (>= 2) worker processes; the exit status."""

    def run_worker(slot: WorkerSlot) -> int:
        import uvloop

        from ferrymail.app import App
        from ferrymail.config import ConfigError, cross_check, load_running
        from ferrymail.observe import log

        # The startup configuration is the supervisor's (its sockets were opened for it: a
        # startup file edited since then is not read); the running file as it is now.
        log.set_context(worker=slot.index)
        name = running_file or "<embedded running.yaml>"
        try:
            running = load_running(running_file)
            cross_check(startup, running, name)
        except ConfigError as exc:
            for err in exc.errors:
                log_event("worker.config_failed", "error", file=err.file, line=err.line,
                          key=err.path, error=err.message)
            return 2
        mine = per_worker(share_inbound_limits(startup, slot.count), slot.index)
        app = App(mine, running, startup_file=startup_file, running_file=running_file,
                  worker=slot)
        try:
            uvloop.run(app.run())
        except KeyboardInterrupt:
            return 0
        except Exception as exc:
            log_event("app.start_failed", "error", worker=slot.index,
                      error=f"{type(exc).__name__}: {exc}")
            return 1
        return 0

    service = None
    if host_limiter_wanted(startup, count):
        def service(ready_fd: int) -> int:
            return run_limiter_service(startup, ready_fd)
    return Supervisor(startup, count, run_worker, service).run()
