"""Emperor-owned listening sockets.

The Emperor binds each vassal's `http-socket` itself and passes it to every
process of that vassal (mask 0x04: descriptor 0 of the vassal). The socket
outlives the vassal's processes, so a restart or a reload never closes the
port: the kernel queues connections while no process accepts.

An address is TCP (`HOST:PORT`) or a UNIX socket path (anything with a
`/` or without a `:`). A vassal with `domain` and no `http-socket` gets a UNIX socket under
the Emperor's run directory (`auto_socket_path`): the front door reaches it
by name, no port is spent on it. An on-demand
vassal's socket waits in the Emperor's selector for its first connection
(`Listeners.watch`).
"""

from __future__ import annotations

import hashlib
import errno
import os
import re
import select
import selectors
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: mode of the UNIX sockets the Emperor creates: the vassal's user and group
#: (the front door's nginx runs as one of them) may connect, nobody else
UNIX_MODE = 0o660
#: longest path a sockaddr_un holds (108 bytes with the final NUL)
MAX_UNIX_PATH = 107


def is_unix_address(addr: str) -> bool:
    """A UNIX socket path rather than HOST:PORT: it has a `/`, or no `:`
    (uWSGI's rule: `app.sock` is a path)."""
    return "/" in addr or ":" not in addr


def auto_socket_path(socket_dir: Path, name: str) -> Path:
    """The socket of a vassal that has `domain` and no `http-socket`. A name
    that would not fit in a sockaddr_un (or is not a plain file name) is
    replaced by its hash."""
    safe = name if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) else ""
    path = socket_dir / f"{safe}.sock"
    if not safe or len(os.fsencode(str(path))) > MAX_UNIX_PATH:
        path = socket_dir / f"h-{hashlib.sha256(name.encode()).hexdigest()[:16]}.sock"
    return path


def _stale_unix_socket(path: str) -> bool:
    """True when `path` is a socket file nobody listens on (left by a
    process that died): it may be replaced. A live one is somebody's."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(17, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False
    finally:
        probe.close()
    raise OSError(98, f"{path}: another process listens on it")


def set_socket_file(path: str, mode: int | None, uid: int | None = None,
                    gid: int | None = None) -> None:
    """chmod (and, as root, chown) the socket file just bound at `path`,
    never what replaced it: whoever may write the socket's directory (a
    tenant's own `http-socket = /srv/alice/app.sock`) could rename a
    symlink to a root file over it between bind() and a chmod by path,
    which follows it. The file is opened without following links
    (O_PATH | O_NOFOLLOW), must be a socket, and is changed through its
    descriptor."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.EEXIST, f"{path} was replaced by another file while bound")
        via = f"/proc/self/fd/{fd}"  # the inode the descriptor holds, not a path
        if mode is not None:
            os.chmod(via, mode)
        if (uid is not None or gid is not None) and os.geteuid() == 0:
            os.chown(via, -1 if uid is None else uid, -1 if gid is None else gid)
    finally:
        os.close(fd)


