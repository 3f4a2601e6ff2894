"""What the status server's clients ask, and its answers.

The stats socket: the document, or one command line (passed to the
Emperor through the `EmperorLink`). HTTP: /, /json, /metrics, /healthz,
/log/NAME. A mixin of `server.StatusServer` (its clients, selector, clock and
collection in progress live there, and only server.py changes them).
"""

from __future__ import annotations

import json
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..nonblocking import recv_ready
from ..metrics import render as render_metrics
from .document import SCHEMA
from ..printable import printable
from .page import render_html


MAX_REQUEST = 8192
#: a stats client that neither sent a line nor shut its side gets its
#: document this long after it connected, not before: a command written
#: right after connect() is not taken for a plain read (the document comes
#: in the loop's next turn, now that process figures are reused)
COMMAND_GRACE = 0.05


@dataclass
class Client:
    """One connection to the stats socket or to the status HTTP listener, while it is served."""

    sock: socket.socket
    deadline: float
    inbuf: bytes = b""
    out: memoryview | None = None
    command: bool = False  # stats socket: it sent a command line (no document then)
    accepted: float = 0.0  # when it was accepted (the loop's clock)
    eof: bool = False  # stats socket: it shut its side: a plain reader, no command coming
    doc: bytes | None = None  # its document, held until COMMAND_GRACE has passed
    http: bool = False  # a client of the status page (else of the stats socket)
    asked: bool = False  # HTTP: its whole request came (it is no longer idle)

    def answer(self, data: bytes, until: float) -> None:
        """Its reply, to be written by `until` (else it is dropped)."""
        self.out = memoryview(data)
        self.deadline = min(self.deadline, until)

    def sent(self, n: int) -> None:
        assert self.out is not None
        self.out = self.out[n:]


