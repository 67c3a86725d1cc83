"""A pre-delivery hook for inbound tests: keep every message queued (no delivery attempt).

With the delivery engine running inside ``ferrymail run``, an accepted message would otherwise
be tried at once (and, e.g. for example.com's null MX, bounced and removed) while the test
still wants to look at it in the spool.
"""

from ferrymail.hooks import Action, HookContext


async def predelivery(ctx: HookContext, action: Action) -> None:
    action.queue(delay=3600, reason="held by the inbound tests")
