"""Emperor-owned listening sockets.

The Emperor binds each vassal's `http-socket` itself and passes it to every
process of that vassal (mask 0x04: descriptor 0 of the vassal). The socket
outlives the vassal's processes, so a restart or a reload never closes the
port: the kernel queues connections while no process accepts. An on-demand
vassal's socket waits in the Emperor's selector for its first connection
(`Listeners.watch`).
"""

from __future__ import annotations

import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class Listeners:
    """The Emperor's listening sockets, one per vassal by name."""

    sel: selectors.BaseSelector
    log: Callable[[str, str | None], None]
    by_name: dict[str, Listener] = field(default_factory=dict)
    bind_errors: dict[str, str] = field(default_factory=dict)  # last logged, per vassal
    watched: set[str] = field(default_factory=set)  # on-demand: in the selector

    def get(self, name: str, cfg) -> tuple[str | None, Listener | None]:
        """(error, listener) for starting a process of the vassal `name`
        with config `cfg`: its socket, bound now if its address changed;
        (None, None) when it has no http-socket; the error (logged once)
        when it cannot be bound."""
        want = wanted_address(cfg)
        if want is None:
            return None, None
        addr, backlog = want
        old = self.by_name.get(name)
        if old is not None and old.addr == addr and old.backlog == backlog:
            return None, old
        try:
            sock = bind_listener(addr, backlog)
        except (OSError, ValueError) as e:
            msg = f"cannot bind http-socket {addr}: {getattr(e, 'strerror', None) or e}"
            if self.bind_errors.get(name) != msg:
                self.log(msg, name)
            self.bind_errors[name] = msg
            return msg, None
        self.bind_errors.pop(name, None)
        if old is not None:
            self.close(name)
            self.log(f"address changed: {old.addr} closed, {addr} bound", name)
        lst = Listener(addr, backlog, sock)
        self.by_name[name] = lst
        return None, lst

    def watch(self, name: str, lst: Listener, callback: object) -> None:
        """Wait for a connection on it (an on-demand vassal with no process)."""
        self.sel.register(lst.sock, selectors.EVENT_READ, callback)
        self.watched.add(name)

    def unwatch(self, name: str) -> None:
        if name in self.watched:
            self.watched.discard(name)
            lst = self.by_name.get(name)
            if lst is not None:
                try:
                    self.sel.unregister(lst.sock)
                except (KeyError, ValueError):
                    pass

    def close(self, name: str) -> None:
        self.unwatch(name)
        lst = self.by_name.pop(name, None)
        if lst is not None:
            lst.close()

    def forget(self, name: str) -> None:
        self.close(name)
        self.bind_errors.pop(name, None)

    def close_all(self) -> None:
        for name in list(self.by_name):
            self.close(name)
