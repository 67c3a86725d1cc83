"""ferrymail: a mail transfer agent for proxy tiers."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["MIME", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import ferrymail.proxy` does not pull in the SMTP client and its deps.
    if name == "MIME":
        return importlib.import_module("ferrymail.mime").MIME
    raise AttributeError(f"module 'ferrymail' has no attribute {name!r}")
