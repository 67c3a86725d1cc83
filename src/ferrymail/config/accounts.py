"""Config types for system accounts (``environment.user``, ``environment.group``).

A name (or a numeric id) that must exist on this host when the file is loaded, so that a
typo fails ``config check`` rather than the start of the daemon.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from ferrymail.privileges import lookup_group, lookup_user


def _user(value: str) -> str:
    lookup_user(value)
    return value


def _group(value: str) -> str:
    lookup_group(value)
    return value


UserName = Annotated[str, Field(min_length=1, strict=True), AfterValidator(_user)]
GroupName = Annotated[str, Field(min_length=1, strict=True), AfterValidator(_group)]
