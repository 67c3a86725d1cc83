"""Shared pieces of the ``ferrymail`` command families: exit codes, config error printing."""

from __future__ import annotations

import sys

from ferrymail.config import ConfigError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def print_config_error(exc: ConfigError) -> None:
    """Print each error of ``exc`` as ``FILE:LINE: KEYPATH: MESSAGE`` on stderr."""
    for err in exc.errors:
        print(str(err), file=sys.stderr)
