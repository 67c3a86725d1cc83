"""Route by recipient domain: which proxy and source IPs to use, what to refuse or drop.

In a running file in ``examples/`` (a relative hook path is resolved against the folder of
the running file; ``ferrymail config check`` loads the hook the same way)::

    scripting:
      hooks:
        predelivery: hooks/per_domain.py
        timeout: 5s

Each attempt covers recipients of one domain, so looking at the first one is enough.
"""

from ferrymail.hooks import Action, HookContext

PROXY = {"server": "192.168.1.2", "port": 2525}

ROUTES = {
    # domain: Try() options
    "gmail.com": {
        "proxyprotocol": PROXY,
        "sourceip": [{"address": "1.2.3.4", "helo": "smtp4.example.com"},
                     {"address": "1.2.3.5", "helo": "smtp5.example.com"}],
    },
    # Warm-up: always the first IP while it works, the second only as a fallback.
    "outlook.com": {
        "proxyprotocol": PROXY,
        "sourceip": [{"address": "1.2.3.6", "helo": "smtp6.example.com"},
                     {"address": "1.2.3.4", "helo": "smtp4.example.com"}],
        "sourceip_random": False,
    },
    # Internal: directly, bypassing the transport's proxy.
    "corp.example": {"proxyprotocol": False, "server": "10.0.0.25", "tls": "require"},
}
REFUSED = {"spamtrap.example"}  # bounce: the sender gets a DSN
DISCARDED = {"blackhole.example"}  # delete: no DSN
SLOW = {"greylisting.example"}  # after 3 attempts, wait 30 minutes between tries


def predelivery(ctx: HookContext, action: Action) -> None:
    domain = ctx.recipients[0].rpartition("@")[2].lower()
    if domain in REFUSED:
        action.bounce(f"mail to {domain} is not allowed")
    elif domain in DISCARDED:
        action.delete(f"{domain} is a black hole")
    elif domain in SLOW and ctx.retry >= 3:
        action.queue(delay=1800, reason=f"{domain}: slowing down after {ctx.retry} attempts")
    elif domain in ROUTES:
        action.try_(**ROUTES[domain])
    # anything else: no call = Try() with the transport's own settings
