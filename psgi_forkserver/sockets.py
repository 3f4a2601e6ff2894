"""Emperor-owned listening sockets.

The Emperor binds each vassal's `http-socket` itself and passes it to every
process of that vassal (mask 0x04: descriptor 0 of the vassal). The socket
outlives the vassal's processes, so a restart or a reload never closes the
port: the kernel queues connections while no process accepts.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

DEFAULT_BACKLOG = 1024


def parse_address(addr: str) -> tuple[str, int]:
    """`127.0.0.1:9101`, `[::1]:9101`, `:9101` (all addresses: host "")."""
    addr = addr.strip()
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {addr!r}")
    else:
        host, sep, port = addr.rpartition(":")
        if not sep:
            raise ValueError(f"bad address {addr!r} (HOST:PORT)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {addr!r}")
    return host, int(port)


def bind_listener(addr: str, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A listening TCP socket, SO_REUSEADDR, close-on-exec."""
    host, port = parse_address(addr)
    if host == "":
        try:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            host = "::"
        except OSError:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            host = "0.0.0.0"
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(backlog)
        # left blocking: O_NONBLOCK would be shared with every vassal's copy;
        # the Emperor never accepts, it only selects for readability
    except BaseException:
        s.close()
        raise
    assert not s.get_inheritable()  # Python sockets are close-on-exec
    return s


@dataclass
class Listener:
    addr: str
    backlog: int
    sock: socket.socket

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def wanted_address(cfg) -> tuple[str, int] | None:
    """(http-socket, backlog) of a vassal config, or None."""
    addr = cfg.get("http-socket") if cfg is not None else None
    if not addr:
        return None
    try:
        backlog = int(cfg.get("listen") or DEFAULT_BACKLOG)
    except ValueError:
        backlog = DEFAULT_BACKLOG
    return addr, backlog
