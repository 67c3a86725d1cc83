"""Per-destination health: slow start, failure feedback, dead-destination parking (sans-IO).

A destination (a ready queue: transport + next hop) has a *window*, the number of concurrent
attempts it may have, between 1 and ``queues.concurrency``. The model is Postfix's queue
manager (``initial_destination_concurrency``, positive/negative feedback, the failed-cohort
limit that marks a site dead) with KumoMTA's ready-count rule for wanted connections:

- **slow start**: a destination seen for the first time, or coming back from dead, starts at
  ``initial_concurrency``; each success adds one, up to ``concurrency`` (then it is *normal*).
- **failure feedback**: a connection-level failure (refused, timeout, EOF before the banner,
  421 or other refusal of the session) halves the window (at least 1); ``dead_after``
  consecutive ones (no success between) mark it **dead** for ``dead_backoff`` seconds.
  Replies inside a session (a 4xx/5xx to MAIL, RCPT, DATA) are successes here: the peer is
  alive and answering.
- **dead**: no attempt starts; its waiting jobs are deferred at once (Postfix: "delivery
  temporarily suspended"). When the period ends it is **probing**: one attempt at a time.
  The probe's success revives it into slow start; its failure makes it dead again with the
  period doubled, up to ``dead_backoff_max``.
- **wanted**: the attempts it may run now are ``min(window, ceil(concurrency *
  (1 - e^(-0.023 * ready))))`` with ``ready`` its waiting plus running jobs (KumoMTA's
  connection-count curve), so ten messages do not open ten connections.
- **proven**: a success younger than ``recent_success`` seconds. Destinations that are not
  proven share at most ``unproven_share`` of ``total_concurrency`` (see `Scheduler`).

Times are the caller's monotonic clock, in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from ferrymail.config.models import DestinationPolicy

READY_CURVE = 0.023  # KumoMTA's connection_limit curve factor (per waiting message)


class HealthState(StrEnum):
    SLOW_START = "slow_start"
    NORMAL = "normal"
    DEAD = "dead"
    PROBING = "probing"


def wanted_connections(limit: int, ready: int) -> int:
    """KumoMTA's ``ceil(limit * (1 - e^(-0.023 * ready)))``: 0 for nothing ready, at most
    ``limit``, and at least 1 for anything ready."""
    if ready <= 0 or limit <= 0:
        return 0
    return max(1, min(limit, math.ceil(limit * (1.0 - math.exp(-READY_CURVE * ready)))))


@dataclass(frozen=True)
class Transition:
    """A change worth one log line: the state before and after, and why."""

    before: HealthState
    after: HealthState
    reason: str


class DestinationHealth:
    """The health of one destination, driven by `success` / `failure` and the clock."""

    def __init__(self, policy: DestinationPolicy, limit: int) -> None:
        self.window = float(min(policy.initial_concurrency, limit))
        self.state = HealthState.SLOW_START if self.window < limit else HealthState.NORMAL
        self.failures = 0  # consecutive connection-level failures
        self.dead_until = 0.0
        self.backoff = 0.0  # the current parking period (0 until first death)
        self.last_success: float | None = None
        self.last_error = ""

    # -- questions

    def proven(self, now: float, policy: DestinationPolicy) -> bool:
        return self.last_success is not None and now - self.last_success < policy.recent_success

    def allowed(self, now: float, limit: int, ready: int) -> int:
        """How many attempts may run at once now (0 while dead)."""
        self.tick(now)
        if self.state is HealthState.DEAD:
            return 0
        if self.state is HealthState.PROBING:
            return 1
        return min(int(self.window), limit, wanted_connections(limit, ready))

    def describe(self, limit: int, now: float) -> str:
        """``slow_start 3/20``, ``normal 20/20``, ``dead 42s``, ``probing``."""
        if self.state is HealthState.DEAD:
            return f"dead {max(0.0, self.dead_until - now):.0f}s"
        if self.state is HealthState.PROBING:
            return "probing"
        return f"{self.state.value} {int(self.window)}/{limit}"

    # -- events

    def tick(self, now: float) -> Transition | None:
        """Dead past its period becomes probing."""
        if self.state is HealthState.DEAD and now >= self.dead_until:
            self.state = HealthState.PROBING
            return Transition(HealthState.DEAD, HealthState.PROBING,
                              "parking period over: one probe at a time")
        return None

    def success(self, now: float, policy: DestinationPolicy, limit: int) -> Transition | None:
        before = self.state
        self.last_success = now
        self.failures = 0
        self.last_error = ""
        if before is HealthState.PROBING or before is HealthState.DEAD:
            self.backoff = 0.0
            self.window = float(max(1, min(policy.initial_concurrency, limit) - 1))
        self.window = min(float(limit), self.window + 1)
        self.state = HealthState.NORMAL if self.window >= limit else HealthState.SLOW_START
        if before in (HealthState.PROBING, HealthState.DEAD):
            return Transition(before, self.state, "probe succeeded")
        if before is not self.state:
            return Transition(before, self.state, "reached the concurrency limit")
        return None

    def failure(self, now: float, policy: DestinationPolicy, limit: int,
                error: str) -> Transition | None:
        before = self.state
        self.failures += 1
        self.last_error = error
        if before is HealthState.DEAD:
            return None  # an attempt started before it died: already counted
        if before is HealthState.PROBING or self.failures >= policy.dead_after:
            self.backoff = (policy.dead_backoff if self.backoff == 0.0
                            else min(self.backoff * 2, policy.dead_backoff_max))
            self.dead_until = now + self.backoff
            self.state = HealthState.DEAD
            why = ("probe failed" if before is HealthState.PROBING
                   else f"{self.failures} consecutive connection failures")
            return Transition(before, HealthState.DEAD, f"{why}: {error}")
        old = int(self.window)
        self.window = max(1.0, self.window / 2)
        self.state = HealthState.SLOW_START if self.window < limit else HealthState.NORMAL
        if int(self.window) != old or before is not self.state:
            return Transition(before, self.state, f"window {old} -> {int(self.window)}: {error}")
        return None
