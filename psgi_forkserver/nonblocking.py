"""One non-blocking read, for every reader in the Emperor's selector loop
(vassal pipes and output, status clients, template renderers, nginx's
output, test streams): the same three outcomes everywhere."""

from __future__ import annotations

import os
import selectors
import signal
import socket


def recv_ready(sock: socket.socket | int, size: int = 65536) -> bytes | None:
    """One non-blocking read of a socket (or a pipe's descriptor) the
    selector said was readable: None when nothing is there after all, b""
    at end of file or on an error (the peer is gone either way), else the
    bytes."""
    try:
        return os.read(sock, size) if isinstance(sock, int) else sock.recv(size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def drain(sock: socket.socket) -> None:
    """Read a non-blocking socket empty (a signal wake-up's bytes: they
    only say "look again")."""
    while recv_ready(sock, 4096):
        pass


class SignalWakeup:
    """A selector that every signal wakes (SIGCHLD included, with a no-op
    handler so that it is delivered): the wake-up descriptor's socket is
    registered with data None; `drain` empties it, `close` puts back what
    was there before."""

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)
        self.old_fd = signal.set_wakeup_fd(self.w.fileno())
        self.old_chld = signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.r, selectors.EVENT_READ, None)

    def drain(self) -> None:
        drain(self.r)

    def close(self) -> None:
        self.sel.close()
        signal.signal(signal.SIGCHLD, self.old_chld)
        signal.set_wakeup_fd(self.old_fd)
        self.r.close()
        self.w.close()
