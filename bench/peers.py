"""Shared benchmark helpers: start and stop peers, drive smtp-source, account server CPU.

Every peer is a context manager yielding a `Peer`; leaving the block stops it, also on
exceptions and Ctrl-C. Processes started here get PR_SET_PDEATHSIG so that they die with the
benchmark even if it is killed outright (Postfix's master daemonizes, and is stopped with
`postfix stop` in a finally block instead).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import pty
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ferrymail.proxytier.haproxy import outbound_listen

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A peer failed to start or a run went wrong; the message says which and why."""


def binary(name: str) -> str:
    """Absolute path of an installed program (also looked up in /usr/sbin)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise BenchError(f"{name} is not installed")
    return path


_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=4096)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, and none of the last 4,096 this process handed
    out (the tests' `tests.realpeers.free_port` is this one).

    The port is free again once the probe socket closes, and the kernel picks a bind to port
    0 at a random offset, so two calls could return the same port (about 1 in 14,000 a
    pair: a few times a test-suite run): the second peer would then listen where the first
    was to bind (a sink on ferrymail's port, Redis on the metrics port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port
    raise RuntimeError(f"no fresh free port on {host} after 100 tries")


def wait_listening(host: str, port: int, timeout: float = 15.0,
                   alive: Callable[[], bool] | None = None, what: str = "peer") -> None:
    """Block until host:port accepts a connection; fail early if `alive()` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise BenchError(f"{what} exited before listening on {host}:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.02)
    raise BenchError(f"{what}: nothing listening on {host}:{port} after {timeout}s")


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the benchmark process goes away."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session, output to `log`; dies with the benchmark."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal `proc`, wait for it, kill it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --- CPU accounting -------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ")".
    return raw[raw.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is not None:
            children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(roots: list[int]) -> float:
    """utime+stime of every process in the trees under `roots`, plus what they reaped.

    A child that exits and is waited for moves its time into its parent's cutime/cstime, so
    summing all four over the live tree never loses nor double-counts a process.
    """
    ticks = 0
    for root in roots:
        for pid in process_tree(root):
            f = _stat_fields(pid)
            if f is not None:  # fields 14-17 of stat: utime stime cutime cstime
                ticks += sum(int(x) for x in f[11:15])
    return ticks / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


# --- smtp-source ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceRun:
    """One smtp-source run: how many messages, how long, and what it cost."""

    messages: int
    size: int
    sessions: int
    wall: float
    client_cpu: float

    @property
    def rate(self) -> float:
        return self.messages / self.wall if self.wall > 0 else float("inf")


def smtp_source_cmd(host: str, port: int, messages: int, size: int, sessions: int) -> list[str]:
    return [binary("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-d", "-f", "a@bench.test", "-t", "b@example.com", f"{host}:{port}"]


def run_smtp_source(host: str, port: int, messages: int, size: int, sessions: int = 20,
                    timeout: float = 60.0) -> SourceRun:
    """Send `messages` messages with smtp-source, timed by wall clock; raise if any failed.

    smtp-source aborts with a non-zero exit on any unexpected reply, so exit 0 means every
    message got its 250 after end of data.
    """
    cmd = smtp_source_cmd(host, port, messages, size, sessions)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"smtp-source to {host}:{port} ({messages} x {size} B) took longer "
                         f"than {timeout:.0f}s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        msg = (err or out).decode(errors="replace").strip()
        raise BenchError(f"smtp-source to {host}:{port} exited {proc.returncode}: {msg}")
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return SourceRun(messages, size, sessions, wall, client_cpu)


# --- peers ----------------------------------------------------------------------------------

@dataclass
class Peer:
    """A running SMTP server under test."""

    name: str
    host: str
    port: int
    pids: Callable[[], list[int]]  # roots of the process trees whose CPU counts as server CPU
    workdir: Path
    extra: dict[str, object] = field(default_factory=dict)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())


@contextlib.contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A temp directory on disk (not tmpfs: fsync must mean something), removed afterwards."""
    base = os.environ.get("BENCH_TMPDIR") or "/var/tmp"
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def smtp_sink(d: Path, host: str = "127.0.0.1", backlog: int = 1024) -> Iterator[Peer]:
    """Postfix's smtp-sink, discarding everything: the reference ceiling."""
    port = free_port(host)
    log = d / "smtp-sink.log"
    proc = spawn([binary("smtp-sink"), "-u", "nobody", f"{host}:{port}", str(backlog)], log)
    try:
        wait_listening(host, port, alive=lambda: proc.poll() is None, what="smtp-sink")
        yield Peer("smtp-sink", host, port, lambda: [proc.pid], d)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def aiosmtpd(d: Path, mode: str, host: str = "127.0.0.1") -> Iterator[Peer]:
    """bench/aiosmtpd_server.py in its own process; mode is "discard" or "fsync"."""
    port = free_port(host)
    log = d / f"aiosmtpd-{mode}.log"
    store = d / "messages.mbox"
    cmd = [sys.executable, str(Path(__file__).with_name("aiosmtpd_server.py")), "--mode", mode,
           "--host", host, "--port", str(port)]
    if mode == "fsync":
        cmd += ["--file", str(store)]
    proc = spawn(cmd, log)
    try:
        wait_listening(host, port, alive=lambda: proc.poll() is None, what=f"aiosmtpd {mode}")
        yield Peer(f"aiosmtpd-{mode}", host, port, lambda: [proc.pid], d, {"store": store})
    finally:
        stop_process(proc)
        if proc.returncode not in (0, -signal.SIGTERM):
            print(f"aiosmtpd {mode} exited {proc.returncode}:\n{tail(log)}", file=sys.stderr)


def haproxy_config(front_host: str, front_port: int, back_host: str, back_port: int) -> str:
    """TCP pass-through that prepends a PROXY v2 header to each connection."""
    return f"""global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend bench_in
    bind {front_host}:{front_port}
    maxconn 4096
    default_backend bench_smtp
backend bench_smtp
    server s {back_host}:{back_port} send-proxy-v2 maxconn 4096
"""


@contextlib.contextmanager
def haproxy(d: Path, back_host: str, back_port: int, host: str = "127.0.0.1") -> Iterator[Peer]:
    """HAProxy in the foreground, forwarding a free port to back_host:back_port with PROXY v2."""
    port = free_port(host)
    with _haproxy_process(d, haproxy_config(host, port, back_host, back_port), host,
                          port) as peer:
        yield peer


@contextlib.contextmanager
def _haproxy_process(d: Path, config: str, host: str, port: int,
                     name: str = "haproxy") -> Iterator[Peer]:
    """Check `config`, run HAProxy with it in the foreground until it listens on host:port."""
    cfg = d / f"{name}.cfg"
    cfg.write_text(config)
    check = subprocess.run([binary("haproxy"), "-c", "-f", str(cfg)], capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise BenchError(f"haproxy rejected its config:\n{check.stdout}{check.stderr}")
    log = d / f"{name}.log"
    proc = spawn([binary("haproxy"), "-db", "-f", str(cfg)], log)
    try:
        try:
            wait_listening(host, port, alive=lambda: proc.poll() is None, what="haproxy")
        except BenchError as e:
            raise BenchError(f"{e}\n{tail(log)}") from None
        yield Peer("haproxy", host, port, lambda: [proc.pid], d, {"log": log})
    finally:
        stop_process(proc, signal.SIGUSR1)


POSTFIX_SERVICES = """\
{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


def postfix_main_cf(d: Path, host: str) -> str:
    """main.cf of a private instance: accept for example.com, queue to disk, discard."""
    return f"""\
compatibility_level = 3.6
config_directory = {d}/etc
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
mydomain = bench
myorigin = $myhostname
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains = example.com
default_transport = discard
relay_transport = discard
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_rate_limit = 0
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_peername_lookup = no
in_flow_delay = 0s
default_process_limit = 100
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
biff = no
"""


@contextlib.contextmanager
def postfix(d: Path, host: str = "127.0.0.1", *, settings: dict[str, str] | None = None,
            services: str = "") -> Iterator[Peer]:
    """A private Postfix instance on a free port, its config and queue under `d`.

    smtpd hands each message to cleanup, which writes it to the queue file and fsyncs it
    before smtpd says 250; qmgr then gives it to the discard transport. `settings` replace or
    add main.cf parameters and `services` adds master.cf lines (e.g. `postfix_relay_settings`
    and `POSTFIX_SMTP_SERVICE` to relay instead of discarding).
    """
    if os.geteuid() != 0:
        raise BenchError("the Postfix peer must run as root (mail_owner = postfix)")
    postfix_bin = binary("postfix")
    port = free_port(host)
    etc = d / "etc"
    etc.mkdir()
    (d / "queue").mkdir()  # root-owned; `postfix check` makes its subdirectories and data/
    (etc / "main.cf").write_text(with_settings(postfix_main_cf(d, host), settings or {}))
    (etc / "master.cf").write_text(POSTFIX_SERVICES.format(port=port) + services)
    env = {**os.environ, "MAIL_CONFIG": str(etc)}

    def pf(*args: str, timeout: float = 60.0) -> tuple[int, str]:
        return run_on_tty([postfix_bin, "-c", str(etc), *args], env=env, timeout=timeout)

    rc, out = pf("check")
    if rc != 0 or "fatal" in out:
        raise BenchError(f"postfix -c {etc} check failed:\n{out}")
    pidfile = d / "queue" / "pid" / "master.pid"
    started = False
    try:
        rc, out = pf("start")
        started = True
        if rc != 0:
            raise BenchError(f"postfix start failed:\n{out}\n{tail(d / 'maillog')}")

        def master() -> list[int]:
            try:
                return [int(pidfile.read_text().split()[0])]
            except (OSError, ValueError, IndexError):
                return []

        wait_listening(host, port, timeout=30.0, what="postfix smtpd")
        yield Peer("postfix", host, port, master, d, {"maillog": d / "maillog", "etc": etc})
    finally:
        if started:
            pids = []
            with contextlib.suppress(OSError, ValueError, IndexError):
                pids = [int(pidfile.read_text().split()[0])]
            with contextlib.suppress(BenchError):
                pf("stop", timeout=30.0)
            _wait_gone(pids, 15.0)


def run_on_tty(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run `cmd` with stdout/stderr on a pseudo-terminal; return (exit code, output).

    Postfix commands write their errors to stderr only when it is a terminal (else to syslog,
    which a container may not have), so a pty is how to see why `postfix check` failed.
    """
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                env=env)
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise BenchError(f"{' '.join(cmd)} took longer than {timeout:.0f}s")
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: every writer closed the terminal
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        rc = proc.wait(max(0.1, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait for pids (not our children) to exit; SIGKILL whatever remains after `timeout`."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                for child in reversed(process_tree(pid)):
                    os.kill(child, signal.SIGKILL)


def postfix_queue_count(d: Path) -> int:
    """Queue files still under the instance's queue directory (all queues)."""
    q = d / "queue"
    return sum(len(files) for sub in ("incoming", "active", "deferred", "hold", "maildrop")
               for _, _, files in os.walk(q / sub))


@dataclass(frozen=True)
class FerrymailPorts:
    direct: int
    proxied: int


def ferrymail_startup_yaml(host: str, ports: FerrymailPorts, d: Path) -> str:
    return f"""\
environment:
  hostname: ferrymail.bench
  pidfile: {d}/ferrymail.pid
servers:
  - id: bench
    listeners:
      - {{ address: {host}, port: {ports.direct} }}
      - {{ address: {host}, port: {ports.proxied}, proxyprotocol: true }}
    limits: {{ message_size: 10MiB }}
spool: {{ path: {d}/spool, fsync: true }}
metrics: {{ listen: false }}
"""


def ferrymail_running_yaml(host: str, dead_port: int) -> str:
    """Accept for example.com from loopback and keep the mail: `queues.hold` starts no
    delivery, so the figures are reception alone. Should delivery run anyway, the transport
    points at a port where nothing listens (never the network), and the bench's spool check
    sees recipients leave the "queued" state and says so."""
    return f"""\
queues:
  hold: true
servers:
  - id: bench
    transport: mx
    domains: [example.com]
    relay_networks: [127.0.0.0/8]
transportgroups:
  - id: default
    connection: {{ server: {host}, port: {dead_port} }}
    transports:
      - id: mx
"""


@contextlib.contextmanager
def ferrymail(d: Path, host: str = "127.0.0.1",
              args: tuple[str, ...] = ("--workers", "1"),
              prefix: tuple[str, ...] = ()) -> Iterator[Peer]:
    """`ferrymail run` with a direct and a PROXY-protocol listener and an fsynced spool;
    `args` go on its command line (e.g. `("--workers", "2")`), `prefix` before it (e.g.
    `python -m cProfile -o FILE`: the ferrymail script then runs under it)."""
    exe = VENV_BIN / "ferrymail"
    if not exe.exists():
        raise BenchError(f"{exe} is missing: pip install -e . in the venv")
    ports = FerrymailPorts(free_port(host), free_port(host))
    spool = d / "spool"
    startup, running = d / "startup.yaml", d / "running.yaml"
    startup.write_text(ferrymail_startup_yaml(host, ports, d))
    running.write_text(ferrymail_running_yaml(host, free_port(host)))
    log = d / "ferrymail.log"
    proc = spawn([*prefix, str(exe), "run", "--startup", str(startup), "--running",
                  str(running), *args], log)
    try:
        for p in (ports.direct, ports.proxied):
            try:
                wait_listening(host, p, alive=lambda: proc.poll() is None, what="ferrymail")
            except BenchError as e:
                raise BenchError(f"{e}\n{tail(log)}") from None
        yield Peer("ferrymail", host, ports.direct, lambda: [proc.pid], d,
                   {"proxied_port": ports.proxied, "spool": spool, "log": log,
                    "startup": startup, "running": running})
    finally:
        stop_process(proc, timeout=20.0)


# --- outbound: a counting sink, the seed's outbound HAProxy, Postfix relaying, reloads ------

@contextlib.contextmanager
def dumping_sink(d: Path, host: str = "127.0.0.1", backlog: int = 1024) -> Iterator[Peer]:
    """smtp-sink that appends every message it accepts to one dump file and counts them (-c).

    The dump (smtp-sink's headers, among them X-Client-Addr, then the message) goes to tmpfs
    when there is one: nothing in it needs to be durable, and it should not compete with the
    spools' fsyncs for the disk. `sink_counter(peer)` reads the running count.
    """
    port = free_port(host)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else d
    dump_dir = Path(tempfile.mkdtemp(prefix="bench-sink-", dir=base))
    try:
        os.chmod(dump_dir, 0o777)  # smtp-sink writes as nobody
        dump = dump_dir / "dump"
        counter = d / "smtp-sink-counter.log"
        proc = spawn([binary("smtp-sink"), "-u", "nobody", "-c", "-D", str(dump),
                      f"{host}:{port}", str(backlog)], counter)
        try:
            wait_listening(host, port, alive=lambda: proc.poll() is None, what="smtp-sink")
            yield Peer("smtp-sink", host, port, lambda: [proc.pid], d,
                       {"dump": dump, "counter": counter})
        finally:
            stop_process(proc)
    finally:
        shutil.rmtree(dump_dir, ignore_errors=True)


def sink_counter(sink: Peer) -> int:
    """Messages a `dumping_sink` has received so far (the last complete `mesg=` counter)."""
    try:
        with open(Path(str(sink.extra["counter"])), "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - 512))
            data = f.read()
    except OSError:
        return 0
    found = re.findall(rb"mesg=(\d+)\r", data)
    return int(found[-1]) if found else 0


def seed_outbound_haproxy_config(bind_host: str, bind_port: int) -> str:
    """The seed's outbound `listen` section: PROXY header in, the connection to the next hop
    made transparently from the source address the header names (`usesrc clientip`)."""
    return f"""global
    log stderr format raw local0 info
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    retries 0
{outbound_listen(bind_host, bind_port)}"""


@contextlib.contextmanager
def outbound_haproxy(d: Path, host: str = "127.0.0.1") -> Iterator[Peer]:
    """HAProxy with the seed's outbound config on a free port (needs root: `usesrc`)."""
    if os.geteuid() != 0:
        raise BenchError("the outbound HAProxy (usesrc clientip) must run as root")
    port = free_port(host)
    with _haproxy_process(d, seed_outbound_haproxy_config(host, port), host, port,
                          name="haproxy-outbound") as peer:
        yield peer


POSTFIX_SMTP_SERVICE = "smtp unix - - n - - smtp\n"


def with_settings(main_cf: str, settings: dict[str, str]) -> str:
    """main.cf text with each of `settings` replaced where it is set, or else appended."""
    lines = main_cf.splitlines()
    left = dict(settings)
    for i, line in enumerate(lines):
        name = line.split("=", 1)[0].strip()
        if "=" in line and not line[:1].isspace() and name in left:
            lines[i] = f"{name} = {left.pop(name)}"
    lines += [f"{k} = {v}" for k, v in left.items()]
    return "\n".join(lines) + "\n"


def postfix_relay_settings(relay_host: str, relay_port: int, bind_address: str,
                           concurrency: int = 20, reuse: int = 100,
                           hold: bool = False) -> dict[str, str]:
    """main.cf parameters (for `postfix(settings=...)`, with `POSTFIX_SMTP_SERVICE`) that relay
    all mail to relay_host:relay_port from bind_address, `concurrency` sessions from the start
    (no slow start), a session reused for up to `reuse` messages.

    hold: every message accepted goes straight to the hold queue (cleanup puts it there; qmgr
    never sees it) until `postsuper -H` releases it.
    """
    s = {
        "default_transport": "smtp",
        "relay_transport": "smtp",
        "relayhost": f"[{relay_host}]:{relay_port}",
        "smtp_bind_address": bind_address,
        "smtp_tls_security_level": "none",
        "initial_destination_concurrency": str(concurrency),
        "default_destination_concurrency_limit": str(concurrency),
        "smtp_destination_concurrency_limit": str(concurrency),
        "smtp_connection_cache_on_demand": "yes",
        "smtp_connection_reuse_count_limit": str(reuse),
    }
    if hold:
        s["smtpd_data_restrictions"] = "check_client_access static:HOLD"
    return s


def postfix_command(pf: Peer, program: str, *args: str, timeout: float = 60.0) -> str:
    """Run a Postfix admin command (postsuper, postqueue, ...) against the instance `pf`."""
    etc = Path(str(pf.extra["etc"]))
    cmd = [binary(program), "-c", str(etc), *args]
    rc, out = run_on_tty(cmd, env={**os.environ, "MAIL_CONFIG": str(etc)}, timeout=timeout)
    if rc != 0:
        raise BenchError(f"{' '.join(cmd)} exited {rc}:\n{out.strip()}")
    return out


def postfix_queue_counts(d: Path) -> dict[str, int]:
    """Queue files per queue of the instance under `d`."""
    q = d / "queue"
    return {sub: sum(len(files) for _, _, files in os.walk(q / sub))
            for sub in ("maildrop", "incoming", "active", "deferred", "hold")}


def ferrymail_reload(fm: Peer, running_yaml: str, timeout: float = 10.0) -> None:
    """Make `running_yaml` the running config of `ferrymail(d)`: write the file, SIGHUP, and
    return once the process logged the reload (BenchError with its reason if it refused)."""
    log = Path(str(fm.extra["log"]))
    start = log.stat().st_size if log.exists() else 0
    Path(str(fm.extra["running"])).write_text(running_yaml)
    pids = fm.pids()
    if not pids:
        raise BenchError("ferrymail is not running")
    os.kill(pids[0], signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        with open(log, "rb") as f:
            f.seek(start)
            new = f.read().decode(errors="replace")
        if "event=config.reloaded" in new:
            return
        if "event=config.reload_failed" in new:
            why = [ln for ln in new.splitlines() if "config.reload_failed" in ln]
            raise BenchError("ferrymail refused its running config:\n" + "\n".join(why))
        if time.monotonic() > deadline:
            raise BenchError(f"ferrymail did not log a reload within {timeout:.0f}s\n"
                             f"{tail(log)}")
        time.sleep(0.02)


def spool_messages(spool: Path) -> int:
    """Messages in a ferrymail spool, read-only; fine while ferrymail runs (WAL)."""
    db = spool / "spool.db"
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise BenchError(f"cannot count the messages in {db}: {e}") from None


def replace_section(path: Path, heading: str, body: str) -> None:
    """(Re)write one `## ` section of a Markdown file, keeping every other section.

    A missing section is added at the end (a missing file starts as "# Benchmark results").
    """
    new = f"{heading}\n\n{body.rstrip()}\n\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    if start is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines += ["\n", new]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines[start:end] = [new]
    path.write_text(re.sub(r"\n{3,}", "\n\n", "".join(lines)).rstrip() + "\n")


def select_variants(variants: list, aliases: dict[str, list[str]], only: str | None) -> list:
    """The variants named in a comma-separated `--only` (aliases expand), in table order."""
    if not only:
        return variants
    wanted: list[str] = []
    for name in (s.strip() for s in only.split(",") if s.strip()):
        wanted += aliases.get(name, [name])
    known = {v.key for v in variants}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s): {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known | set(aliases)))}")
    return [v for v in variants if v.key in wanted]


def command_line(script: str, argv: list[str] | None) -> str:
    """How this run was started, for the results (interpreter path relative to the repo)."""
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(REPO)
    return shlex.join([str(exe), script, *(sys.argv[1:] if argv is None else argv)])
