"""ferrymail: a mail transfer agent for proxy tiers."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["MIME", "__version__", "send"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import ferrymail.proxy` does not pull in the SMTP client and its deps.
    if name == "MIME":
        return importlib.import_module("ferrymail.mime").MIME
    if name == "send":
        # The module itself: it is callable (ferrymail.send(...) is ferrymail.send.send(...)),
        # so `from ferrymail import send` works whether or not the submodule was imported.
        return importlib.import_module("ferrymail.send")
    raise AttributeError(f"module 'ferrymail' has no attribute {name!r}")
