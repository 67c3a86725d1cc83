"""Choose the DKIM keys per message, as Halon's ``signDKIM()`` in a script would.

With the keys of ``examples/running-signing.yaml`` (example.org, selectors s2026 and
e2026), in a running file in ``examples/``::

    scripting:
      hooks:
        predelivery: hooks/dkim_by_sender.py
        timeout: 5s

``action.dkim_sign(domain, selector)`` replaces ``dkim.sign`` and ``dkim.rules`` for the
attempt; call it once per signature. A key that is not in ``dkim.keys`` defers the attempt
with a config error, so a typo shows in the log instead of unsigned mail going out.
"""

from ferrymail.hooks import Action, HookContext

BOTH = [("example.org", "s2026"), ("example.org", "e2026")]  # RSA and Ed25519

SIGNERS = {
    # envelope sender domain (or the authenticated user's domain): keys to sign with
    "news.example.org": BOTH,
    "shop.example.net": BOTH,  # a customer without its own keys signs as the platform
}


def predelivery(ctx: HookContext, action: Action) -> None:
    who = ctx.auth or ctx.sender  # submitted with SMTP AUTH: the user decides
    for domain, selector in SIGNERS.get(who.rpartition("@")[2].lower(), ()):
        action.dkim_sign(domain, selector)
    # nothing else called: try_() with the transport's own settings
