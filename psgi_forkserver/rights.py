"""Files the Emperor opens for a vassal that drops root, opened with the
vassal's rights.

The Emperor runs as root; a vassal's `logto` file may be in a directory its
tenant owns (`/srv/alice/logs/app.log`). Opened as root, a symlink the
tenant put there (at the start, or before logrotate's reopen) had the
tenant's lines appended to any file of root's, or a new one created
anywhere. So the file is opened with the ids the vassal runs as (its
groups, gid and uid as effective ids: the Emperor is single-threaded), and
root's are taken back at once: what the tenant could not open itself, the
Emperor does not open for it. The vassal does the same for its access log
(perl/ForkServer/Vassal/Identity.pm computes the same ids).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path



@dataclass(frozen=True)
class Rights:
    """The ids a vassal runs as: uid, primary gid and every group."""

    uid: int
    gid: int
    groups: tuple[int, ...]


def of_vassal(uid: str | None, gid: str | None) -> Rights | None:
    """The rights of a vassal with these `uid` and `gid` keys; None when it
    keeps root's uid (no `uid`, or uid 0), or its keys name nobody (the
    vassal refuses to start then)."""
    if not uid:
        return None
    try:
        u = int(uid) if uid.isdigit() else pwd.getpwnam(uid).pw_uid
        g = None if not gid else int(gid) if gid.isdigit() else grp.getgrnam(gid).gr_gid
    except KeyError:
        return None
    if u == 0:
        return None
    try:
        pw: pwd.struct_passwd | None = pwd.getpwuid(u)
    except KeyError:
        pw = None
    if pw is None:
        # the vassal needs gid then; without one: no group of anybody's
        return Rights(u, g if g is not None else _overflow_gid(), (g,) if g is not None else ())
    primary = pw.pw_gid if g is None else g
    # as initgroups, by walking the group file (as the vassal does)
    groups = dict.fromkeys([primary, *(e.gr_gid for e in grp.getgrall() if pw.pw_name in e.gr_mem)])
    return Rights(u, primary, tuple(groups))


def _overflow_gid() -> int:
    try:
        return int(Path("/proc/sys/kernel/overflowgid").read_text())
    except (OSError, ValueError):
        return 65534


def open_append(path: Path, rights: Rights | None = None) -> int:
    """`path` opened to append (made 0644 if it is not there), with
    `rights` when the Emperor is root."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    if rights is None or os.geteuid() != 0:
        return os.open(path, flags, 0o644)
    groups, egid = os.getgroups(), os.getegid()
    try:
        os.setgroups(list(rights.groups))
        os.setegid(rights.gid)
        os.seteuid(rights.uid)
        return os.open(path, flags, 0o644)
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)
