"""Running as an unprivileged user: `environment.user` / `environment.group`.

The daemon starts as root to bind privileged ports (25, 465, 587), then gives root up for
good before it opens the spool or accepts a connection (as Postfix's master hands work to
processes running as ``mail_owner``): supplementary groups first (``setgroups``/
``initgroups``), then the group (``setgid``), then the user (``setuid``: real, effective and
saved ids, so root cannot be taken back). The spool directory is prepared for that user
while still root: created ``0700``, and handed over (with the spool's files and large
bodies) if another user owns it.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from ferrymail.observe.log import log_event

# the files of a spool directory (spool/sqlite.py, spool/reserve.py, spool/body.py)
_SPOOL_FILES = ("spool.db", "spool.db-wal", "spool.db-shm", "reserve")
_BODIES = "bodies"


class PrivilegeError(Exception):
    """The configured user or group cannot be switched to."""


@dataclass(frozen=True)
class Credentials:
    """Who to become: names for logs, numeric ids for the system calls."""

    user: str
    uid: int
    group: str
    gid: int
    home: str


def lookup_user(name: str) -> pwd.struct_passwd:
    """The passwd entry of a user name or numeric uid; ValueError if there is none."""
    try:
        return pwd.getpwuid(int(name)) if name.isascii() and name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"no such user {name!r} on this host") from None


def lookup_group(name: str) -> grp.struct_group:
    """The group entry of a group name or numeric gid; ValueError if there is none."""
    try:
        return grp.getgrgid(int(name)) if name.isascii() and name.isdigit() else grp.getgrnam(name)
    except KeyError:
        raise ValueError(f"no such group {name!r} on this host") from None


def resolve(user: str, group: str | None = None) -> Credentials:
    """The credentials for `user` (and `group`, else the user's primary group)."""
    try:
        pw = lookup_user(user)
        gr = lookup_group(group) if group is not None else grp.getgrgid(pw.pw_gid)
    except (ValueError, KeyError) as exc:
        raise PrivilegeError(str(exc)) from None
    return Credentials(pw.pw_name, pw.pw_uid, gr.gr_name, gr.gr_gid, pw.pw_dir)


def prepare_spool_dir(path: str | Path, creds: Credentials) -> None:
    """As root: make `path` a 0700 directory owned by `creds`, with its spool files."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if (st.st_uid, st.st_gid) != (creds.uid, creds.gid):
            bodies = path / _BODIES
            files = [path / name for name in _SPOOL_FILES]
            if bodies.is_dir() and not bodies.is_symlink():
                files += [bodies / name for name in os.listdir(bodies)] + [bodies]
            for file in files:
                if file.exists() and not file.is_symlink():
                    os.chown(file, creds.uid, creds.gid)
            os.chown(path, creds.uid, creds.gid)
            log_event("app.spool_owner", spool=str(path), user=creds.user, group=creds.group,
                      was=f"{st.st_uid}:{st.st_gid}")
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError as exc:
        raise PrivilegeError(f"cannot prepare spool directory {path} for user {creds.user}:"
                             f" {exc.strerror}") from exc


def drop_privileges(creds: Credentials) -> None:
    """Become `creds` for good; PrivilegeError if that is not possible (or not complete)."""
    if os.getuid() == creds.uid and os.geteuid() == creds.uid and os.getgid() == creds.gid:
        return  # started as that user already
    if os.geteuid() != 0:
        raise PrivilegeError(f"cannot switch to user {creds.user}: not running as root"
                             f" (uid {os.geteuid()})")
    try:
        os.initgroups(creds.user, creds.gid)  # the user's own supplementary groups, no more
        os.setgid(creds.gid)
        os.setuid(creds.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to user {creds.user}, group {creds.group}:"
                             f" {exc.strerror}") from exc
    if creds.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PrivilegeError("root could be taken back after dropping privileges")
    if os.getresuid() != (creds.uid,) * 3 or os.getresgid() != (creds.gid,) * 3:
        raise PrivilegeError(f"privileges only partly dropped: uids {os.getresuid()},"
                             f" gids {os.getresgid()}")
    log_event("app.privileges_dropped", user=creds.user, uid=creds.uid, group=creds.group,
              gid=creds.gid, groups=",".join(map(str, os.getgroups())))
