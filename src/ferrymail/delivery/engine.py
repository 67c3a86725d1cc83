"""The outbound delivery engine: spool -> scheduler -> hook -> routing -> MX -> SMTP -> results.

One `Job` (the due recipients of one message for one destination) is one attempt:

1. the running config is read through the accessor (a reload applies to the next attempt);
2. the pre-delivery hook, if configured, decides: try (with overrides), queue, bounce, delete;
3. the copy to send is DKIM-signed (``ferrymail.dkim``: the hook's ``dkim_sign`` keys, else
   ``dkim.rules``, else the From: domain's keys); the spooled message stays unsigned;
4. sources come from the transport (or the hook) with their HELO and proxy; MX hosts from DNS
   (or the fixed ``connection.server``), tried in preference order, address by address;
   a failing proxy or source is marked down and the next source is tried for the same MX
   address, a failing MX moves on to the next address;
5. the per-recipient outcome is: delivered (2xx), failed (5xx or a permanent error: a DSN
   goes to the sender), or deferred (4xx or a temporary error) at the next retry time; a
   recipient past ``retry.count`` / ``retry.during`` fails with a DSN.

Ordering (nothing lost): a DSN is stored in the spool before the recipient it reports on is
marked failed, so a crash in between can only repeat the DSN, never lose it. Recipient
results are durable (`Spool.update`) before the job ends and the queue id is released.

Hook "queue" and a hook error count as one attempt each (the retry count and age limit still
apply, so a hook that always queues cannot keep a message forever); ``delay`` replaces the
schedule's interval for that one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ferrymail.config.models import Connection, ResolvedTransport, Retry, RunningConfig
from ferrymail.delivery import dsn as dsnlib
from ferrymail.delivery.connect import ProxyRoute, Source, Timeouts
from ferrymail.delivery.errors import DeliveryError, SMTPReplyError
from ferrymail.delivery.health import (
    CheckTarget,
    HealthBook,
    HealthChecker,
    HealthEntry,
    HealthStore,
    LocalHealthStore,
    classify,
    log_transition,
)
from ferrymail.delivery.ipparse import ip_version
from ferrymail.delivery.loops import LOOP_STATUS, OwnListeners, hop_limit_error
from ferrymail.delivery.mx import MXHost, Resolver
from ferrymail.delivery.pool import ConnectionPool, PoolKey
from ferrymail.delivery.routing import (
    HookSource,
    SourcePlan,
    SourceRotation,
    check_targets,
    sources_from_hook,
    transport_sources,
)
from ferrymail.delivery.scheduler import Destination, Job, Scheduler, plan_retry
from ferrymail.dkim import DkimError, DkimSigner, PrefixedBody
from ferrymail.hooks import HookContext, HookDecision, HookError, PredeliveryHook
from ferrymail.observe import metrics
from ferrymail.observe.log import log_event
from ferrymail.orchestrator.limiter import Denied, Lease, Limiter
from ferrymail.orchestrator.local import LocalLimiter
from ferrymail.orchestrator.policy import Attempt, Limit, limits_for_domains
from ferrymail.smtp.client import Prepare, SMTPClient, TLSContextFactory, TLSMode
from ferrymail.smtp.protocol import Reply
from ferrymail.spool import (
    BodyWriter,
    Envelope,
    MessageNotFound,
    RecipientRecord,
    RecipientState,
    RecipientUpdate,
    Spool,
    SpooledBody,
    SpoolError,
)

SLOT_WAIT = 10.0  # longest in-memory wait for a shaping slot before parking in the spool
RESERVE_AHEAD = 1.0  # a rate slot may be reserved this far ahead (then waited for)
LATE_SEND, MAX_LATE = 0.025, 5  # a rate slot reached this late is given up (at most 5 times)
OWN_SESSION_WAIT = 1.0  # longest a refused job waits for a session of its own source
PARK_AFTER = 2.0  # a parked job's next look when no time is known (a concurrency slot)
PARK_MAX = 30.0  # ... and at the latest (a suspension may be removed before it ends)
MAX_MX_ADDRESSES = 10  # MX addresses tried in one attempt (Postfix's smtp_mx_address_limit: 5)
STOP_GRACE = 10.0
PROXY_WAIT_MAX = 10.0  # longest a job waits for an actively checked proxy to come back

# Enhanced status for permanent failures that carry no SMTP reply.
_LOCAL_STATUS = {
    "nxdomain": "5.1.2",
    "nullmx": "5.1.10",
    "nodata": "5.1.2",
    "ipfamily": "5.4.4",
    "config": "5.3.5",
    "protocol": "5.3.4",
    "tls": "5.7.10",
    "loop": LOOP_STATUS,
}


# -- what an attempt produced ------------------------------------------------------------------


@dataclass
class Route:
    """Where the attempt went (for the log and the DSN's Remote-MTA)."""

    source: Source | None = None
    mx: str = ""
    mx_ip: str = ""
    local_ip: str | None = None
    tls: bool = False
    tls_fallback: bool = False  # the TLS handshake failed: this is the plaintext retry
    waited: float = 0.0  # seconds spent waiting for shaping slots (orchestrator)
    wait_reason: str = ""
    wait_kind: str = ""  # the Denied kind of the last wait (concurrency, rate, ...)


@dataclass
class Waiting:
    """No shaping slot within SLOT_WAIT: the job goes back to the spool, no attempt counted."""

    denied: Denied


@dataclass
class Outcome:
    """Either per-recipient replies, or one error/decision for all recipients of the job."""

    replies: dict[str, Reply] = field(default_factory=dict)
    error: DeliveryError | None = None
    hook: HookDecision | None = None  # a queue/bounce/delete decision
    hook_error: HookError | None = None
    route: Route = field(default_factory=Route)
    waiting: Denied | None = None  # parked for a shaping limit: not an attempt
    dkim: str | None = None  # the signatures the sent copy carried: d/s/algorithm, ...


@dataclass
class _Result:
    """One recipient's fate after the attempt."""

    record: RecipientRecord
    state: RecipientState
    last_reply: str
    next_attempt: float
    notified: int | None = None
    dsn: dsnlib.RecipientStatus | None = None  # a failed or delayed report to send
    counted: bool = True  # False: parked by a shaping limit, the attempt count stays


class _Signing:
    """DKIM-signs the content of one attempt as it goes on the wire (``SMTPClient.send``
    calls ``sign`` after any 7-bit conversion, so the signature covers what is sent)."""

    def __init__(self, signer: DkimSigner, job: Job,
                 requested: tuple[tuple[str, str], ...]) -> None:
        self.signer = signer
        self.job = job
        self.requested = requested
        self.labels: str | None = None  # what the last copy sent carried, for the log

    async def sign(self, data: bytes | SpooledBody) -> bytes | SpooledBody:
        env = self.job.message.envelope
        sign = functools.partial(self.signer.sign, data, sender=env.sender,
                                 server_id=env.server_id, requested=self.requested or None)
        try:
            # a spooled body is read from its file to be hashed: not on the event loop
            sigs = await asyncio.to_thread(sign) if isinstance(data, SpooledBody) else sign()
        except DkimError as e:
            log_event("dkim.error", "warning", qid=self.job.queue_id, error=str(e),
                      effect="sent unsigned")
            self.labels = None
            return data
        self.labels = ",".join(s.label for s in sigs) or None
        if not sigs:
            return data
        prefix = b"".join(s.header for s in sigs)
        return PrefixedBody(prefix, data) if isinstance(data, SpooledBody) else prefix + data


class _NotifyingSpool:
    """A spool whose `store` also wakes the engine: what the SMTP server is given."""

    def __init__(self, spool: Spool, on_stored: Callable[[str], None]) -> None:
        self._spool = spool
        self._on_stored = on_stored

    async def store(self, envelope: Envelope, data: bytes | BodyWriter,
                    queue_id: str | None = None) -> str:
        qid = await self._spool.store(envelope, data, queue_id)
        self._on_stored(qid)
        return qid

    def __getattr__(self, name: str) -> object:
        return getattr(self._spool, name)


class DeliveryEngine:
    """Delivers what the spool holds; an App component (``start``/``stop``)."""

    name = "delivery"

    def __init__(
        self,
        spool: Spool,
        running: Callable[[], RunningConfig],
        *,
        hostname: str,
        hook_base_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        tls_context_factory: TLSContextFactory | None = None,
        stop_grace: float = STOP_GRACE,
        enabled: bool = True,
        health_store: HealthStore | None = None,
        own_listeners: OwnListeners | None = None,
        state_path: Path | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.spool = spool
        self.enabled = enabled  # False: mail is only kept (e.g. to measure reception alone)
        self.running = running
        self.hostname = hostname
        self.hook_base_dir = hook_base_dir
        self.clock = clock
        self.tls_context_factory = tls_context_factory
        self.stop_grace = stop_grace
        # Our own listening addresses: an MX that is one of them is a loop (see loops.py).
        self.own_listeners = own_listeners or OwnListeners()
        self.scheduler = Scheduler(spool, running, self.run_job, clock=clock,
                                   defer_job=self.defer_job, state_path=state_path)
        self.pool = ConnectionPool(on_closed=self._closed)
        # Shaping (orchestrator): in-process unless the App passes a cluster-wide one.
        self.limiter: Limiter = limiter if limiter is not None else LocalLimiter()
        self._leases: dict[int, Lease] = {}  # id(client) -> the slots its connection holds
        self._session_keys: dict[int, PoolKey] = {}  # id(client) -> its pool key, while open
        self.connections_opened = 0  # new SMTP sessions (for benchmarks and tests)
        if getattr(self.limiter, "host_wide", False):
            self.scheduler.share = int(getattr(self.limiter, "workers", 1))
        self.health_store: HealthStore = health_store or LocalHealthStore()
        self.rotation = SourceRotation(HealthBook(running().proxyhealth,
                                                  on_transition=self._health_changed))
        self.checker = HealthChecker(self.rotation.health, self._check_targets, clock=clock)
        self._targets: tuple[RunningConfig | None, list[CheckTarget]] = (None, [])
        self._resolver: Resolver | None = None
        self._resolver_key: object = None
        self._hook: PredeliveryHook | None = None
        self._hook_error: str | None = None  # set when the configured hook could not load
        self._hook_cfg: RunningConfig | None = None
        self._signer: DkimSigner | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._proxy_up: asyncio.Event | None = None  # set (and replaced) when a proxy is up

    # -- lifecycle

    async def start(self) -> None:
        """Load the hook (ValueError if it cannot be), then start delivering."""
        if not self.enabled:
            log_event("delivery.disabled", reason="outbound delivery is switched off; "
                      "mail stays in the spool")
            return
        cfg = self.running()
        spec = cfg.scripting.hooks.predelivery
        if spec is not None:
            self._hook = PredeliveryHook.load(
                spec, timeout=cfg.scripting.hooks.timeout, base_dir=self.hook_base_dir)
        self._hook_cfg = cfg
        await self.limiter.start()
        await self.health_store.start(self._health_remote)
        self.checker.start()
        self.pool.start()
        self.scheduler.start()
        log_event("delivery.started", hostname=self.hostname,
                  predelivery=spec, concurrency=cfg.queues.concurrency,
                  total_concurrency=cfg.queues.total_concurrency)

    async def stop(self) -> None:
        await self.scheduler.stop(self.stop_grace)
        await self.checker.stop()
        await self.pool.close()
        await self.limiter.stop()
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)
        await self.health_store.close()

    def wake(self, queue_id: str | None = None) -> None:
        """Mail was stored: look at the spool now. Not while ``queues.hold`` keeps all mail
        queued: the scheduler would only go back to sleep, once per event-loop iteration
        that stored mail (about 2 % of the loop's time in held reception); the reload that
        lifts the hold wakes it (`config_changed`)."""
        if not self.running().queues.hold:
            self.scheduler.wake()

    def notifying(self, spool: Spool) -> Spool:
        """``spool`` with a `store` that wakes this engine (give it to the SMTP servers)."""
        return _NotifyingSpool(spool, self.wake)  # type: ignore[return-value]

    def config_changed(self, cfg: RunningConfig) -> None:
        """Reload hook: load the pre-delivery hook again (a broken one keeps the old)."""
        self._refresh_hook(cfg)
        self.rotation.health.policy = cfg.proxyhealth
        self.scheduler.wake()  # e.g. queues.hold was lifted

    # -- proxy health

    def _health_changed(self, entry: HealthEntry) -> None:
        log_transition(entry)
        self._notify_up(entry)
        task = asyncio.get_running_loop().create_task(self.health_store.publish(entry))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _health_remote(self, entry: HealthEntry) -> None:
        if self.rotation.health.apply(entry):
            log_transition(entry)
            self._notify_up(entry)

    def _proxy_at_fault(self, outcome: Outcome) -> bool:
        """Whether a failed attempt is the proxy tier's doing: a proxy failure (refused,
        EOF before banner), or a session through a proxy that broke while that proxy is
        suspended or being found out (e.g. it died under the session)."""
        err, src = outcome.error, outcome.route.source
        if err is None or src is None or src.proxy is None:
            return False
        if err.kind == "proxy":
            return True
        return err.kind == "network" and self.rotation.health.blocked(src, self.clock())

    def _notify_up(self, entry: HealthEntry) -> None:
        if entry.state == "up" and self._proxy_up is not None:
            self._proxy_up.set()  # waiters hold this one; later ones get a fresh event
            self._proxy_up = asyncio.Event()

    async def _wait_for_proxy(self, job: Job, sources: list[Source]) -> None:
        """When every source is blocked by a proxy that has active checks (active/passive:
        the one proxy is down, e.g. during a VRRP failover), wait for a proxy to come back
        (up to one check interval + timeout, at most PROXY_WAIT_MAX) instead of failing a
        connection per message; then try anyway. Without checks nothing would lift the
        suspension early, so there is no wait: the message itself probes."""
        health, now = self.rotation.health, self.clock()
        if not sources or not all(health.blocked(s, now, job) for s in sources):
            return
        checks = {str(t.proxy): t.check for t in self._check_targets()}
        waits = []
        for src in sources:
            check = checks.get(str(src.proxy)) if src.proxy is not None else None
            if check is None:
                return
            waits.append(check.interval + check.timeout)
        if self._proxy_up is None:
            self._proxy_up = asyncio.Event()
        event, bound = self._proxy_up, min(max(waits), PROXY_WAIT_MAX)
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), bound)
        log_event("delivery.proxy_wait", "debug", qid=job.queue_id,
                  proxies=",".join(sorted({str(s.proxy) for s in sources})),
                  waited_ms=int((time.monotonic() - started) * 1000), lifted=event.is_set())

    def _check_targets(self) -> list[CheckTarget]:
        cfg = self.running()
        if self._targets[0] is not cfg:
            self._targets = (cfg, check_targets(cfg, self.hostname))
        return self._targets[1]

    # -- helpers over the current config

    def _refresh_hook(self, cfg: RunningConfig) -> None:
        if cfg is self._hook_cfg:
            return
        self._hook_cfg = cfg
        spec = cfg.scripting.hooks.predelivery
        if spec is None:
            self._hook, self._hook_error = None, None
            return
        try:
            self._hook = PredeliveryHook.load(
                spec, timeout=cfg.scripting.hooks.timeout, base_dir=self.hook_base_dir)
            self._hook_error = None
            log_event("hook.loaded", hook=spec)
        except ValueError as e:
            kept = self._hook.name if self._hook is not None else None
            if kept is None:
                self._hook_error = str(e)
            log_event("hook.error", "error", hook=spec, error=str(e), kept=kept,
                      effect="kept the previous hook" if kept else "deliveries are deferred")

    def _resolver_for(self, cfg: RunningConfig) -> Resolver:
        r = cfg.resolver
        key = (r.nameservers, r.port, r.timeout, r.cache_size)
        if self._resolver is None or key != self._resolver_key:
            self._resolver = Resolver([str(n) for n in r.nameservers], port=r.port,
                                      timeout=r.timeout, cache_size=r.cache_size)
            self._resolver_key = key
        return self._resolver

    # -- one attempt

    async def run_job(self, job: Job) -> float | None:
        """Make one attempt for ``job`` and record every recipient's result in the spool.

        Returns the earliest next attempt time of a recipient it deferred (None if none).
        """
        cfg = self.running()
        self._refresh_hook(cfg)
        started = time.monotonic()
        now = self.clock()
        msg = job.message
        transport: ResolvedTransport | None
        try:
            transport = cfg.transport(job.destination.transport)
        except KeyError:
            transport = None
        data: bytes | SpooledBody | None = None
        if transport is None:
            what = (f"transport {job.destination.transport!r} is not in the running config"
                    if job.destination.transport
                    else f"server {msg.envelope.server_id!r} is not in the running config, "
                    "so no transport can be chosen")
            outcome = Outcome(error=DeliveryError("config", what))
        else:
            decided = await self._decide_and_deliver(job, cfg, transport)
            if decided is None:
                return None  # the message is gone from the spool
            outcome, data = decided
        # The connection is back in the pool: let the next job use the slot while the results
        # are recorded (the queue id stays in flight until they are durable).
        self.scheduler.feedback(job, *destination_feedback(outcome, self._proxy_at_fault))
        self.scheduler.release(job)
        return await self._record(job, cfg, transport, outcome, data, now, started)

    async def defer_job(self, job: Job, reason: str, wait: float) -> float | None:
        """Defer ``job`` without connecting (its destination is dead): one attempt recorded
        as a temporary failure, retried no sooner than ``wait`` seconds (the next probe)."""
        cfg = self.running()
        now = self.clock()
        try:
            transport: ResolvedTransport | None = cfg.transport(job.destination.transport)
        except KeyError:
            transport = None
        outcome = Outcome(error=DeliveryError("network", reason))
        return await self._record(job, cfg, transport, outcome, None, now, time.monotonic(),
                                  not_before=now + wait)

    async def _decide_and_deliver(self, job: Job, cfg: RunningConfig,
                                  transport: ResolvedTransport
                                  ) -> tuple[Outcome, bytes | None] | None:
        msg = job.message
        env = msg.envelope
        decision: HookDecision | None = None
        if self._hook_error is not None:
            return Outcome(error=DeliveryError(
                "config", f"the pre-delivery hook could not be loaded: {self._hook_error}")), None
        if self._hook is not None:
            ctx = HookContext(
                queue_id=msg.queue_id, sender=env.sender,
                recipients=tuple(r.address for r in job.recipients),
                transport=transport.id, retry=min(r.attempts for r in job.recipients),
                server_id=env.server_id, client_ip=env.client_ip, helo=env.helo,
                size=env.size, received_at=env.received_at, metadata={},
                auth=env.auth or "",
            )
            try:
                decision = await self._hook(ctx)
            except HookError as e:
                log_event("hook.error", "error", qid=msg.queue_id, hook=self._hook.name,
                          error=str(e), traceback=e.traceback or None)
                return Outcome(hook_error=e), None
            if decision.action != "try":
                return Outcome(hook=decision), None
        try:
            data = await self.spool.read(msg.queue_id)
        except MessageNotFound:
            log_event("delivery.gone", "warning", qid=msg.queue_id,
                      reason="message no longer in the spool")
            return None
        except SpoolError as e:
            return Outcome(error=DeliveryError("config", f"cannot read the message: {e}")), None
        signing = self._signing(job, cfg, decision)
        if isinstance(signing, Outcome):
            return signing, data
        outcome = await self._deliver(job, cfg, transport, decision, data,
                                      prepare=signing.sign if signing else None)
        outcome.dkim = signing.labels if signing else None
        return outcome, data

    def _signing(self, job: Job, cfg: RunningConfig, decision: HookDecision | None
                 ) -> _Signing | Outcome | None:
        """DKIM signing for this attempt (None: nothing to sign with); an Outcome (deferral)
        when the hook asked for a key we do not have."""
        requested = decision.dkim if decision is not None else ()
        if not cfg.dkim.keys and not requested:
            return None
        for domain, selector in requested:
            if cfg.dkim.key(domain, selector) is None:
                return Outcome(error=DeliveryError(
                    "config", f"dkim_sign({domain!r}, {selector!r}): no such key in dkim.keys"))
        signer = self._signer
        if signer is None or signer.config is not cfg.dkim:
            signer = self._signer = DkimSigner(cfg.dkim)
        return _Signing(signer, job, requested)

    async def _deliver(self, job: Job, cfg: RunningConfig, transport: ResolvedTransport,
                       decision: HookDecision | None, data: bytes | SpooledBody, *,
                       prepare: Prepare | None = None) -> Outcome:
        # (a spooled body: its first MiB holds the header section, and any loop's trace)
        looping = hop_limit_error(data.head(1 << 20) if isinstance(data, SpooledBody)
                                  else data, cfg.hop_limit)
        if looping is not None:
            return Outcome(error=DeliveryError("loop", looping, temporary=False))
        if isinstance(data, SpooledBody):
            # 8-bit or not (for BODY=8BITMIME) means reading it all: in a thread, once
            try:
                await asyncio.get_running_loop().run_in_executor(None, data.isascii)
            except OSError as e:
                return Outcome(error=DeliveryError("config", f"cannot read the message: {e}"))
        conn = transport.connection
        d = decision or HookDecision("try")
        port = d.port or conn.port
        server = d.server or conn.server
        tls = TLSMode(d.tls or conn.tls.mode)
        t = conn.timeout
        timeouts = Timeouts(connect=d.timeout or t.connect, banner=t.banner, command=t.command,
                            data=t.data, min_rate=t.min_rate, min_rate_grace=t.min_rate_grace)
        try:
            plan = self._source_plan(cfg, transport, d)
        except DeliveryError as e:
            return Outcome(error=e)
        families = [f for f, v in (("ipv4", 4), ("ipv6", 6)) if plan.for_family(v)]
        if not families:
            why = "; ".join(plan.problems) or (
                f"transport {transport.id!r} has no usable source address family")
            return Outcome(error=DeliveryError("config", why))
        try:
            hosts = await self._destinations(cfg, server, job.domain, families)
        except DeliveryError as e:
            return Outcome(error=e)
        if server is None:  # MX rollup: later mail for it shares the MX set's queue
            self.scheduler.learn_mx(job.domain, [h.name for h in hosts])
        hosts, looping_error = self._better_than_self(job, hosts, port)
        if looping_error is not None:
            return Outcome(error=looping_error)

        recipients = [r.address for r in job.recipients]
        last: DeliveryError | None = None
        route = Route()
        tried = 0
        for host in hosts:
            for ip in host.addresses:
                if tried >= MAX_MX_ADDRESSES:
                    break
                tried += 1
                version = ip_version(ip)
                family_sources = plan.for_family(version)
                sources = self.rotation.order((transport.id, version, family_sources),
                                              family_sources, self.clock(), plan.rotate)
                if not sources:
                    continue
                route = Route(mx=host.name, mx_ip=ip)
                result = await self._try_address(job, host, ip, port, tls, timeouts, sources,
                                                 recipients, data, conn, route, cfg,
                                                 prepare=prepare)
                if isinstance(result, Outcome):
                    return result
                if isinstance(result, Waiting):
                    return Outcome(waiting=result.denied, route=route)
                last = result  # this MX address failed or refused: on to the next
        if last is None:
            last = DeliveryError("config", f"no source address can reach any MX address of "
                                 f"{job.destination.name} ({', '.join(families)} only)")
        if isinstance(last, SMTPReplyError):
            out = Outcome(route=route)
            out.replies = {a: last.reply for a in recipients}
            return out
        return Outcome(error=last, route=route)

    def _better_than_self(self, job: Job, hosts: list[MXHost], port: int
                          ) -> tuple[list[MXHost], DeliveryError | None]:
        """Drop MX hosts that are not better than ourselves (RFC 5321 §5.1, as Postfix).

        When an MX address and port is one of our own listeners, only hosts with a strictly
        lower preference may be tried: the others would hand the message back to us, or to
        a backup that returns it. None left: a permanent loop error (5.4.6).
        """
        own: tuple[MXHost, str, str] | None = None
        for host in hosts:
            if own is not None and host.preference >= own[0].preference:
                continue
            for ip in host.addresses:
                mine = self.own_listeners.match(ip, port)
                if mine is not None:
                    own = (host, ip, mine)
                    break
        if own is None:
            return hosts, None
        host, ip, mine = own
        better = [h for h in hosts if h.preference < host.preference]
        log_event("delivery.loop", "warning", qid=job.queue_id, mx=host.name, mx_ip=ip,
                  port=port, listener=mine, preference=host.preference,
                  then=f"{len(better)} better MX host(s)" if better else "fail (5.4.6)")
        if better:
            return better, None
        return [], DeliveryError(
            "loop", f"mail for {job.destination.name} loops back to myself: {host.name} "
            f"[{ip}]:{port} is this instance's listener {mine}", temporary=False)

    def _source_plan(self, cfg: RunningConfig, transport: ResolvedTransport,
                     d: HookDecision) -> SourcePlan:
        if d.sourceip is None and d.proxyprotocol is None and not d.no_proxy:
            plan = transport_sources(transport, self.hostname)
            if not d.sourceip_random:
                plan = SourcePlan(plan.ipv4, plan.ipv6, plan.problems, rotate=False)
            return plan
        proxy = d.proxyprotocol
        return sources_from_hook(
            None if d.sourceip is None else [HookSource(s.address, s.helo) for s in d.sourceip],
            proxy=None if proxy is None else ProxyRoute(proxy.server, proxy.port, proxy.version),
            no_proxy=d.no_proxy, transport=transport, cfg=cfg, hostname=self.hostname,
            rotate=d.sourceip_random,
        )

    async def _destinations(self, cfg: RunningConfig, server: str | None, domain: str,
                            families: Sequence[str]) -> list[MXHost]:
        resolver = self._resolver_for(cfg)
        if server is None:
            return await resolver.mx(domain, families=families)
        addresses = await resolver.addresses(server, families)
        if not addresses:
            raise DeliveryError("dns", f"next hop {server} has no {'/'.join(families)} address",
                                dns="nodata")
        return [MXHost(server, 0, addresses)]

    async def _try_address(
        self, job: Job, host: MXHost, ip: str, port: int, tls: TLSMode, timeouts: Timeouts,
        sources: list[Source], recipients: list[str], data: bytes | SpooledBody,
        conn: Connection, route: Route, cfg: RunningConfig, *,
        prepare: Prepare | None = None,
    ) -> Outcome | DeliveryError | Waiting:
        """Deliver via one MX address, trying sources in turn; an Outcome when a transaction
        ran, else the error that ended the tries on this address, or `Waiting` when shaping
        limits refused every source for SLOT_WAIT seconds.

        Shaping (orchestrator): a new connection needs `Limiter.connect` (concurrency lease,
        connection interval, suspensions) for its source, a full source is skipped for the
        next; each message needs `Limiter.message` (rates). When every source is refused the
        job waits here, without an attempt counted, until a slot may be free."""
        msg = job.message
        env = msg.envelope
        waited_since = time.monotonic()
        deadline = waited_since + SLOT_WAIT
        health = self.rotation.health
        await self._wait_for_proxy(job, sources)
        waited_for: Denied | None = None  # the refusal this job last waited on, if any
        own_limits: tuple[Limit, ...] = ()  # the limits of this message's own source
        # The recipient domains the policies see: the destination's, or over a fixed next hop
        # (smarthost) those of this job's recipients (the message counts against each).
        domains = ((job.destination.domain,) if job.destination.domain
                   else recipient_domains(recipients))
        while True:
            last: DeliveryError | None = None
            refused: Denied | None = None
            pooled: tuple[Source, SMTPClient] | None = None
            # The message's source is sources[0] (chosen per message); only ITS sessions are
            # reused, so connection reuse does not pin a stream to one source IP.
            client, dead = self.pool.take_or_dead(PoolKey(sources[0], ip, port, tls.value))
            if client is not None:
                pooled = (sources[0], client)
            if dead:  # its proxy may have gone: this job reconnects, others go elsewhere
                health.suspect(sources[0], self.clock(), job)
            for n, src in enumerate(sources):
                route.source = src
                client = None
                reused = False
                attempt = Attempt(src.address or "", ip, host.name.lower().rstrip("."),
                                  domains[0] if domains else "", job.destination.transport,
                                  str(src.proxy) if src.proxy else "direct")
                limits = limits_for_domains(cfg, attempt, domains)
                if getattr(self.limiter, "host_wide", False):
                    limits = (*limits, *host_limits(job.destination, cfg))
                if n == 0:
                    own_limits = limits
                if pooled is not None and pooled[0] == src:
                    client, reused = pooled[1], True
                    pooled = None
                elif (n > 0 and refused is not None and refused.kind == "concurrency"
                      and not self.pool.has_idle(
                          lambda c, key=refused.key: key in self._lease_keys(c))):
                    # The message's own source is full, held by others (no idle session of
                    # ours to close for it): an idle session of this alternative carries it
                    # (it holds a slot other instances wait for; left idle it would starve
                    # them until its idle time ran out).
                    client = self.pool.take(PoolKey(src, ip, port, tls.value))
                    reused = client is not None
                if client is not None and not self._lease_covers(client, limits):
                    # Its lease counts other concurrency keys (a smarthost session opened for
                    # another recipient domain): parked again, this message opens its own.
                    # (No waiter is woken for it: one that could use it was woken when it
                    # was parked first.)
                    self.pool.put(PoolKey(src, ip, port, tls.value), client,
                                  idle=conn.reuse.idle, max_messages=conn.reuse.messages,
                                  wake=False)
                    client, reused = None, False
                for _ in range(2):  # a reused session the peer dropped gets one fresh one
                    if client is None:
                        if (src.proxy is not None and n + 1 < len(sources)
                                and health.blocked(src, self.clock(), job)):
                            break  # its proxy is down, or another job is finding out
                        slot = await self._connect_slot(attempt, limits)
                        if isinstance(slot, Denied):
                            refused = _sooner(refused, slot)
                            break  # this source is full: try the next one
                        try:
                            client = await SMTPClient.connect(
                                src, ip, port, mx_host=host.name, tls=tls, timeouts=timeouts,
                                tls_context_factory=self.tls_context_factory)
                        except SMTPReplyError as e:
                            self.limiter.release(slot)
                            self._log_connect_failure(job, src, host, ip, e, "next MX address")
                            await self._suspend_on(limits, e.reply)
                            return e
                        except DeliveryError as e:
                            self.limiter.release(slot)
                            last = e
                            failure = classify(e) if src.proxy is not None else None
                            if failure is not None:
                                health.failure(src, failure, e.message, self.clock())
                                self._log_connect_failure(job, src, host, ip, e, "next source",
                                                          failure_class=failure)
                                break
                            if e.kind == "config" or (e.kind == "network" and src.proxy):
                                # config: this source cannot be used (bind, family); network
                                # via a proxy: the session broke during setup (e.g. the proxy
                                # died under it), another source may carry the message now
                                self._log_connect_failure(job, src, host, ip, e, "next source")
                                break
                            self._log_connect_failure(job, src, host, ip, e, "next MX address")
                            return e
                        except BaseException:
                            self.limiter.release(slot)
                            raise
                        finally:
                            health.resolved(src, job)
                        self._leases[id(client)] = slot
                        self._opened(client, PoolKey(src, ip, port, tls.value))
                        if any(lim.connectinterval is not None for lim in limits):
                            # the intervals count from the connection, not the grant
                            await self.limiter.connected(
                                limits, time.monotonic() - client.opened_at)
                        if src.proxy is not None:
                            health.success(src, self.clock())
                    denied = await self._message_slot(attempt, limits, client, deadline, route)
                    if denied is not None:
                        if denied.kind == "lost":
                            self._drop(client)
                            client, reused = None, False
                            continue
                        self.pool.put(PoolKey(src, ip, port, tls.value), client,
                                      idle=conn.reuse.idle, max_messages=conn.reuse.messages)
                        refused = _sooner(refused, denied)
                        client = None
                        break
                    route.local_ip = client.local_ip
                    route.tls = client.tls_started
                    route.tls_fallback = client.tls_fallback
                    wait_on = refused or waited_for
                    if wait_on is not None:
                        route.waited = time.monotonic() - waited_since
                        route.wait_reason, route.wait_kind = wait_on.reason, wait_on.kind
                    extra = None
                    if "DSN" in client.extensions:
                        extra = {k.upper(): v for k, v in env.mail_params
                                 if k.upper() in ("RET", "ENVID")} or None
                    try:
                        result = await client.send(env.sender, recipients, data,
                                                   mail_params=extra, prepare=prepare)
                    except DeliveryError as e:
                        if client.usable:  # refused before sending (size, 8-bit, SMTPUTF8)
                            self.pool.put(PoolKey(src, ip, port, tls.value), client,
                                          idle=conn.reuse.idle,
                                          max_messages=conn.reuse.messages)
                        else:
                            self._drop(client)
                        if reused and e.temporary and e.kind in ("network", "protocol"):
                            client, reused = None, False
                            health.suspect(src, self.clock(), job)
                            continue
                        return Outcome(error=e, route=route)
                    self.pool.put(PoolKey(src, ip, port, tls.value), client,
                                  idle=conn.reuse.idle, max_messages=conn.reuse.messages)
                    self.limiter.wake()  # a waiter may take this session from the pool
                    replies = {a: result.reply_for(a) for a in recipients}
                    await self._suspend_on(limits, *replies.values())
                    return Outcome(replies=replies, route=route)
            if pooled is not None:
                self.pool.put(PoolKey(pooled[0], ip, port, tls.value), pooled[1],
                              idle=conn.reuse.idle, max_messages=conn.reuse.messages)
            if refused is None or last is not None:
                assert last is not None
                return last
            # Every source was refused by a shaping limit: wait, no attempt counted.
            left = deadline - time.monotonic()
            if left <= 0 or refused.kind in ("suspended", "closed") or (
                    refused.retry_after is not None and refused.retry_after > left):
                route.waited = time.monotonic() - waited_since
                route.wait_reason, route.wait_kind = refused.reason, refused.kind
                return Waiting(refused)
            waited_for = refused
            if refused.kind == "concurrency" and refused.key:
                own = PoolKey(sources[0], ip, port, tls.value)
                parked = self.pool.last_parked(own)
                if parked is not None and self._lease_covers(parked, own_limits):
                    continue  # one this message can use was parked meanwhile: take it
                busy = self._sessions_in_use(own, own_limits)
                if (2 * busy > self.pool.waiting(own)
                        and time.monotonic() - waited_since < OWN_SESSION_WAIT):
                    # Sessions of this message's own source that it could use are
                    # delivering and come back to the pool within a message's time: wait for
                    # one (up to two waiters a session), or for the slot. Closing another
                    # source's idle session to connect anew made sessions change hands
                    # between the sources whenever the round robin's share wavered: 5 times
                    # the connections under the host-wide destination cap (bench/RESULTS.md,
                    # "Shaping"). Past that many waiters the sources' split is off, and an
                    # idle session is closed for this one.
                    await self._wait_for_session(own, refused, min(left, OWN_SESSION_WAIT))
                    continue
            if refused.kind == "concurrency" and refused.key and self.pool.close_idle(
                    lambda c, key=refused.key: key in self._lease_keys(c)):
                # An idle session of ours holds the slot: once it is closed, the slot is free.
                await self.limiter.wait(refused, min(left, 1.0))
                continue
            await self.limiter.wait(refused, left)

    async def _wait_for_session(self, key: PoolKey, refused: Denied, timeout: float) -> None:
        """Until a session of ``key`` is parked or the refused slot may be free (a release,
        e.g. by a worker that died), at most ``timeout`` seconds."""
        waits = (asyncio.ensure_future(self.pool.wait_parked(key, timeout)),
                 asyncio.ensure_future(self.limiter.wait(refused, timeout)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _connect_slot(self, attempt: Attempt, limits: tuple[Limit, ...]
                            ) -> Lease | Denied:
        return await self.limiter.connect(attempt, limits)

    async def _message_slot(self, attempt: Attempt, limits: tuple[Limit, ...],
                            client: SMTPClient, deadline: float, route: Route) -> Denied | None:
        """Wait for every rate of ``limits`` on this connection, while within ``deadline``
        (a slot up to RESERVE_AHEAD ahead is reserved, then waited for); the refusal when
        waiting longer would be needed (or the lease was lost).

        A slot this process reaches more than LATE_SEND after its time (a busy event loop, a
        slow Redis reply) is given up for a fresh one: sending late would bunch this message
        with the next slot's and exceed the rate over a short window. After MAX_LATE such
        slots in a row the message goes anyway. The store's clock read the slot somewhere
        within the round trip, so the message is held ``hold`` after the answer (never early)
        and its lateness counted from the asking (never underestimated): counting from half
        the round trip instead let a reply that sat 20 ms in a busy loop's socket through as
        on time, and the sink saw 13 messages in 0.5 s of a 20/s rate."""
        lease = self._leases.get(id(client))
        late = 0
        while True:
            left = deadline - time.monotonic()
            asked = time.monotonic()
            got = await self.limiter.message(attempt, limits, lease,
                                             max(0.0, min(RESERVE_AHEAD, left)))
            if got is None or isinstance(got, float):
                if got:
                    await asyncio.sleep(got)  # the reserved slot's time
                    route.waited += got
                    route.wait_reason = route.wait_reason or "rate: reserved slot"
                    route.wait_kind = route.wait_kind or "rate"
                has_rate = any(lim.rate is not None for lim in limits)
                if (has_rate and time.monotonic() - asked - (got or 0.0) > LATE_SEND
                        and late < MAX_LATE):
                    late += 1
                    continue
                return None
            if got.kind in ("lost", "suspended", "closed"):
                return got
            left = deadline - time.monotonic()
            if got.retry_after is None or got.retry_after > left:
                return got
            await asyncio.sleep(got.retry_after)
            route.waited += got.retry_after
            route.wait_reason, route.wait_kind = got.reason, got.kind

    async def _suspend_on(self, limits: tuple[Limit, ...], *replies: Reply) -> None:
        """Dynamic suspensions: a policy's ``suspend_on`` matched by a remote reply."""
        for lim in limits:
            for rule in lim.suspend_on:
                for reply in replies:
                    if reply.code < 400:
                        continue
                    if rule.code is not None and reply.code != rule.code:
                        continue
                    text = str(reply)
                    if rule.text is not None and not re.search(rule.text, text):
                        continue
                    reason = text[:200]
                    await self.limiter.suspend(dict(lim.fields), rule.duration, reason)
                    log_event("shaping.suspended", "warning", key=lim.label,
                              duration_s=rule.duration, reason=reason, origin="reply")
                    return

    def _lease_covers(self, client: SMTPClient, limits: tuple[Limit, ...]) -> bool:
        """Whether ``client``'s lease holds every concurrency key of ``limits``."""
        return self._covers(id(client), limits)

    def _covers(self, cid: int, limits: tuple[Limit, ...]) -> bool:
        keys = self._lease_keys_of(cid)
        return all(lim.key in keys for lim in limits if lim.concurrency is not None)

    def _lease_keys(self, client: SMTPClient) -> tuple[str, ...]:
        return self._lease_keys_of(id(client))

    def _lease_keys_of(self, cid: int) -> tuple[str, ...]:
        lease = self._leases.get(cid)
        return lease.keys if lease is not None else ()

    def _sessions_in_use(self, key: PoolKey, limits: tuple[Limit, ...]) -> int:
        """Open sessions of ``key`` whose lease covers ``limits``, not parked (in use: each
        comes back to the pool after its message)."""
        open_ = sum(1 for cid, k in self._session_keys.items()
                    if k == key and self._covers(cid, limits))
        return open_ - self.pool.parked(key, lambda c: self._lease_covers(c, limits))

    def _opened(self, client: SMTPClient, key: PoolKey) -> None:
        self._session_keys[id(client)] = key
        self.connections_opened += 1
        src = key.source
        metrics.outbound_connection_opened(src.address_id or src.address or "os",
                                           str(src.proxy) if src.proxy else "direct")

    def _closed(self, client: SMTPClient) -> None:
        """A connection is closed: its shaping slots are free."""
        lease = self._leases.pop(id(client), None)
        if lease is not None:
            self.limiter.release(lease)
        key = self._session_keys.pop(id(client), None)
        if key is not None:
            self.pool.wake_one(key)  # a job waiting for it looks again

    def _drop(self, client: SMTPClient) -> None:
        client.close()
        self._closed(client)

    def _log_connect_failure(self, job: Job, src: Source, host: MXHost, ip: str,
                             e: DeliveryError, then: str, **extra: object) -> None:
        log_event(
            "delivery.connect_failed", "warning", qid=job.queue_id,
            transport=job.destination.transport, kind=e.kind, temporary=e.temporary,
            source_id=src.address_id, source_ip=src.address, helo=src.helo,
            proxy=str(src.proxy) if src.proxy else "direct", mx=host.name, mx_ip=ip,
            error=e.message, then=then, **extra,
        )

    # -- results

    async def _record(self, job: Job, cfg: RunningConfig, transport: ResolvedTransport | None,
                      outcome: Outcome, data: bytes | SpooledBody | None, now: float,
                      started: float, not_before: float | None = None) -> float | None:
        msg = job.message
        env = msg.envelope
        retry = transport.retry if transport is not None else Retry()
        if outcome.waiting is not None:
            # Parked for a shaping limit: not an attempt; back when a slot may be free.
            w = outcome.waiting
            wait = w.retry_after if w.retry_after is not None else PARK_AFTER
            # The wait counts from the refusal, not from the job's start (``now``): the job
            # may have waited in memory meanwhile, and a suspension parked from the start
            # came back before its end and was parked a second time.
            due = max(now, self.clock()) + min(max(wait, 0.5), PARK_MAX)
            results = [_Result(r, RecipientState.DEFERRED, f"waiting: {w.reason}", due,
                               counted=False) for r in job.recipients]
        else:
            results = [self._result(r, outcome, retry, env.received_at, now)
                       for r in job.recipients]
            if not_before is not None:  # a dead destination's deferral: not before its probe
                limit = env.received_at + retry.during
                for x in results:
                    if x.state is RecipientState.DEFERRED:
                        x.next_attempt = max(x.next_attempt, min(not_before, limit))

        failed = [x for x in results if x.dsn is not None and x.dsn.action == "failed"]
        delayed = [x for x in results if x.dsn is not None and x.dsn.action == "delayed"]
        for group in (failed, delayed):
            if not group:
                continue
            ok = await self._send_dsn(job, cfg, transport, group, data)
            if not ok:
                for x in group:
                    if x.state is RecipientState.FAILED:  # keep it: try again, bounce later
                        x.state = RecipientState.DEFERRED
                        x.next_attempt = now + retry.intervals[0].interval
                    else:
                        x.notified = None
        updates = [
            RecipientUpdate(x.record.address, x.state, x.record.attempts + int(x.counted),
                            x.next_attempt, x.last_reply, x.notified)
            for x in results
        ]
        try:
            await self.spool.update(msg.queue_id, updates)
        except MessageNotFound:
            log_event("delivery.gone", "warning", qid=msg.queue_id,
                      reason="message removed from the spool during the attempt")
        except SpoolError as e:
            log_event("delivery.record_failed", "error", qid=msg.queue_id, error=str(e),
                      effect="recipients stay as they were and will be tried again")
            raise  # the scheduler rests the message instead of retrying it at once
        finally:
            self._log_attempt(job, outcome, results, started)
        deferred = [x.next_attempt for x in results if x.state is RecipientState.DEFERRED]
        return min(deferred) if deferred else None

    def _result(self, rec: RecipientRecord, outcome: Outcome, retry: Retry, received_at: float,
                now: float) -> _Result:
        route = outcome.route
        remote = route.mx or None
        reply = outcome.replies.get(rec.address)
        if reply is not None:
            text = str(reply)
            if 200 <= reply.code < 300:
                return _Result(rec, RecipientState.DELIVERED, text, now)
            if reply.code >= 500:
                return _Result(rec, RecipientState.FAILED, text, now, dsn=dsnlib.RecipientStatus(
                    rec.address, "failed", dsnlib.status_from_reply(reply),
                    dsnlib.smtp_diagnostic(reply), remote, now))
            return self._temporary(rec, retry, received_at, now, text,
                                   dsnlib.smtp_diagnostic(reply),
                                   dsnlib.status_from_reply(reply, "delayed"), remote)
        hook = outcome.hook
        if hook is not None:
            reason = hook.reason or "no reason given"
            if hook.action == "delete":
                return _Result(rec, RecipientState.FAILED,
                               f"deleted by the pre-delivery hook: {reason}", now)
            if hook.action == "bounce":
                text = f"bounced by the pre-delivery hook: {reason}"
                return _Result(rec, RecipientState.FAILED, text, now, dsn=dsnlib.RecipientStatus(
                    rec.address, "failed", "5.0.0", dsnlib.local_diagnostic(text), None, now))
            text = f"queued by the pre-delivery hook: {reason}"
            return self._temporary(rec, retry, received_at, now, text,
                                   dsnlib.local_diagnostic(text), "4.0.0", None,
                                   delay=hook.delay)
        if outcome.hook_error is not None:
            text = f"pre-delivery hook failed: {outcome.hook_error}"
            return self._temporary(rec, retry, received_at, now, text,
                                   dsnlib.local_diagnostic(text), "4.0.0", None)
        err = outcome.error or DeliveryError("protocol", "no result")
        text = f"{err.kind}: {err.message}"
        if not err.temporary:
            status = err.status or _LOCAL_STATUS.get(err.dns or err.kind, "5.0.0")
            return _Result(rec, RecipientState.FAILED, text, now, dsn=dsnlib.RecipientStatus(
                rec.address, "failed", status, dsnlib.local_diagnostic(text), remote, now))
        return self._temporary(rec, retry, received_at, now, text,
                               dsnlib.local_diagnostic(text), "4.0.0", remote)

    def _temporary(self, rec: RecipientRecord, retry: Retry, received_at: float, now: float,
                   text: str, diagnostic: str, status: str, remote: str | None,
                   delay: float | None = None) -> _Result:
        plan = plan_retry(retry, rec.attempts + 1, received_at, now, rec.notified)
        if plan.expired:
            failed_status = "5.4.7"
            return _Result(rec, RecipientState.FAILED, f"{text} ({plan.reason})", now,
                           dsn=dsnlib.RecipientStatus(rec.address, "failed", failed_status,
                                                      diagnostic, remote, now))
        next_attempt = plan.next_attempt
        if delay is not None:
            next_attempt = min(now + delay, received_at + retry.during)
        out = _Result(rec, RecipientState.DEFERRED, text, next_attempt)
        if plan.notify:
            out.notified = plan.notified
            out.dsn = dsnlib.RecipientStatus(rec.address, "delayed", status, diagnostic, remote,
                                             now, received_at + retry.during)
        return out

    async def _send_dsn(self, job: Job, cfg: RunningConfig, transport: ResolvedTransport | None,
                        group: list[_Result], data: bytes | SpooledBody | None) -> bool:
        """Store a DSN about ``group``; False if it could not be stored (try again later)."""
        msg = job.message
        env = msg.envelope
        action = group[0].dsn.action if group[0].dsn else "failed"
        rcpts = ",".join(x.record.address for x in group)
        if env.sender == "":
            log_event("dsn.suppressed", qid=msg.queue_id, action=action, rcpts=rcpts,
                      reason="null sender")
            return True
        if data is None:
            try:
                data = await self.spool.read(msg.queue_id)
            except MessageNotFound:
                data = b""
            except SpoolError as e:
                log_event("dsn.failed", "error", qid=msg.queue_id, error=str(e))
                return False
        dsn_transport = env.transport or job.destination.transport or None
        if transport is not None:
            dsn_transport = transport.dsn.transport if transport.dsn else transport.id
        envid = next((v for k, v in env.mail_params if k.upper() == "ENVID"), None)
        now = self.clock()
        body = dsnlib.build_dsn(
            reporting_mta=self.hostname, original_sender=env.sender, queue_id=msg.queue_id,
            arrival=env.received_at, recipients=[x.dsn for x in group if x.dsn],
            original=(data.head(dsnlib.MAX_ORIGINAL_HEADERS + 4)  # only headers are quoted
                      if isinstance(data, SpooledBody) else data),
            now=now, envid=envid,
        )
        envelope = Envelope(
            sender="", recipients=(env.sender,), client_ip="127.0.0.1", client_port=0,
            helo=self.hostname, server_id=env.server_id, transport=dsn_transport,
            size=len(body), received_at=now,
        )
        try:
            qid = await self.spool.store(envelope, body)
        except SpoolError as e:
            log_event("dsn.failed", "error", qid=msg.queue_id, action=action, rcpts=rcpts,
                      error=str(e), effect="recipients stay queued")
            return False
        log_event("dsn.queued", qid=msg.queue_id, dsn_qid=qid, action=action, rcpts=rcpts,
                  to=env.sender, transport=dsn_transport)
        metrics.DSN.labels(action).inc()
        self.scheduler.wake()
        return True

    def _log_attempt(self, job: Job, outcome: Outcome, results: list[_Result],
                     started: float) -> None:
        route = outcome.route
        src = route.source
        if route.wait_kind:
            metrics.policy_wait(route.wait_kind)
        states = {x.state for x in results}
        names = {RecipientState.DELIVERED: "delivered", RecipientState.FAILED: "failed",
                 RecipientState.DEFERRED: "deferred"}
        if outcome.hook is not None and outcome.hook.action == "delete":
            result = "deleted"
        elif len(states) == 1:
            result = names.get(next(iter(states)), "deferred")
        else:
            result = "mixed"
        deferred = [x.next_attempt for x in results if x.state is RecipientState.DEFERRED]
        next_attempt = _iso(min(deferred)) if deferred else None
        fields: dict[str, object] = {
            "qid": job.queue_id,
            "rcpts": ",".join(x.record.address for x in results),
            "transport": job.destination.transport or None,
            "attempt": min(x.record.attempts for x in results) + 1,
        }
        if src is not None:
            fields.update(source_id=src.address_id, source_ip=src.address or route.local_ip,
                          helo=src.helo, proxy=str(src.proxy) if src.proxy else "direct")
        if route.mx:
            fields.update(mx=route.mx, mx_ip=route.mx_ip)
        if route.waited:
            fields.update(waited_ms=int(route.waited * 1000), waited_for=route.wait_reason or None)
        if outcome.dkim:
            fields["dkim"] = outcome.dkim
        event = "delivery.attempt"
        level = "info"
        if outcome.waiting is not None:
            event = "delivery.waiting"
            fields["attempt"] = min(x.record.attempts for x in results)
            fields.update(kind=outcome.waiting.kind, reason=outcome.waiting.reason)
            result = "parked"
        elif outcome.replies:
            reply = next(iter(outcome.replies.values()))
            worst = [r for r in outcome.replies.values() if r.code >= 300]
            if worst:
                reply = worst[0]
            fields.update(
                reply_code=reply.code,
                enhanced=".".join(map(str, reply.enhanced)) if reply.enhanced else None,
                reply=" / ".join(reply.lines), tls=route.tls,
            )
            if route.tls_fallback:
                fields["tls_fallback"] = True
        elif outcome.hook is not None:
            fields.update(hook=outcome.hook.action, reason=outcome.hook.reason)
        elif outcome.hook_error is not None:
            event, level = "delivery.error", "warning"
            fields.update(kind="hook", temporary=True, error=str(outcome.hook_error))
        elif outcome.error is not None:
            event, level = "delivery.error", "warning"
            err = outcome.error
            fields.update(kind=err.kind, dns=err.dns, temporary=err.temporary,
                          error=err.message)
        fields.update(duration_ms=int((time.monotonic() - started) * 1000), result=result,
                      next_attempt=next_attempt)
        if result == "mixed":
            fields["results"] = ",".join(f"{x.record.address}:{names.get(x.state, '?')}"
                                         for x in results)
        log_event(event, level, **fields)
        metrics.delivery_attempt(
            job.destination.transport or "?",
            (src.address_id or src.address or "os") if src else "-",
            (str(src.proxy) if src.proxy else "direct") if src else "-", result,
            _failure_kind(outcome),
            ["deleted" if result == "deleted" else names.get(x.state, "deferred")
             for x in results], time.monotonic() - started,
            str(fields.get("reply") or fields.get("error") or "") or None)


def _failure_kind(outcome: Outcome) -> str:
    """The class of what went wrong, for metrics: smtp, network, dns, ... or hook."""
    if outcome.replies:
        return "smtp"
    if outcome.hook is not None or outcome.hook_error is not None:
        return "hook"
    return outcome.error.kind if outcome.error is not None else "none"


def recipient_domains(recipients: Sequence[str]) -> tuple[str, ...]:
    """The distinct domains of ``recipients`` (lower case), sorted."""
    return tuple(sorted({r.rpartition("@")[2].lower().rstrip(".") for r in recipients}))


def host_limits(dest: Destination, cfg: RunningConfig) -> tuple[Limit, Limit]:
    """``queues.concurrency`` and ``queues.total_concurrency`` as concurrency limits of the
    host-wide limiter (N workers without Redis), so that both connection caps hold for the
    host: keys ``destination=TRANSPORT/NEXTHOP`` and ``queues.total_concurrency``. The
    scheduler's per-destination window (slow start, failure feedback) stays per worker."""
    key = f"destination={dest}"
    total = "queues.total_concurrency"
    return (Limit(key, key, cfg.queues.concurrency),
            Limit(total, total, cfg.queues.total_concurrency))


def _sooner(a: Denied | None, b: Denied) -> Denied:
    """Of two sources' refusals, the one that may pass first (an unknown wait, a
    concurrency slot held elsewhere, counts as PARK_AFTER): the job waits for the best."""
    if a is None:
        return b
    wait_a = a.retry_after if a.retry_after is not None else PARK_AFTER
    wait_b = b.retry_after if b.retry_after is not None else PARK_AFTER
    return b if wait_b < wait_a else a


def destination_feedback(outcome: Outcome,
                         proxy_at_fault: Callable[[Outcome], bool] | None = None
                         ) -> tuple[bool | None, str]:
    """What an attempt says about its destination (see `Scheduler.feedback`).

    A session that gave replies is a success, unless every reply is the session's refusal
    (421, or the banner's or EHLO's refusal kept as the recipients' reply); a temporary
    network, proxy, TLS, protocol or DNS error is a failure; config, loop and hook outcomes
    and permanent errors say nothing about the peer. Neither does a failure the proxy tier
    caused (``proxy_at_fault``): it counts against the proxy (`ferrymail.delivery.health`),
    so a proxy failover does not mark the MX dead.
    """
    if outcome.replies:
        reply = next(iter(outcome.replies.values()))
        if all(r.code == 421 for r in outcome.replies.values()):
            return False, f"{reply.code} {' '.join(reply.lines)}"[:200]
        return True, ""
    err = outcome.error
    if err is None or not err.temporary:
        return None, ""
    if proxy_at_fault is not None and proxy_at_fault(outcome):
        return None, ""
    if err.kind in ("network", "proxy", "tls", "protocol", "dns"):
        return False, f"{err.kind}: {err.message}"[:200]
    return None, ""


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
