"""nginx on this host: finding its binary, whether it can listen, its
workers' user and what that user can reach, the run directory, and
writing its files atomically.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

def write_if_changed(path: Path, text: str) -> bool:
    """Replace `path` with `text` atomically (rename), only if it differs;
    True when it was written."""
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def default_run_dir(vassals_dir: Path) -> Path:
    """Where an Emperor keeps its sockets and nginx files, unless told: the
    directory of its default stats socket (status.default_stats_path), one
    per vassals directory (whose lock guarantees one Emperor)."""
    from ..rundir import default_stats_path

    return default_stats_path(vassals_dir).parent


def nginx_worker_user(spec: str | None) -> tuple[str, int]:
    """(`user` directive value, gid) of nginx's workers under a root
    master: USER[:GROUP] as asked, else www-data (Debian's nginx user) if
    there is one, else nobody; the group defaults to the user's own.
    ValueError (one line) for a user or group that does not exist."""
    import grp
    import pwd

    if spec:
        name, _, group = spec.partition(":")
    else:
        name, group = "www-data", ""
        try:
            pwd.getpwnam(name)
        except KeyError:
            name = "nobody"
    try:
        pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        raise ValueError(f"no such user {name!r}") from None
    try:
        gr = (grp.getgrgid(pw.pw_gid) if not group else
              grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group))
    except KeyError:
        raise ValueError(f"no such group {group!r}") from None
    return f"{pw.pw_name} {gr.gr_name}", gr.gr_gid


def unreachable_by(user: str, gid: int, path: Path) -> str | None:
    """The first directory on the way to `path` that `user` (with group
    `gid` and its other groups) cannot search, as one phrase; None if
    every one can be."""
    import grp
    import pwd
    import stat as st

    pw = pwd.getpwnam(user)
    groups = {gid, pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    p = Path(os.path.abspath(path))
    for d in [*reversed(p.parents), p]:
        try:
            s = os.stat(d)
        except OSError:
            return None  # made later by the Emperor, 0755
        if pw.pw_uid == 0:
            return None
        mode = s.st_mode
        ok = (mode & st.S_IXUSR if s.st_uid == pw.pw_uid else
              mode & st.S_IXGRP if s.st_gid in groups else mode & st.S_IXOTH)
        if not ok:
            return f"{d} is mode {st.S_IMODE(mode):04o}, owner {s.st_uid}:{s.st_gid}"
    return None


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def check_listen(addr: str) -> str | None:
    """Why nginx could not listen on `addr` (one line), or None."""
    from ..sockets import parse_address

    try:
        host, port = parse_address(addr)
    except ValueError as e:
        return str(e)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    except OSError as e:
        return f"cannot listen on {addr}: {e.strerror or e}"
    finally:
        s.close()
    return None
