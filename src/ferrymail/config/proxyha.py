"""Config models for proxy-tier health and the cluster's shared store.

Running (reloadable): ``proxyhealth`` (thresholds, suspension, back-off) and, per proxy,
``proxyprotocol.check`` (active checks). Instances share proxy health through the startup
``cluster`` section (`ferrymail.config.policies.Cluster`). Semantics in
`ferrymail.delivery.health` and ``docs/proxy-tier.md``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ferrymail.config.types import Host, Port, PositiveDuration, PositiveInt


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbeTarget(_Model):
    """Where an active probe through the proxy connects: something that answers with a banner."""

    server: Host
    port: Port = 25


class ProxyCheck(_Model):
    """Active check of one proxy: a TCP connect every ``interval`` s, failing after
    ``timeout`` s; with ``probe``, suspended (proxy, source) pairs are probed through the proxy
    (PROXY header from that source to the target, a banner within ``timeout``)."""

    interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 2.0
    probe: ProbeTarget | None = None


class Threshold(_Model):
    """``failures`` failures within ``window`` seconds trip a suspension."""

    failures: PositiveInt = 1
    window: PositiveDuration = 60.0


class ProxyHealthPolicy(_Model):
    """How passive failures turn into suspensions (see `ferrymail.delivery.health`).

    ``connect``: connection to the proxy refused or timed out (counted against the proxy).
    ``bind``: EOF or silence before the banner after the PROXY header (counted against the
    (proxy, source) pair; against the proxy too once ``spread`` different sources of it failed
    within the window). ``suspend`` is the first suspension, doubled after each failed probe up
    to ``suspend_max``.
    """

    connect: Threshold = Field(default_factory=Threshold)
    bind: Threshold = Field(default_factory=lambda: Threshold(failures=2, window=60.0))
    spread: Annotated[int, Field(ge=2, strict=True)] = 2
    suspend: PositiveDuration = 30.0
    suspend_max: PositiveDuration = 300.0

    @model_validator(mode="after")
    def _order(self) -> ProxyHealthPolicy:
        if self.suspend_max < self.suspend:
            raise ValueError("suspend_max must be at least suspend")
        return self
