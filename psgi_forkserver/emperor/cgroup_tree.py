"""The cgroup v2 hierarchy as files: where it is mounted, a process's
cgroup, the subtree's and a vassal's directory names, and killing,
emptying and removing a cgroup with everything below it. No state."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from pathlib import Path

#: the name of the subtree below the Emperor's cgroup, per vassals directory
PREFIX = "psgi-forkserver-"
#: a sweep or a shutdown waits this long for a killed cgroup to empty
EMPTY_WAIT = 5.0
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.@+-]{1,100}")


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or
    /sys/fs/cgroup/unified in the hybrid layout)."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(left.split()[4].replace("\\040", " "))
    except OSError:
        pass
    return None


def own_cgroup(pid: int | str = "self") -> str | None:
    """The process's cgroup v2 path (`0::/path` in /proc/PID/cgroup)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        pass
    return None


def subtree_name(vassals_dir: Path) -> str:
    return PREFIX + hashlib.sha256(str(Path(vassals_dir).resolve()).encode()).hexdigest()[:12]


def dir_name(name: str | None) -> str:
    """A vassal's cgroup directory: its name when that is a plain one."""
    if name is None:
        return "front"
    if _SAFE_NAME.fullmatch(name) and name not in (".", ".."):
        return "v-" + name
    return "x-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def procs(cg: Path) -> list[int]:
    """Every pid in `cg` and below."""
    out: list[int] = []
    for d, _, _ in os.walk(cg):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            pass
    return out


def populated(cg: Path) -> bool:
    try:
        with open(cg / "cgroup.events") as f:
            return "populated 1" in f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True


def remove_tree(cg: Path) -> bool:
    """rmdir `cg` and every cgroup below it, deepest first; True when gone."""
    for d, subdirs, _ in os.walk(cg, topdown=False):
        for s in subdirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(d, s))
    with contextlib.suppress(FileNotFoundError):
        try:
            os.rmdir(cg)
        except OSError:
            return False
    return True


def kill_tree(cg: Path, wait: float = EMPTY_WAIT) -> int:
    """cgroup.kill `cg` (with everything below it), wait for it to empty,
    remove it. How many processes it held."""
    if not cg.is_dir():
        return 0
    n = len(procs(cg))
    with contextlib.suppress(OSError):
        write(cg / "cgroup.kill", "1")
    deadline = time.monotonic() + wait
    while populated(cg) and time.monotonic() < deadline:
        time.sleep(0.01)
    remove_tree(cg)
    return n


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            pass
    return out
