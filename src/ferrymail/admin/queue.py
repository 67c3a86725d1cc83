"""Queue control: views, filters and summaries of the spool's messages, and the daemon-side
actions (retry, hold, release, delete, bounce) that are safe while a message is in flight.

Views are plain JSON-able dicts, built the same way by the daemon (``/v1/queue…``) and by the
CLI reading the spool itself when no daemon runs, so both print the same.

States of a pending recipient: ``queued`` (never tried), ``deferred`` (tried, waiting for its
retry time), ``held`` (``queue hold``), ``in-flight`` (an attempt is running now: daemon only).
A message is in the first of in-flight, queued, deferred, held that one of its pending
recipients is in.

In-flight safety: an action on a message with an attempt running is recorded and applied by
the daemon when the attempt ends (after its results are durable), to what is then still
pending: nothing delivered is bounced or deleted, nothing is applied twice. While an action
runs the message is claimed from the scheduler, so no attempt can start meanwhile.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ferrymail.admin.http import HTTPError, Request, RouteTable
from ferrymail.config.types import parse_duration
from ferrymail.delivery import dsn as dsnlib
from ferrymail.delivery.routing import recipient_domain, transport_id_for, transport_sources
from ferrymail.observe.log import log_event
from ferrymail.orchestrator.policy import value_matches
from ferrymail.orchestrator.suspensions import Suspension
from ferrymail.spool import (
    Envelope,
    MessageNotFound,
    QueuedMessage,
    RecipientRecord,
    RecipientState,
    RecipientUpdate,
    SpooledBody,
    SpoolError,
    is_held,
    parse_queue_id,
)

if TYPE_CHECKING:
    from ferrymail.app import App
    from ferrymail.config.models import RunningConfig

STATES = ("queued", "deferred", "held", "in-flight")
ACTIONS = ("retry", "hold", "release", "delete", "bounce")
SCAN_PAGE = 500
MAX_LIST = 100_000  # most messages one listing returns


# -- views -------------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def recipient_state(rec: RecipientRecord, in_flight: bool) -> str:
    if not rec.state.pending:
        return rec.state.value
    if in_flight:
        return "in-flight"
    if is_held(rec):
        return "held"
    return rec.state.value


def message_view(msg: QueuedMessage, *, now: float, in_flight: bool = False,
                 transport_of: Callable[[RecipientRecord, Envelope], str | None] | None = None
                 ) -> dict[str, Any]:
    """A message as JSON: envelope, message state and per-recipient state."""
    env = msg.envelope
    rcpts = []
    for rec in msg.recipients:
        transport = rec.transport or env.transport
        if transport is None and transport_of is not None:
            transport = transport_of(rec, env)
        state = recipient_state(rec, in_flight)
        rcpts.append({
            "address": rec.address, "state": state, "attempts": rec.attempts,
            "next_attempt": (None if state in ("held", "delivered", "failed")
                             else _iso(rec.next_attempt)),
            "last_reply": rec.last_reply, "transport": transport,
            "domain": recipient_domain(rec.address),
        })
    pending = [r["state"] for r in rcpts if r["state"] in STATES]
    state = next((s for s in ("in-flight", "queued", "deferred", "held") if s in pending), "done")
    return {
        "id": msg.queue_id, "state": state, "sender": env.sender,
        "received_at": _iso(env.received_at), "age_s": round(now - env.received_at, 3),
        "size": env.size, "client_ip": env.client_ip, "helo": env.helo, "server": env.server_id,
        "tls": env.tls, "recipients": rcpts,
    }


@dataclass(frozen=True)
class QueueFilter:
    """``--id``, ``--from``, ``--to`` (address or domain), ``--transport``, ``--state``,
    ``--older-than`` (seconds), ``--last-error`` (regex): all given must match."""

    ids: tuple[str, ...] = ()
    sender: str | None = None
    recipient: str | None = None
    transport: str | None = None
    state: str | None = None
    older_than: float | None = None
    last_error: str | None = None
    _rx: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for qid in self.ids:
            if parse_queue_id(qid) is None:
                raise ValueError(f"{qid!r} is not a queue id (16 lowercase hex digits)")
        if self.state is not None and self.state not in STATES:
            raise ValueError(f"unknown state {self.state!r} (one of {', '.join(STATES)})")
        if self.last_error is not None:
            try:
                object.__setattr__(self, "_rx", re.compile(self.last_error))
            except re.error as exc:
                raise ValueError(f"--last-error {self.last_error!r}: {exc}") from None

    QUERY_KEYS = ("id", "from", "to", "transport", "state", "older_than", "last_error")

    @classmethod
    def from_query(cls, query: dict[str, list[str]]) -> QueueFilter:
        """From URL query parameters (``id`` may repeat); ValueError on a bad value."""
        unknown = set(query) - set(cls.QUERY_KEYS) - {"limit", "body"}
        if unknown:
            raise ValueError(f"unknown filter {sorted(unknown)[0]!r} "
                             f"(one of {', '.join(cls.QUERY_KEYS)})")

        def one(key: str) -> str | None:
            v = query.get(key)
            return v[-1] if v else None

        older = one("older_than")
        return cls(
            ids=tuple(query.get("id", ())), sender=one("from"), recipient=one("to"),
            transport=one("transport"), state=one("state"),
            older_than=None if older is None else parse_duration(older),
            last_error=one("last_error"),
        )

    def to_query(self) -> list[tuple[str, str]]:
        out = [("id", q) for q in self.ids]
        for key, value in (("from", self.sender), ("to", self.recipient),
                           ("transport", self.transport), ("state", self.state),
                           ("older_than", self.older_than), ("last_error", self.last_error)):
            if value is not None:
                out.append((key, str(value)))
        return out

    @property
    def empty(self) -> bool:
        return not self.to_query()

    def matches(self, view: dict[str, Any]) -> bool:
        if self.ids and view["id"] not in self.ids:
            return False
        if self.sender is not None and not _address_matches(self.sender, view["sender"]):
            return False
        if self.older_than is not None and view["age_s"] < self.older_than:
            return False
        pending = [r for r in view["recipients"] if r["state"] in STATES]
        if self.recipient is not None:
            pending = [r for r in pending if _address_matches(self.recipient, r["address"])]
        if self.transport is not None:
            pending = [r for r in pending if r["transport"] == self.transport]
        if self.state is not None:
            pending = [r for r in pending if r["state"] == self.state]
        if self._rx is not None:
            pending = [r for r in pending if self._rx.search(r["last_reply"])]
        return bool(pending)


def _address_matches(pattern: str, address: str) -> bool:
    """An address (``a@b.example``, case-insensitive) or a domain (``b.example``, also
    matching its subdomains)."""
    p = pattern.strip().lower().strip("<>")
    a = address.lower()
    if "@" in p:
        return a == p
    domain = recipient_domain(a)
    return domain == p or domain.endswith("." + p)


WAITING = "waiting: "  # the engine's last_reply prefix of a job parked for a shaping limit


def summarize(views: Iterable[dict[str, Any]], *, now: float,
              source_of: Callable[[str | None], tuple[str, list[str]]] | None = None,
              global_hold: bool = False, notes: Sequence[str] = (),
              suspensions: Sequence[Suspension] = ()) -> list[dict[str, Any]]:
    """Pending recipients grouped per transport x destination domain x source, like KumoMTA's
    ``queue-summary`` / Postfix ``qshape``: counts, oldest, last error and why they wait.

    ``source_of(transport)`` gives the transport's source ids and the reasons its sources are
    unusable now (e.g. ``proxy down``). Policy waits: a deferred recipient whose last reply is
    the engine's ``waiting: REASON`` (parked for a shaping limit, see `delivery.engine`) gives
    REASON (``concurrency 10/10 for localip=…``, ``rate 2/1 for …: next slot in 500ms``,
    ``suspended until … (reason; fields)``), the latest one per group. ``notes`` apply to
    every group (the cluster fallback: ``redis unreachable: split 1/3``). ``suspensions`` in
    force name the groups they cover when all their fields are ``transportid`` or
    ``recipientdomain`` (others depend on the MX or source chosen at delivery, and show up
    as a waiting reason once a job meets them)."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for view in views:
        for r in view["recipients"]:
            if r["state"] not in STATES:
                continue
            transport = r["transport"] or "?"
            source, trouble = source_of(r["transport"]) if source_of else ("-", [])
            key = (transport, r["domain"] or "-", source)
            g = groups.get(key)
            if g is None:
                g = groups[key] = {"transport": transport, "domain": key[1], "source": source,
                                   "messages": set(), "recipients": 0, "oldest_s": 0.0,
                                   "states": {}, "last_error": "", "_last_attempts": -1,
                                   "next_retry": None, "why": set(trouble),
                                   "_wait": ("", "")}
            g["messages"].add(view["id"])
            g["recipients"] += 1
            g["oldest_s"] = max(g["oldest_s"], view["age_s"])
            g["states"][r["state"]] = g["states"].get(r["state"], 0) + 1
            if r["last_reply"] and r["attempts"] > g["_last_attempts"]:
                g["last_error"], g["_last_attempts"] = r["last_reply"], r["attempts"]
            if r["state"] == "held":
                g["why"].add("hold (queue hold)")
            elif r["state"] == "in-flight":
                g["why"].add("in flight")
            elif global_hold:
                g["why"].add("queues.hold is on")
            elif r["state"] == "deferred" and r["next_attempt"]:
                if g["next_retry"] is None or r["next_attempt"] < g["next_retry"]:
                    g["next_retry"] = r["next_attempt"]
                reply = r["last_reply"] or ""
                if reply.startswith(WAITING) and r["next_attempt"] >= g["_wait"][0]:
                    g["_wait"] = (r["next_attempt"], reply[len(WAITING):])
            elif r["state"] == "queued":
                g["why"].add("ready (waiting for a delivery slot)")
    out = []
    for g in groups.values():
        if g["_wait"][1]:
            g["why"].add(g["_wait"][1])
        g["why"].update(notes)
        for susp in suspensions:
            if susp.until > now and _covers(susp, g["transport"], g["domain"]):
                g["why"].add(susp.describe())
        del g["_wait"]
        if g["next_retry"] is not None:
            g["why"].add(f"retry at {g['next_retry']}")
        g["messages"] = len(g["messages"])
        g["oldest_s"] = round(g["oldest_s"], 3)
        g["why"] = sorted(g["why"])
        del g["_last_attempts"]
        out.append(g)
    out.sort(key=lambda g: (-g["recipients"], g["transport"], g["domain"]))
    return out


