"""One non-blocking read, for every reader in the Emperor's selector loop
(vassal pipes and output, status clients, template renderers, nginx's
output, test streams): the same three outcomes everywhere."""

from __future__ import annotations

import os
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
