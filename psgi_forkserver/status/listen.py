"""The status server's listening sockets: the stats socket (UNIX, 0600)
and the status page's address (loopback unless public), bound before
anything starts so that a bad option fails with one line."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from pathlib import Path

#: the listen backlog: a burst of clients (a dashboard, scrapers) beyond it
#: has its SYN dropped, and a probe caught in it waits a whole second for
#: the retransmission (the kernel caps it at net.core.somaxconn)
BACKLOG = 1024


class StatusConfigError(ValueError):
    pass


def parse_http_address(addr: str, public: bool = False) -> tuple[int, tuple]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (loopback) -> (family, sockaddr).
    Refuses non-loopback addresses unless `public`."""
    host, sep, port_s = addr.rpartition(":")
    if not sep or not port_s.isdigit():
        raise StatusConfigError(f"{addr!r}: expected HOST:PORT")
    port = int(port_s)
    if not 1 <= port <= 65535:
        # getaddrinfo() would take 99999 and bind() serve it on another port
        raise StatusConfigError(f"{addr!r}: port {port} out of range (1-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise StatusConfigError(f"{addr!r}: {e.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
    if not public and not ip.is_loopback:
        raise StatusConfigError(
            f"{addr!r} is not a loopback address; the status page is unauthenticated "
            "(use --status-http-public to serve it there anyway)"
        )
    return family, sockaddr


def bind_http(addr: str, public: bool) -> tuple[socket.socket, tuple]:
    """The status page's socket, listening, non-blocking, and its address."""
    family, sockaddr = parse_http_address(addr, public)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(sockaddr)
        s.listen(BACKLOG)
    except OSError as e:
        s.close()
        raise OSError(e.errno, f"--status-http {addr}: {e.strerror or e}") from None
    s.setblocking(False)
    return s, sockaddr


def bind_unix(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """The stats socket, born 0600, listening; a stale socket file is
    replaced, a live one or another file refused. With the file's
    (device, inode), so that closing removes it only while it is ours."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                os.unlink(path)  # stale: nobody listens
            else:
                raise OSError(errno.EADDRINUSE, f"{path}: another process serves it")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: no window where others may connect
    try:
        s.bind(str(path))
    except OSError:
        s.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(BACKLOG)
    s.setblocking(False)
    st = os.stat(path)
    return s, (st.st_dev, st.st_ino)