def merge_summaries(*answers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One host summary from the `summarize` groups of several workers (each holds its own
    spool shard): groups of the same transport x domain x source become one, with messages,
    recipients and states added up, the oldest age, the earliest retry, the reasons joined
    and the first last error (worker order). Sorted as `summarize` sorts."""
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    for groups in answers:
        for g in groups:
            key = (g["transport"], g["domain"], g["source"])
            have = merged.get(key)
            if have is None:
                merged[key] = {**g, "states": dict(g.get("states", {})),
                               "why": list(g.get("why", []))}
                continue
            have["messages"] += g["messages"]
            have["recipients"] += g["recipients"]
            have["oldest_s"] = max(have["oldest_s"], g["oldest_s"])
            for state, n in g.get("states", {}).items():
                have["states"][state] = have["states"].get(state, 0) + n
            if not have.get("last_error") and g.get("last_error"):
                have["last_error"] = g["last_error"]
            retries = [r for r in (have.get("next_retry"), g.get("next_retry"))
                       if r is not None]
            have["next_retry"] = min(retries) if retries else None
            have["why"] = sorted({*have["why"], *g.get("why", [])})
    out = []
    for g in merged.values():
        if g.get("next_retry") is not None:  # one "retry at" line: the earliest
            g["why"] = sorted({w for w in g["why"] if not w.startswith("retry at ")}
                              | {f"retry at {g['next_retry']}"})
        out.append(g)
    out.sort(key=lambda g: (-g["recipients"], g["transport"], g["domain"]))
    return out


def _covers(susp: Suspension, transport: str, domain: str) -> bool:
    """Whether ``susp`` holds every delivery of a transport x domain group."""
    values = {"transportid": transport, "recipientdomain": domain}
    return bool(susp.fields) and all(
        f in values and value_matches(f, p, values[f]) for f, p in susp.fields.items())


async def collect_views(spool: Any, flt: QueueFilter, *, now: float,
                        in_flight: frozenset[str] = frozenset(),
                        transport_of: Callable[[RecipientRecord, Envelope], str | None]
                        | None = None, limit: int = MAX_LIST) -> list[dict[str, Any]]:
    """Views of the spool's messages that match ``flt``, oldest first, at most ``limit``;
    read page by page (SCAN_PAGE messages at a time)."""
    out: list[dict[str, Any]] = []

    def take(msgs: Iterable[QueuedMessage]) -> None:
        for msg in msgs:
            view = message_view(msg, now=now, in_flight=msg.queue_id in in_flight,
                                transport_of=transport_of)
            if flt.matches(view) and len(out) < limit:
                out.append(view)

    if flt.ids:
        take([m for m in [await spool.get(q) for q in dict.fromkeys(flt.ids)] if m is not None])
        out.sort(key=lambda v: v["id"])
        return out
    after = None
    while len(out) < limit:
        page = await spool.scan(after, SCAN_PAGE)
        if not page:
            break
        take(page)
        after = page[-1].queue_id
    return out


SHOW_HEAD_MAX = 256 * 1024  # header section read for `show`
SHOW_BODY_MAX = 16 * 1024 * 1024  # most of a message `show --body` returns


def message_content(data: bytes | SpooledBody, body: bool) -> dict[str, Any]:
    """The header section as a list of (unfolded) lines, and the message if ``body`` (at most
    SHOW_BODY_MAX bytes; ``truncated`` says when it was cut). A spooled body is read in part."""
    size = len(data)
    head = data.head(SHOW_HEAD_MAX) if isinstance(data, SpooledBody) else data[:SHOW_HEAD_MAX]
    end = head.find(b"\r\n\r\n")
    head = head if end < 0 else head[:end]
    lines: list[str] = []
    for raw in head.split(b"\r\n"):
        line = raw.decode("utf-8", "replace")
        if line[:1] in (" ", "\t") and lines:
            lines[-1] += " " + line.strip()
        elif line:
            lines.append(line)
    out: dict[str, Any] = {"headers": lines, "data_size": size}
    if body:
        if isinstance(data, SpooledBody):
            raw_body = data.head(SHOW_BODY_MAX) if size > SHOW_BODY_MAX else data.read_all()
        else:
            raw_body = data[:SHOW_BODY_MAX]
        out["message"] = raw_body.decode("utf-8", "replace")
        out["truncated"] = size > SHOW_BODY_MAX
    return out


# -- the daemon side ---------------------------------------------------------------------------


@dataclass
class ActionResult:
    """What an action did: messages changed now, and in flight (applied when they end)."""

    action: str
    matched: int = 0
    changed: int = 0
    deferred: list[str] = field(default_factory=list)  # in flight: applied at the attempt's end
    missing: int = 0  # gone meanwhile (delivered, deleted)

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "matched": self.matched, "changed": self.changed,
                "in_flight": len(self.deferred), "in_flight_ids": self.deferred,
                "gone": self.missing}


class QueueService:
    """The daemon's queue view and actions over the App's spool and scheduler."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._pending: dict[str, list[tuple[str, str]]] = {}  # qid -> [(action, reason)]
        self._tasks: set[asyncio.Task[None]] = set()
        app.delivery.scheduler.on_released.append(self._attempt_ended)

    @property
    def spool(self) -> Any:
        return self.app.spool

    @property
    def scheduler(self) -> Any:
        return self.app.delivery.scheduler

    def _transport_of(self, rec: RecipientRecord, env: Envelope) -> str | None:
        try:
            return transport_id_for(rec, env, self.app.running)
        except KeyError:
            return None

    def _source_of(self, transport_id: str | None) -> tuple[str, list[str]]:
        cfg: RunningConfig = self.app.running
        if transport_id is None:
            return "-", ["no transport: server not in the running config"]
        try:
            transport = cfg.transport(transport_id)
        except KeyError:
            return "-", [f"transport {transport_id!r} not in the running config"]
        plan = transport_sources(transport, self.app.startup.environment.hostname)
        sources = [*plan.ipv4, *plan.ipv6]
        names = sorted({s.address_id or s.address or "os" for s in sources}) or ["os"]
        health = self.app.delivery.rotation.health
        now = time.time()
        down = sorted({f"proxy down ({s.proxy})" for s in sources
                       if s.proxy is not None and not health.is_up(s.proxy, now)})
        return ",".join(names), down

    async def views(self, flt: QueueFilter, limit: int = MAX_LIST) -> list[dict[str, Any]]:
        return await collect_views(self.spool, flt, now=time.time(),
                                   in_flight=self.scheduler.in_flight(),
                                   transport_of=self._transport_of, limit=limit)

    async def summary(self, flt: QueueFilter) -> list[dict[str, Any]]:
        views = await self.views(flt)
        cache: dict[str | None, tuple[str, list[str]]] = {}

        def source_of(transport_id: str | None) -> tuple[str, list[str]]:
            if transport_id not in cache:
                cache[transport_id] = self._source_of(transport_id)
            return cache[transport_id]

        limiter = self.app.delivery.limiter
        now = time.time()
        note = getattr(limiter, "fallback_note", lambda: None)()
        return summarize(views, now=now, source_of=source_of,
                         global_hold=self.app.running.queues.hold,
                         notes=[note] if note else [],
                         suspensions=limiter.active_suspensions(now))

    async def show(self, queue_id: str, body: bool) -> dict[str, Any]:
        if parse_queue_id(queue_id) is None:
            raise HTTPError(400, f"{queue_id!r} is not a queue id (16 lowercase hex digits)")
        msg = await self.spool.get(queue_id)
        if msg is None:
            raise HTTPError(404, f"no message {queue_id} in the queue")
        view = message_view(msg, now=time.time(),
                            in_flight=queue_id in self.scheduler.in_flight(),
                            transport_of=self._transport_of)
        view["pending_actions"] = [a for a, _ in self._pending.get(queue_id, ())]
        try:
            data = await self.spool.read(queue_id)
        except MessageNotFound:
            data = b""
        view.update(message_content(data, body))
        return view

    async def act(self, action: str, flt: QueueFilter, reason: str = "") -> ActionResult:
        """Apply ``action`` to every matching message (whole messages: all their pending
        recipients); in-flight ones when their attempt ends."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        views = await self.views(flt)
        result = ActionResult(action, matched=len(views))
        for view in views:
            qid = view["id"]
            if not self.scheduler.claim(qid):
                self._pending.setdefault(qid, []).append((action, reason))
                result.deferred.append(qid)
                log_event("queue.action_deferred", qid=qid, action=action,
                          reason="attempt in flight: applied when it ends")
                continue
            try:
                n = await self._apply(action, qid, reason)
            finally:
                self.scheduler.unclaim(qid)
            if n is None:
                result.missing += 1
            elif n:
                result.changed += 1
        log_event("queue.action", action=action, matched=result.matched,
                  changed=result.changed, in_flight=len(result.deferred), gone=result.missing,
                  filter=" ".join(f"{k}={v}" for k, v in flt.to_query()) or None,
                  reason=reason or None)
        return result

    def _attempt_ended(self, queue_id: str) -> None:
        """Scheduler callback: the last attempt of ``queue_id`` ended (results recorded)."""
        actions = self._pending.pop(queue_id, None)
        if not actions:
            return
        self.scheduler.claim(queue_id)  # before any fetch can take it again
        task = asyncio.create_task(self._apply_later(queue_id, actions))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply_later(self, queue_id: str, actions: list[tuple[str, str]]) -> None:
        try:
            for action, reason in actions:
                try:
                    n = await self._apply(action, queue_id, reason)
                except SpoolError as exc:
                    log_event("queue.action_failed", "error", qid=queue_id, action=action,
                              error=str(exc))
                    continue
                log_event("queue.action_applied", qid=queue_id, action=action,
                          changed=n or 0, gone=n is None, after="attempt ended")
        finally:
            self.scheduler.unclaim(queue_id)

    async def _apply(self, action: str, queue_id: str, reason: str) -> int | None:
        """Do ``action`` now; the number of recipients changed, None if the message is gone."""
        spool = self.spool
        now = time.time()
        try:
            if action == "retry":
                return await spool.retry(queue_id, now)
            if action == "hold":
                return await spool.hold(queue_id)
            if action == "release":
                return await spool.release(queue_id, now)
            msg = await spool.get(queue_id)
            if msg is None:
                return None
            pending = [r for r in msg.recipients if r.state.pending]
            if action == "delete":
                await spool.delete(queue_id)
                log_event("queue.deleted", qid=queue_id, sender=msg.envelope.sender,
                          rcpts=",".join(r.address for r in pending), reason=reason or None)
                return len(pending)
            return await self._bounce(msg, pending, reason or "bounced by the administrator")
        except MessageNotFound:
            return None

    async def _bounce(self, msg: QueuedMessage, pending: Sequence[RecipientRecord],
                      reason: str) -> int:
        """A DSN (RFC 3464, action failed) to the sender for ``pending``, stored before the
        recipients are marked failed (a crash in between can repeat it, never lose it)."""
        if not pending:
            return 0
        env = msg.envelope
        now = time.time()
        text = f"bounced by the administrator: {reason}"
        if env.sender:
            data = await self.spool.read(msg.queue_id)
            if isinstance(data, SpooledBody):  # only the header section is quoted
                data = data.head(dsnlib.MAX_ORIGINAL_HEADERS + 4)
            statuses = [dsnlib.RecipientStatus(r.address, "failed", "5.0.0",
                                               dsnlib.local_diagnostic(text), None, now)
                        for r in pending]
            envid = next((v for k, v in env.mail_params if k.upper() == "ENVID"), None)
            body = dsnlib.build_dsn(
                reporting_mta=self.app.startup.environment.hostname,
                original_sender=env.sender, queue_id=msg.queue_id, arrival=env.received_at,
                recipients=statuses, original=data, now=now, envid=envid)
            dsn_transport = env.transport
            tid = self._transport_of(pending[0], env)
            if tid is not None:
                try:
                    t = self.app.running.transport(tid)
                    dsn_transport = t.dsn.transport if t.dsn else t.id
                except KeyError:
                    pass
            dsn_env = Envelope(sender="", recipients=(env.sender,), client_ip="127.0.0.1",
                               client_port=0, helo=self.app.startup.environment.hostname,
                               server_id=env.server_id, transport=dsn_transport,
                               size=len(body), received_at=now)
            dsn_qid = await self.spool.store(dsn_env, body)
            log_event("dsn.queued", qid=msg.queue_id, dsn_qid=dsn_qid, action="failed",
                      rcpts=",".join(r.address for r in pending), to=env.sender,
                      transport=dsn_transport, by="admin")
            self.app.delivery.wake()
        await self.spool.update(msg.queue_id, [
            RecipientUpdate(r.address, RecipientState.FAILED, r.attempts, now, text)
            for r in pending])
        log_event("queue.bounced", qid=msg.queue_id, sender=env.sender,
                  rcpts=",".join(r.address for r in pending), reason=reason)
        return len(pending)

    # -- routes

    def register(self, routes: RouteTable) -> None:
        routes.add("GET", "/v1/queue", self._r_list)
        routes.add("GET", "/v1/queue/summary", self._r_summary)
        routes.add("GET", "/v1/queue/{id}", self._r_show)
        for action in ACTIONS:
            routes.add("POST", f"/v1/queue/{action}", self._r_action(action))

    async def _r_list(self, req: Request) -> Any:
        flt = _filter(req.query)
        limit = _int(req.arg("limit", str(MAX_LIST)))
        return {"messages": await self.views(flt, limit)}

    async def _r_summary(self, req: Request) -> Any:
        return {"queues": await self.summary(_filter(req.query)),
                "hold": self.app.running.queues.hold}

    async def _r_show(self, req: Request) -> Any:
        return await self.show(req.params["id"], req.arg("body") in ("1", "true", "yes"))

    def _r_action(self, action: str) -> Any:
        async def handler(req: Request) -> Any:
            doc = req.json()
            if not isinstance(doc, dict):
                raise HTTPError(400, "the body must be a JSON object")
            query = doc.get("filter", {})
            if not isinstance(query, dict):
                raise HTTPError(400, "filter must be an object of query parameters")
            flt = _filter({k: v if isinstance(v, list) else [str(v)] for k, v in query.items()})
            if flt.empty and not doc.get("all"):
                raise HTTPError(400, f"{action} needs a filter, or \"all\": true")
            reason = str(doc.get("reason") or "")
            return (await self.act(action, flt, reason)).as_json()
        return handler


def _filter(query: dict[str, list[str]]) -> QueueFilter:
    try:
        return QueueFilter.from_query(query)
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None


def _int(text: str | None) -> int:
    if text is None or not text.isascii() or not text.isdigit():
        raise HTTPError(400, f"expected a whole number, got {text!r}")
    return int(text)
