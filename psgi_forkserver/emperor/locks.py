"""The Emperor's startup locks and its pidfile.

A second Emperor on the same vassals directory, fork-server socket or
pidfile would fight the first over ports and delete its pidfile: each is
flocked for as long as the Emperor runs (`claim`), and a second one refuses
to start with one line (`StartupError`).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterable
from pathlib import Path


class StartupError(Exception):
    """The Emperor cannot start (another one holds its directory, pidfile or
    fork-server socket; a path it cannot use): str() is the one line to print."""


def lock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file open as `fd` (from /proc/locks)."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" ("->" marks waiters)
                if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
                    continue
                if parts[5] == want:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def take_lock(path: Path, what: str, *, create: bool = False, directory: bool = False,
              shown: Path | None = None) -> int:
    """An exclusive flock on `path` (held until the Emperor exits: the
    descriptor is kept open); StartupError, naming `shown` (default: `path`),
    when another process holds it."""
    shown = path if shown is None else shown
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    if directory:
        flags |= os.O_DIRECTORY
    if create:
        flags |= os.O_CREAT
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise StartupError(f"{what} {shown}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        os.close(fd)
        by = f" (pid {holder})" if holder else ""
        raise StartupError(f"{what} {shown} is in use by another Emperor{by}: "
                           "not starting a second one")
    except OSError as e:
        os.close(fd)
        raise StartupError(f"{what} {shown}: cannot lock: {e.strerror or e}") from None
    return fd


def fork_server_lock_path(sock: Path) -> Path:
    """The lock file of a fork-server socket (a socket cannot be flocked
    before it exists, and every base generation's socket shares it)."""
    return sock.with_name(f".{sock.name}.lock")


def write_pidfile(path: Path, pid: int, lock: bool = False) -> int | None:
    """Write `pid` to `path` atomically, following no symlink.

    The temporary file is created with O_EXCL | O_NOFOLLOW: in a directory
    others may write to (/tmp, /run/user), a symlink planted at its
    (predictable) name makes this fail instead of overwriting the file it
    points to. os.replace() renames over `path` itself, never through a
    symlink there.
    """
    tmp = path.with_name(f".{path.name}.{pid}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{pid}\n".encode())
        if lock:
            # locked before it appears under its name: `reload-base` and a
            # second Emperor see a pidfile that is held, or a stale one
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    if not lock:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        if lock:
            os.close(fd)
        raise
    return fd if lock else None


def pidfile_is_held(path: Path) -> bool:
    """True when a running Emperor holds the lock on the pidfile `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def claim(vassals_dir: Path, fork_server_sockets: Iterable[Path],
          pidfile: Path | None) -> list[int]:
    """Lock the vassals directory, the fork-server sockets and the pidfile
    (then write it); the descriptors to keep open while the Emperor runs.
    StartupError (nothing left locked) when another Emperor holds one."""
    fds: list[int] = []
    try:
        fds.append(take_lock(vassals_dir, "vassals directory", directory=True))
        for sock in fork_server_sockets:
            if not sock.parent.is_dir():
                continue  # the base's config error (config.judge_options), not ours
            fds.append(take_lock(fork_server_lock_path(sock), "fork-server socket",
                                 create=True, shown=sock))
        if pidfile is not None:
            if os.path.lexists(pidfile) and not os.path.isdir(pidfile):
                try:
                    held = pidfile_is_held(pidfile)
                except OSError:
                    held = False  # a dangling symlink, say: replaced below
                if held:
                    raise StartupError(f"pidfile {pidfile} is held by a running Emperor "
                                       f"(pid {pidfile.read_text().strip()}): not starting a second one")
            try:
                fd = write_pidfile(pidfile, os.getpid(), lock=True)
            except OSError as e:
                raise StartupError(f"pidfile {pidfile}: {e.strerror or e}") from None
            assert fd is not None
            fds.append(fd)
    except StartupError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def remove_pidfile(pidfile: Path) -> None:
    """Our own pidfile only: a newer Emperor may have written it meanwhile."""
    try:
        if pidfile.read_text().strip() == str(os.getpid()):
            pidfile.unlink()
    except OSError:
        pass


class Claim:
    """What an Emperor holds while it runs: the flocks (`claim`) and its
    pidfile, taken once, before anything starts."""

    def __init__(self, vassals_dir: Path, fork_server_sockets: Callable[[], Iterable[Path]],
                 pidfile: Path | None) -> None:
        self.vassals_dir = vassals_dir
        self.fork_server_sockets = fork_server_sockets  # asked when taken: the files say
        self.pidfile = pidfile
        self.fds: list[int] = []

    def take(self) -> None:
        """Idempotent; StartupError is one line."""
        if not self.fds:
            self.fds = claim(self.vassals_dir, self.fork_server_sockets(), self.pidfile)

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def end(self) -> None:
        """Teardown: the pidfile removed (if still ours), the locks let go."""
        if self.pidfile is not None:
            remove_pidfile(self.pidfile)
        self.release()
