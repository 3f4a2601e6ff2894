"""nginx as the Emperor's supervised child: spawned in its own session
(`daemon off`, SIGTERM if the Emperor dies), restarted with a backoff when
it cannot start, its stderr (its error log) read and logged as ours; and an
operator's reload command, run after each write of their include.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from ..logs import OutputPipe
from ..nonblocking import recv_ready
from ..proc import backoff_delay
from ..spawn import spawn
from .check import nginx_message
from .nginx import find_nginx
from .options import FrontDoorOptions
from .route import Route



def _spawn_nginx(argv: list[str], out_w: int, err_w: int) -> int:
    """nginx in its own session, with stdout (the access log) and stderr
    (its error log) on pipes the Emperor reads; it gets SIGTERM if the
    Emperor dies, so a killed Emperor leaves no nginx holding the port.
    TZ=UTC: the access log's times are the Emperor's, UTC (nginx keeps
    TZ for its workers)."""
    return spawn(argv, {**os.environ, "TZ": "UTC"}, stdin=None, stdout=out_w, stderr=err_w,
                 die_with_parent=True)


class NginxProcess:
    """The FrontDoor's part that runs nginx and the reload command (a
    mixin: the state is the FrontDoor's `pid`, `err_r`, `failures`, ...)."""

    opts: FrontDoorOptions
    log: Callable[[str], None]
    ng_dir: Path
    conf_path: Path
    installed: tuple[Route, ...] | None
    pid: int | None
    started_at: float
    next_start: float
    failures: int
    reload_pid: int | None
    reload_again: bool
    err_r: int | None
    err_buf: bytes
    generation: int
    serving: int
    last_reload: float | None
    last_error: str | None
    watch: Callable[[int, Callable[[float], None]], None]
    unwatch: Callable[[int], None]
    relay: Callable[[OutputPipe, Callable[[], int | None]], None] | None
    spawning: Callable[[], contextlib.AbstractContextManager]

    def _run_reload_cmd(self) -> None:
        self.reload_again = False
        try:
            self.reload_pid = spawn(["/bin/sh", "-c", self.opts.reload_cmd or "true"],
                                    os.environ)
            self.serving = self.generation
            self.last_reload = time.time()
        except OSError as e:
            self.log(f"cannot run --nginx-reload: {e.strerror or e}")

    def _start(self, now: float) -> None:
        nginx = self.opts.nginx or find_nginx()
        try:
            self._private_dirs()
        except OSError as e:
            self.log(f"cannot create {self.ng_dir}: {e.strerror or e}")
            self._failed_start(now)
            return
        if nginx is None:
            self.log("nginx not found (apt-get install nginx)")
            self._failed_start(now)
            return
        out = None
        try:
            out = OutputPipe()
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:
            if out is not None:
                out.close()
            self.log(f"cannot start nginx: {e.strerror or e}")
            self._failed_start(now)
            return
        try:
            with self.spawning():
                self.pid = _spawn_nginx([nginx, "-e", "stderr", "-p", str(self.ng_dir),
                                         "-c", str(self.conf_path)], out.wfd, err_w)
        except OSError as e:
            out.close()
            os.close(err_r)
            self.log(f"cannot start nginx: {e.strerror or e}")
            self._failed_start(now)
            return
        finally:
            os.close(err_w)
        self.started_at = now
        self.serving = self.generation
        self.last_reload = time.time()
        self._close_pipes()  # a previous run's, if its workers are still dying
        os.set_blocking(err_r, False)
        self.err_r = err_r
        pid = self.pid
        if self.relay is not None and self.opts.access_log:
            self.relay(out, lambda: pid)
        else:
            out.close()
        self.watch(err_r, self.on_stderr)
        self.log(f"nginx pid {self.pid} serves {self.opts.listen} "
                 f"({sum(len(x.domains) for x in self.installed or ())} names, "
                 f"generation {self.generation})")

    def _failed_start(self, now: float) -> None:
        self.failures += 1
        self.next_start = now + backoff_delay(self.failures, self.opts.backoff_first,
                                              self.opts.backoff_max)

    def _close_pipes(self) -> None:
        if self.err_r is not None:
            self.unwatch(self.err_r)
            os.close(self.err_r)
        self.err_r = None

    def on_stderr(self, now: float) -> None:
        """nginx wrote to its stderr (its error log): each line logged as
        ours; an [emerg] of the running nginx (a reload it could not do)
        is the front door's error until the next configuration."""
        if self.err_r is None:
            return
        data = recv_ready(self.err_r)
        if data is None:
            return
        if not data:  # every nginx process of that run is gone
            self.unwatch(self.err_r)
            os.close(self.err_r)
            self.err_r = None
            if self.err_buf:
                self.log(self.err_buf.decode(errors="replace"))
                self.err_buf = b""
            return
        self.err_buf += data
        *lines, self.err_buf = self.err_buf.split(b"\n")
        for line in lines:
            if line.strip():
                text = line.decode(errors="replace").rstrip()
                # its own timestamp goes (ours leads the line); its worst
                # levels read as errors in ours
                text = re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", text)
                if re.match(r"\[(emerg|alert|crit|error)\]", text):
                    text = "error: nginx: " + text
                self.log(text)
                if "[emerg]" in text and self.pid is not None:
                    self.serving = -1
                    self.last_error = nginx_message(text)