class Requests:
    """Reading requests and answering them (a mixin of StatusServer)."""

    #: the document last rendered, and its renderings by kind: every client
    #: waiting on one collection gets the same bytes, made once (a /metrics
    #: page of 40 vassals costs about 20 ms to make; 100 clients, 2 s)
    _rendered_doc: dict[str, Any] | None = None
    _rendered: dict[str, bytes] = {}
    misdirected: int = 0  # requests refused for their Host (421)

    def _once(self, doc: dict[str, Any], kind: str, make: Callable[[], bytes]) -> bytes:
        if self._rendered_doc is not doc:
            self._rendered_doc, self._rendered = doc, {}
        out = self._rendered.get(kind)
        if out is None:
            out = self._rendered[kind] = make()
        return out

    def _misdirected(self, host: str | None) -> None:
        self.misdirected += 1
        if self.misdirected == 1 or self.misdirected % 100 == 0:
            self.log(f"status page: refused Host \"{printable(host or '')}\" with 421 "
                     f"({self.misdirected} so far; --status-http-host names more)")

    def _send_doc(self, c: Client, doc: dict[str, Any]) -> None:
        if c.command:
            return
        data = self._once(doc, "json", lambda: json_body(doc))
        if c.eof or self.now >= c.accepted + COMMAND_GRACE:
            self._respond(c, data)
        else:
            c.doc = data
            self._defer(c.sock.fileno())

    def _send_deferred(self, now: float) -> None:
        """The documents whose COMMAND_GRACE has passed (every loop turn)."""
        for fd in list(self.deferred):
            c = self.clients.get(fd)
            if c is None or c.doc is None or c.command:
                self._undefer(fd)
            elif c.eof or now >= c.accepted + COMMAND_GRACE:
                self._undefer(fd)
                data, c.doc = c.doc, None
                self._respond(c, data)

    def _deferred_wakeup(self) -> float | None:
        return min((c.accepted + COMMAND_GRACE for fd in self.deferred
                    if (c := self.clients.get(fd)) is not None), default=None)

    def _on_stats_readable(self, fd: int, now: float) -> bool:
        """A stats client's bytes: one line (`stop NAME`, or JSON
        `{"command": ..., "name": ...}`) is a command, answered with its
        outcome instead of the document. True when a command came or is
        coming; False for nothing yet, or end of file (a plain reader).

        A command client writes right after connect(): its line is almost
        always there when we accept. If the document went out first, the
        client sees a reply without "command" and asks again (fetch_command)."""
        c = self.clients.get(fd)
        if c is None:
            return True
        data = recv_ready(c.sock, 4096)
        if data is None:
            return c.command
        if not data:
            try:
                self.sel.unregister(c.sock)  # a plain reader shut its side
            except (KeyError, ValueError):
                pass
            c.eof = True
            if c.doc is not None and not c.command:
                self._undefer(fd)
                data, c.doc = c.doc, None
                self._respond(c, data)
            return c.command
        c.command = True
        c.doc = None
        c.inbuf += data
        if b"\n" not in c.inbuf:
            if len(c.inbuf) > MAX_REQUEST:
                self._respond(c, json_body({"schema": SCHEMA, "ok": False,
                                        "message": "command line too long"}))
            return True
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        line = c.inbuf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        try:
            req: dict[str, Any] = {}
            if line.startswith("{"):
                req = json.loads(line)
                command, name = str(req.get("command", "")), req.get("name")
            else:
                command, _, name = line.partition(" ")
                name = name.strip() or None
            assert self.link is not None
            if command == "logs" and self.link.logs is not None:
                since = req.get("since")
                reply = self.link.logs(str(name), since if isinstance(since, int) else None)
                self._respond(c, json_body(reply))
                return True
            reply = self.link.control(command, None if name is None else str(name))
            self._collect_again()  # what the command changed
        except Exception as e:  # noqa: BLE001 - a bad line must not take the loop down
            reply = {"schema": SCHEMA, "command": line[:80], "ok": False,
                     "message": f"{type(e).__name__}: {e}"}
        self._respond(c, json_body(reply))
        return True

    def _on_http_readable(self, fd: int, now: float) -> None:
        c = self.clients.get(fd)
        if c is None:
            return
        data = recv_ready(c.sock, 4096)
        if data is None:
            return
        if not data:
            self._drop(fd)
            return
        c.inbuf += data
        if b"\r\n\r\n" not in c.inbuf and b"\n\n" not in c.inbuf:
            if len(c.inbuf) > MAX_REQUEST:
                self._respond(c, http_response(431, "text/plain", b"request too large\n"))
            return
        c.asked = True
        try:  # the request is complete: stop reading, answer (maybe later)
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        try:
            self._http_request(c)
        except Exception as e:  # noqa: BLE001
            self.log(f"status page: {type(e).__name__}: {e}")
            self._respond(c, http_response(500, "text/plain", b"internal error\n"))

    def _http_request(self, c: Client) -> None:
        line = c.inbuf.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return self._respond(c, http_response(400, "text/plain", b"bad request\n"))
        method, target = parts[0], parts[1].split("?", 1)[0]
        head = method == "HEAD"
        headers = _headers(c.inbuf)
        if headers is None:
            return self._respond(c, http_response(400, "text/plain", b"bad request\n"))
        if self.access is not None:
            if not self.access.host_allowed(headers.get("host")):
                # DNS rebinding, or a name the operator did not give: no
                # more than that it is not this server's name
                self._misdirected(headers.get("host"))
                return self._respond(c, http_response(421, "text/plain",
                                              b"misdirected request: unknown Host\n"))
            if not self.access.authorized(target, headers.get("authorization")):
                return self._respond(c, http_response(
                    401, "text/plain", b"token required\n",
                    extra='WWW-Authenticate: Basic realm="emperor status", charset="UTF-8"\r\n'))
        if method not in ("GET", "HEAD"):
            return self._respond(
                c, http_response(405, "text/plain", b"only GET\n", extra="Allow: GET, HEAD\r\n"))
        if target == "/json":
            self._when_ready(c, lambda doc: self._respond(c, http_response(
                200, "application/json", self._once(doc, "json", lambda: json_body(doc)), head)))
        elif target == "/metrics":
            em = self.link.metrics if self.link is not None else None
            self._when_ready(c, lambda doc: self._respond(c, http_response(
                200, "text/plain; version=0.0.4; charset=utf-8",
                self._once(doc, "metrics", lambda: render_metrics(doc, em)), head)))
        elif target == "/healthz":
            assert self.link is not None
            ok, why = self.link.health()
            self._respond(c, http_response(200 if ok else 503, "text/plain", why.encode() + b"\n", head))
        elif target == "/readyz":
            assert self.link is not None
            ok, why = self.link.ready() if self.link.ready is not None else self.link.health()
            self._respond(c, http_response(200 if ok else 503, "text/plain", why.encode() + b"\n", head))
        elif target.startswith("/log/"):
            name = urllib.parse.unquote(target[len("/log/"):])
            assert self.link is not None
            lines = self.link.log_lines(name)
            if lines is None:
                self._respond(c, http_response(404, "text/plain", b"no such vassal\n", head))
            else:
                body = "".join(printable(line) + "\n" for line in (lines or ()))
                self._respond(c, http_response(200, "text/plain; charset=utf-8",
                                       (body or "(nothing logged yet)\n").encode(), head))
        elif target in ("/", "/index.html"):
            self._when_ready(c, lambda doc: self._respond(c, http_response(
                200, "text/html; charset=utf-8",
                self._once(doc, "html", lambda: render_html(doc).encode()), head)))
        else:
            self._respond(c, http_response(404, "text/plain", b"not found\n"))


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 421: "Misdirected Request",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _headers(request: bytes) -> dict[str, str] | None:
    """The request's header fields, names lowercased; None when Host or
    Authorization comes twice (which one would a proxy have checked?)."""
    out: dict[str, str] = {}
    head = request.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    for raw in head.split(b"\n")[1:]:
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            continue
        name = name.strip().lower()
        if name in out and name in ("host", "authorization"):
            return None
        out[name] = value.strip()
    return out


def json_body(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1) + "\n").encode()


def http_response(code: int, ctype: str, body: bytes, head: bool = False, extra: str = "") -> bytes:
    hdr = (
        f"HTTP/1.0 {code} {_REASONS.get(code, '')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return hdr.encode("latin-1") + (b"" if head else body)