def bind_unix_listener(path: str, backlog: int = 1024, uid: int | None = None,
                       gid: int | None = None, mode: int = UNIX_MODE) -> socket.socket:
    """A listening UNIX stream socket at `path`, mode `mode`, owned by
    uid/gid (when given and we may chown), close-on-exec. A stale socket
    file at `path` is replaced; a live one or another file is an error."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise OSError(36, f"{path}: longer than a UNIX socket path may be ({MAX_UNIX_PATH} bytes)")
    if _stale_unix_socket(path):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        try:
            # before listen(): nobody can connect until the mode is right
            set_socket_file(path, mode, uid, gid)
            s.listen(backlog)
        except BaseException:
            os.unlink(path)
            raise
    except BaseException:
        s.close()
        raise
    return s

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


def bind_listener(addr: str, backlog: int = DEFAULT_BACKLOG, uid: int | None = None,
                  gid: int | None = None) -> socket.socket:
    """A listening socket, close-on-exec: TCP with SO_REUSEADDR, or a UNIX
    socket (bind_unix_listener, owned by uid/gid) when `addr` is a path."""
    if is_unix_address(addr):
        return bind_unix_listener(addr, backlog, uid, gid)
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


#: connections answered per readable event (the rest: the next loop turn)
ANSWER_BATCH = 64


def answer_unavailable(lst: "Listener", why: str, retry_after: int | None) -> int:
    """Accept what waits in `lst`'s backlog and answer each connection
    `503 Service Unavailable` (raw HTTP: what a `socket` vassal answers
    too, uwsgi's replies being HTTP), then close it. The listener stays
    blocking (a vassal shares it), so each accept follows a zero-timeout
    poll. Returns how many were answered."""
    body = f"psgi-forkserver: {why}\n".encode()
    head = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
            + (f"Retry-After: {retry_after}\r\n".encode() if retry_after else b"")
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
    n = 0
    poller = select.poll()
    poller.register(lst.sock, select.POLLIN)
    while n < ANSWER_BATCH and poller.poll(0):
        try:
            conn, _ = lst.sock.accept()
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break  # out of descriptors and the like: the next turn tries again
        n += 1
        with conn:
            conn.setblocking(False)
            try:
                # what the client sent first: closing a UNIX socket with
                # unread bytes makes the peer's read fail before our reply
                # (a few reads: a client that keeps sending cannot hold the loop)
                for _ in range(4):
                    if not conn.recv(65536):
                        break
            except OSError:
                pass
            try:
                conn.send(head + body)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
    return n


@dataclass
class Listener:
    addr: str
    backlog: int
    sock: socket.socket
    owner: tuple[int | None, int | None] = (None, None)  # UNIX socket: uid, gid

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        if is_unix_address(self.addr):
            # the Emperor is the only binder of its vassals' paths, and it
            # closes an old listener before binding the same path again
            try:
                if stat.S_ISSOCK(os.lstat(self.addr).st_mode):
                    os.unlink(self.addr)
            except OSError:
                pass
        self.sock.close()


def wanted_address(cfg, socket_dir: Path | None = None) -> tuple[str, int] | None:
    """(address, backlog) of a vassal config, or None: its `http-socket` or
    its `socket` (uwsgi protocol), a relative UNIX path against the vassals
    directory; else, when it has a `domain`, a UNIX socket in `socket_dir`."""
    addr = (cfg.get("http-socket") or cfg.get("socket")) if cfg is not None else None
    if addr and is_unix_address(addr) and not os.path.isabs(addr):
        addr = str((cfg.path.parent / addr).resolve())
    if not addr and cfg is not None and socket_dir is not None and cfg.get("domain"):
        addr = str(auto_socket_path(socket_dir, cfg.name))
    if not addr:
        return None
    try:
        backlog = int(cfg.get("listen") or DEFAULT_BACKLOG)
    except ValueError:
        backlog = DEFAULT_BACKLOG
    return addr, backlog


def socket_owner(cfg, front_gid: int | None = None) -> tuple[int | None, int | None]:
    """uid, gid a vassal's UNIX socket belongs to: `chown-socket`, else
    its `uid`/`gid`; the group is `front_gid` (the front door's nginx
    workers') for a vassal with `domain` whose `chown-socket` names none,
    so that nginx reaches it (mode 0660) and nobody else does."""
    from . import config as cfgmod

    chown = cfg.get("chown-socket")
    if chown:
        try:
            uid, gid = cfgmod.parse_owner(chown)
            if gid is None and front_gid is not None and cfg.get("domain"):
                gid = front_gid
            return uid, gid
        except ValueError:
            pass
    out: list[int | None] = []
    for key, conv in (("uid", cfgmod.CHECKERS["user"]), ("gid", cfgmod.CHECKERS["group"])):
        raw = cfg.get(key)
        try:
            out.append(int(conv(raw)) if raw else None)  # type: ignore[arg-type]
        except ValueError:
            out.append(None)
    if front_gid is not None and cfg.get("domain"):
        out[1] = front_gid
    return out[0], out[1]


@dataclass
class Listeners:
    """The Emperor's listening sockets, one per vassal by name."""

    sel: selectors.BaseSelector
    log: Callable[[str, str | None], None]
    by_name: dict[str, Listener] = field(default_factory=dict)
    bind_errors: dict[str, str] = field(default_factory=dict)  # last logged, per vassal
    watched: set[str] = field(default_factory=set)  # on-demand: in the selector
    answering: set[str] = field(default_factory=set)  # nobody accepts: the Emperor answers 503
    front_gid: int | None = None  # the front door's nginx workers' group (socket_owner)

    def get(self, name: str, cfg, socket_dir: Path | None = None
            ) -> tuple[str | None, Listener | None]:
        """(error, listener) for starting a process of the vassal `name`
        with config `cfg`: its socket, bound now if its address (or a UNIX
        socket's owner) changed; (None, None) when it has none; the error
        (logged once) when it cannot be bound."""
        want = wanted_address(cfg, socket_dir)
        if want is None:
            return None, None
        addr, backlog = want
        owner = socket_owner(cfg, self.front_gid) if is_unix_address(addr) else (None, None)
        old = self.by_name.get(name)
        if old is not None and old.addr == addr and old.backlog == backlog \
                and old.owner == owner:
            return None, old
        if old is not None and old.addr == addr:
            self.close(name)  # the same path, bound anew
            old = None
        try:
            sock = bind_listener(addr, backlog, *owner)
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
        if is_unix_address(addr):
            mode = cfg.get("chmod-socket")
            if mode:
                try:
                    set_socket_file(addr, int(mode, 8))
                except (OSError, ValueError):
                    pass
        lst = Listener(addr, backlog, sock, owner)
        self.by_name[name] = lst
        return None, lst

    def watch(self, name: str, lst: Listener, callback: object) -> None:
        """Wait for a connection on it (an on-demand vassal with no process)."""
        self._select(name, lst, callback, self.watched)

    def unwatch(self, name: str) -> None:
        self._unselect(name, self.watched)

    def answer(self, name: str, lst: Listener, callback: object) -> None:
        """Its connections are the Emperor's to answer (answer_unavailable)."""
        self._select(name, lst, callback, self.answering)

    def unanswer(self, name: str) -> None:
        self._unselect(name, self.answering)

    def _select(self, name: str, lst: Listener, callback: object, why: set[str]) -> None:
        self.sel.register(lst.sock, selectors.EVENT_READ, callback)
        why.add(name)

    def _unselect(self, name: str, why: set[str]) -> None:
        if name in why:
            why.discard(name)
            lst = self.by_name.get(name)
            if lst is not None:
                try:
                    self.sel.unregister(lst.sock)
                except (KeyError, ValueError):
                    pass

    def close(self, name: str) -> None:
        self.unwatch(name)
        self.unanswer(name)
        lst = self.by_name.pop(name, None)
        if lst is not None:
            lst.close()

    def forget(self, name: str) -> None:
        self.close(name)
        self.bind_errors.pop(name, None)

    def close_all(self) -> None:
        for name in list(self.by_name):
            self.close(name)
