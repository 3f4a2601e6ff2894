"""Fork-server client: ask a base vassal to fork ("adopt") a vassal.

An adoption is: connect to the fork server's UNIX socket, ONE sendmsg() with
the array packet (modifier1 35, modifier2 = descriptor mask) and SCM_RIGHTS
[pipe, config pipe?, on-demand socket?, cgroup directory?], then read the
dict reply {"pid": N} (and "cgroup": "1" when the vassal was born there). Nothing here blocks: `PendingAdoption` is a non-blocking socket
that the Emperor registers in its selector and feeds when it is readable;
the Emperor fails it when its deadline passes.
"""

from __future__ import annotations

import array
import errno
import os
import selectors
import socket
import struct
import time
from collections.abc import Sequence
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from . import protocol
from .protocol import PacketReader, ProtocolError


class AdoptionError(Exception):
    """The adoption failed: no pid will come."""


class PendingAdoption:
    """An adoption request in flight; complete it with on_readable().
    (A plain class, not a dataclass: `emperor prove` adopts its test
    files, and dataclasses costs its start ~15 ms of CPU.)"""

    def __init__(self, sock: socket.socket, deadline: float, started: float | None = None,
                 reader: PacketReader | None = None) -> None:
        self.sock = sock
        self.deadline = deadline
        self.started = time.monotonic() if started is None else started
        self.reader = PacketReader() if reader is None else reader
        self.pid: int | None = None
        self.born_in_cgroup = False  # the reply says so (the request's MASK_CGROUP)

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> int | None:
        """Read what is there. Returns the pid once the reply is whole,
        None if more is needed; raises AdoptionError on EOF or bad bytes."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise AdoptionError(f"reading the reply: {e.strerror or e}") from e
        if not data:
            raise AdoptionError(
                "fork server closed the connection without a pid"
                if not self.reader.pending
                else f"truncated reply ({self.reader.pending} bytes)"
            )
        try:
            packet = self.reader.feed(data)
            if packet is None:
                return None
            self.pid = protocol.parse_pid_reply(packet)
            self.born_in_cgroup = protocol.reply_born_in_cgroup(packet)
        except ProtocolError as e:
            raise AdoptionError(f"bad reply: {e}") from e
        return self.pid

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def elapsed_ms(self, now: float | None = None) -> float:
        return ((now if now is not None else time.monotonic()) - self.started) * 1000

    def close(self) -> None:
        self.sock.close()


def start_adoption(
    path: str | os.PathLike[str],
    argv: Sequence[str],
    pipe_fd: int,
    config_fd: int | None = None,
    on_demand_fd: int | None = None,
    timeout: float = 10.0,
    cgroup_fd: int | None = None,
) -> PendingAdoption:
    """Connect and send the request without blocking. `cgroup_fd`: a
    cgroup (v2) directory for our own base to clone the vassal into (a
    uWSGI fork server would refuse the mask bit: never send it one).

    The caller still owns the descriptors it passed and may close its copies
    once this returns (the request holds its own references in the kernel).
    """
    fds = [pipe_fd]
    mask = protocol.MASK_PIPE
    if config_fd is not None:
        fds.append(config_fd)
        mask |= protocol.MASK_CONFIG
    if on_demand_fd is not None:
        fds.append(on_demand_fd)
        mask |= protocol.MASK_ON_DEMAND
    if cgroup_fd is not None:
        fds.append(cgroup_fd)
        mask |= protocol.MASK_CGROUP
    try:
        data = protocol.adoption_request(argv, mask)
    except ProtocolError as e:
        raise AdoptionError(str(e)) from e
    started = time.monotonic()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as e:  # out of descriptors (EMFILE, ENFILE)
        raise AdoptionError(f"fork server {os.fspath(path)}: {e.strerror or e}") from e
    sock.setblocking(False)
    try:
        # A UNIX stream connect either completes at once or fails (EAGAIN
        # when the backlog is full): it never leaves us waiting.
        sock.connect(os.fspath(path))
        stranger = _stranger(sock)
        if stranger is not None:
            raise AdoptionError(f"fork server {os.fspath(path)}: {stranger}: refused, nothing sent")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
        if sent != len(data):
            raise AdoptionError(f"short send: {sent} of {len(data)} bytes")
    except OSError as e:
        sock.close()
        raise AdoptionError(f"fork server {os.fspath(path)}: {e.strerror or e}") from e
    except AdoptionError:
        sock.close()
        raise
    return PendingAdoption(sock=sock, deadline=started + timeout, started=started)


def _stranger(sock: socket.socket) -> str | None:
    """Who listens on the fork server's socket when it is neither root nor
    our own user (SO_PEERCRED: the listener's ids when it listened); None
    when it is one of them. A socket path in a directory others may write
    (/tmp) can be taken by any local user before the base binds it: the
    request's descriptors (a vassal's listening socket, its Emperor and
    config pipes) must not go to them."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return None if uid in (0, os.geteuid()) else f"listened on by pid {pid}, uid {uid}, not by our user"


def adopt(*args: Any, **kwargs: Any) -> int:
    """start_adoption() (the same arguments), then wait for the pid: the
    blocking form, for tools and tests."""
    pending = start_adoption(*args, **kwargs)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(pending.sock, selectors.EVENT_READ)
            while True:
                left = pending.deadline - time.monotonic()
                if left <= 0:
                    raise AdoptionError(f"no reply within {pending.deadline - pending.started:g} s")
                if sel.select(left):
                    pid = pending.on_readable()
                    if pid is not None:
                        return pid
    finally:
        pending.close()


def probe(path: str | os.PathLike[str]) -> bool:
    """True when something accepts connections on the UNIX socket `path`.

    Used to learn that a base vassal which sends no byte 1 (uWSGI's) is
    ready. The connection is closed at once without sending anything.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        sock.connect(os.fspath(path))
        return _stranger(sock) is None  # someone else's is not our base
    except BlockingIOError:
        return True  # listening, backlog full: it is up
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.EACCES):
            return False
        return False
    finally:
        sock.close()
