"""The stats socket and the status page's HTTP server, in the Emperor's selector.

Both are opt-in and live in the Emperor's own selector (no threads):

- `emperor run --stats PATH`: a UNIX socket (mode 0600). A client connects
  and gets one JSON document, then end of file; or sends one command line
  (`reload NAME`, `stop NAME`, `start NAME`, `reload-base`) and gets the
  reply. `emperor status` prints the document as a table (`--json`: as is).
- `emperor run --status-http 127.0.0.1:PORT`: a tiny HTTP/1.0 server, GET /
  is the live page (Jinja2, auto-escaped), /json the document, /metrics
  Prometheus' text, /healthz the loop's health, /log/NAME a vassal's lines.
  Loopback addresses only unless `--status-http-public` is given.

The server knows the Emperor only through the `EmperorLink` it is attached
with (snapshot.py): read-only snapshots, and the operator's commands. Its
listening sockets are bound by listen.py, its requests answered by
requests.py.
"""

from __future__ import annotations

import atexit
import errno
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..snapshot import EmperorLink, EmperorSnapshot
from .access import Access
from .document import BUDGET, SCHEMA, Collection
from .listen import bind_http, bind_unix
from .requests import Client, Requests, http_response, json_body

#: connections in progress; a client beyond that is refused with a message
#: (never dropped without a word, and never at the expense of one in progress)
MAX_CLIENTS = 256
CLIENT_TIMEOUT = 60.0
#: a client that does not read its document is dropped after this long, so
#: that clients that never read cannot keep the slots of those that do
WRITE_TIMEOUT = 10.0
#: accept() failed for lack of descriptors (EMFILE...): the listening socket
#: stays readable, so it leaves the selector this long instead of spinning
ACCEPT_PAUSE = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass
class StatusServer(Requests):
    """Listening sockets bound early (by the CLI, so errors come before
    anything starts); `attach` registers them in the Emperor's selector."""

    stats_path: Path | None = None
    http: str | None = None
    http_public: bool = False
    http_hosts: tuple[str, ...] = ()  # Host names answered besides the address's own
    http_token: bytes | None = None  # asked for on every path but /healthz
    max_clients: int = MAX_CLIENTS
    log: Callable[[str], None] = field(default=lambda m: print(f"emperor: {m}", file=sys.stderr))

    def __post_init__(self) -> None:
        self.link: EmperorLink | None = None
        self.sel: selectors.BaseSelector | None = None
        self.stats_sock: socket.socket | None = None
        self.http_sock: socket.socket | None = None
        self.clients: dict[int, Client] = {}
        self._stats_ino: tuple[int, int] | None = None
        self.requests = 0
        self.refused = 0
        self.evicted = 0  # HTTP clients closed before their request, to make room
        self.now = time.monotonic()  # the loop's clock, as last handed to a callback
        self.job: Collection | None = None
        self.waiters: list[tuple[Client, Callable[[dict[str, Any]], None]]] = []
        # registered for EVENT_WRITE while a collection runs: always ready,
        # so the loop comes back to us every turn (no timer needed)
        self._tick_r: socket.socket | None = None
        self._tick_w: socket.socket | None = None
        # listening sockets out of the selector after EMFILE: fd -> (sock, http, until)
        self.paused: dict[int, tuple[socket.socket, bool, float]] = {}
        self.deferred: set[int] = set()  # stats clients whose document waits (COMMAND_GRACE)

        self.access: Access | None = None

    def _defer(self, fd: int) -> None:
        """A stats client whose document waits out COMMAND_GRACE (requests.py)."""
        self.deferred.add(fd)

    def _undefer(self, fd: int) -> None:
        self.deferred.discard(fd)

    # -- set-up ------------------------------------------------------------------

    def bind(self) -> "StatusServer":
        try:
            if self.stats_path is not None:
                self.stats_path = Path(os.path.abspath(self.stats_path))
                try:
                    self.stats_sock, self._stats_ino = bind_unix(self.stats_path)
                except OSError as e:  # one line naming the option and the path
                    why = e.strerror or str(e)
                    if str(self.stats_path) not in why:
                        why = f"{self.stats_path}: {why}"
                    raise OSError(e.errno, f"--stats {why}") from None
            if self.http is not None:
                self.http_sock, sockaddr = bind_http(self.http, self.http_public)
                self.access = Access.for_address(sockaddr, self.http_hosts, self.http_token)
        except Exception:
            self.close()
            raise
        atexit.register(self.close)
        return self

    def attach(self, sel: selectors.BaseSelector, log: Callable[[str], None],
               link: EmperorLink) -> None:
        """Register in the Emperor's selector (callbacks get `now`); all
        this server knows of the Emperor comes through `link`."""
        self.sel = sel
        self.log = log
        self.link = link
        if self.stats_sock is not None:
            self.sel.register(self.stats_sock, selectors.EVENT_READ,
                              lambda now: self._accept(self.stats_sock, now, http=False))
            self.log(f"stats socket {self.stats_path}")
        if self.http_sock is not None:
            self.sel.register(self.http_sock, selectors.EVENT_READ,
                              lambda now: self._accept(self.http_sock, now, http=True))
            host, port = self.http_sock.getsockname()[:2]
            self.log(f"status page http://{'[%s]' % host if ':' in host else host}:{port}/")

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        for s in (self.stats_sock, self.http_sock):
            if s is None:
                continue
            if self.sel is not None:
                try:
                    self.sel.unregister(s)
                except Exception:  # noqa: BLE001 - KeyError, or a closed selector
                    pass
            s.close()
        self.stats_sock = self.http_sock = None
        self.paused.clear()
        for t in (self._tick_r, self._tick_w):
            if t is not None:
                t.close()
        self._tick_r = self._tick_w = None
        self.job = None
        self.waiters.clear()
        if self.stats_path is not None and self._stats_ino is not None:
            try:
                st = os.stat(self.stats_path)
                if (st.st_dev, st.st_ino) == self._stats_ino:  # still ours
                    os.unlink(self.stats_path)
            except OSError:
                pass
            self._stats_ino = None

    # -- connections ------------------------------------------------------------------

    def _accept(self, lsock: socket.socket | None, now: float, http: bool) -> None:
        if lsock is None:
            return
        self.now = now
        self._expire(now)
        for _ in range(MAX_CLIENTS):
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    self._pause(lsock, http, now, e)
                    return
                self.log(f"status: accept: {e}")
                return
            conn.setblocking(False)
            if len(self.clients) >= self.max_clients and not (http and self._evict_idle()):
                self._refuse(conn, http)
                continue
            c = Client(conn, now + CLIENT_TIMEOUT, accepted=now, http=http)
            self.clients[conn.fileno()] = c
            try:
                if http:
                    self.sel.register(conn, selectors.EVENT_READ,
                                      lambda t, fd=conn.fileno(): self._readable(fd, t, True))
                    # its request is usually there already: a probe's /healthz
                    # is answered now, not a loop turn later behind page work
                    self._on_http_readable(conn.fileno(), now)
                else:
                    # a line first is a command (see _on_stats_readable);
                    # nothing yet: the document, as a plain reader expects
                    self.sel.register(conn, selectors.EVENT_READ,
                                      lambda t, fd=conn.fileno(): self._readable(fd, t, False))
                    if not self._on_stats_readable(conn.fileno(), now):
                        self._when_ready(c, lambda doc, c=c: self._send_doc(c, doc))
            except Exception as e:  # noqa: BLE001 - never take the Emperor down
                self.log(f"status: {type(e).__name__}: {e}")
                self._drop(conn.fileno())

    def _readable(self, fd: int, now: float, http: bool) -> None:
        self.now = now
        if http:
            self._on_http_readable(fd, now)
        else:
            self._on_stats_readable(fd, now)

    def _evict_idle(self) -> bool:
        """Make room by closing the oldest HTTP client that has not sent its
        whole request yet. Any local process can connect to a loopback port
        and say nothing; were such connections kept in preference to new
        ones, a few hundred of them would refuse every probe of /healthz
        (and a liveness probe would restart the fleet). A client that has
        asked is never dropped for a newcomer."""
        for fd, c in self.clients.items():  # oldest first
            if c.http and not c.asked and c.out is None:
                self._drop(fd)
                self.evicted += 1
                if self.evicted == 1 or self.evicted % 100 == 0:
                    self.log(f"status: closed a connection that sent no request, to make room "
                             f"({self.evicted} so far)")
                return True
        return False

    def _refuse(self, conn: socket.socket, http: bool) -> None:
        """Too many clients: say so in what fits the socket buffer, close."""
        why = f"too many status clients ({self.max_clients} in progress); try again"
        data = (http_response(503, "text/plain", why.encode() + b"\n") if http
                else json_body({"schema": SCHEMA, "error": why}))
        try:
            conn.send(data)
        except OSError:
            pass
        conn.close()
        self.refused += 1
        if self.refused == 1 or self.refused % 100 == 0:
            self.log(f"status: {why} ({self.refused} refused so far)")

    def _pause(self, lsock: socket.socket, http: bool, now: float, e: OSError) -> None:
        """Out of descriptors: stop accepting for ACCEPT_PAUSE seconds (the
        clients wait in the backlog) rather than spin on a readable socket."""
        try:
            self.sel.unregister(lsock)
        except (KeyError, ValueError):
            pass
        self.paused[lsock.fileno()] = (lsock, http, now + ACCEPT_PAUSE)
        self.log(f"status: accept: {e.strerror or e}; not accepting for {ACCEPT_PAUSE:g} s")

    def _snapshot(self) -> EmperorSnapshot:
        assert self.link is not None, "attach() first"
        return self.link.snapshot()

    def next_wakeup(self) -> float | None:
        """When poll() has something to do (the Emperor's loop asks)."""
        times = [until for _, _, until in self.paused.values()]
        grace = self._deferred_wakeup()
        return min(times + ([grace] if grace is not None else []), default=None)

    def poll(self, now: float) -> None:
        """Called every turn of the Emperor's loop: resume paused sockets,
        send the documents held for COMMAND_GRACE."""
        self.now = now
        if self.deferred:
            self._send_deferred(now)
        for fd, (lsock, http, until) in list(self.paused.items()):
            if now < until:
                continue
            del self.paused[fd]
            if lsock.fileno() < 0:
                continue
            self.sel.register(lsock, selectors.EVENT_READ,
                              lambda t, s=lsock, h=http: self._accept(s, t, http=h))

    # -- the collection in progress ----------------------------------------------------

    def _when_ready(self, c: Client, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call back with the next document for client `c`; requests
        arriving meanwhile share the collection in progress."""
        self.requests += 1
        self.waiters.append((c, callback))
        if self.job is not None:
            return
        self.job = Collection(self._snapshot())
        if self._tick_w is None:
            self._tick_r, self._tick_w = socket.socketpair()
        self.sel.register(self._tick_w, selectors.EVENT_WRITE, self._tick)

    def _collect_again(self) -> None:
        """A collection in progress took its snapshot before a command: whoever
        waits on it (or joins it) sees the state after it."""
        if self.job is not None:
            self.job = Collection(self._snapshot())

    def _tick(self, now: float) -> None:
        self.now = now
        job = self.job
        try:
            if job is not None and not job.step(BUDGET):
                return
        except Exception as e:  # noqa: BLE001
            self.log(f"status: {type(e).__name__}: {e}")
        try:
            self.sel.unregister(self._tick_w)
        except Exception:  # noqa: BLE001
            pass
        self.job = None
        waiters, self.waiters = self.waiters, []
        if job is None:
            return
        try:
            doc = job.document()
        except Exception as e:  # noqa: BLE001
            self.log(f"status: {type(e).__name__}: {e}")
            doc = None
        for c, cb in waiters:
            try:
                if doc is None:
                    raise RuntimeError("no status document")
                cb(doc)
            except Exception as e:  # noqa: BLE001
                self.log(f"status: {type(e).__name__}: {e}")
                self._failed(c)
        self._expire(now)

    def _failed(self, c: Client) -> None:
        """Its answer could not be made: say so, rather than leave the
        client waiting for a reply that will not come."""
        if self.clients.get(c.sock.fileno()) is not c or c.out is not None:
            return
        self._respond(c, http_response(500, "text/plain", b"internal error\n") if c.http
                      else json_body({"schema": SCHEMA, "error": "internal error"}))

    def _respond(self, c: Client, data: bytes) -> None:
        fd = c.sock.fileno()
        if self.clients.get(fd) is not c:
            return  # dropped (timeout, too many clients) while it waited
        c.answer(data, self.now + WRITE_TIMEOUT)
        self._flush(fd)
        if fd in self.clients:
            try:
                self.sel.modify(c.sock, selectors.EVENT_WRITE, lambda t, fd=fd: self._flush(fd))
            except KeyError:
                self.sel.register(c.sock, selectors.EVENT_WRITE, lambda t, fd=fd: self._flush(fd))

    def _flush(self, fd: int) -> None:
        c = self.clients.get(fd)
        if c is None or c.out is None:
            return
        while c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                break
            c.sent(n)
        self._drop(fd)

    def _expire(self, now: float) -> None:
        for fd, c in list(self.clients.items()):
            if now >= c.deadline:
                self._drop(fd)

    def _drop(self, fd: int) -> None:
        c = self.clients.pop(fd, None)
        if c is None:
            return
        if self.sel is not None:
            try:
                self.sel.unregister(c.sock)
            except Exception:  # noqa: BLE001 - KeyError, or a closed selector
                pass
        c.sock.close()
