"""Templates rendered with a deadline, in a forked child, off the Emperor's loop.

A template is code: `{% for x in range(10**9) %}` renders for minutes. In
the Emperor's only loop that froze everything (status, reaping, restarts,
SIGTERM). So the Emperor compiles a template (bounded by the file's size,
and cached), then forks a child that renders it and writes the text back on
a pipe; the loop goes on meanwhile, and a child still rendering after
`timeout` seconds is killed and the vassal is a `config-error`. Plain `.ini`
files never come here: only templates pay for a fork.

The protocol on the pipe: one byte, `O` (the rendered text follows, UTF-8)
or `E` (a TemplateFailure's one-line message follows), then EOF.

Results are asked for by `Renderer.render(path, source, name)`: the text
when a render of that very source ended, None while it runs (the Emperor
reads the file again once `on_done(path)` is called), TemplateFailure else.
"""

from __future__ import annotations

import hashlib
import os
import select
import selectors
import signal
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .templates import TemplateFailure, compile_template, render_compiled

DEFAULT_TIMEOUT = 5.0  # seconds a template may render
DEFAULT_PARALLEL = 8  # render children at once (each holds one descriptor)
_TIMED_OUT_MAX = 1024


def _fork_render(path: Path, source: str, name: str) -> tuple[int, int]:
    """Compile here, render in a child: (pid, read end of its pipe)."""
    tmpl = compile_template(path, source)  # TemplateFailure: a syntax error
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: render, write, _exit (no atexit, no finally of the Emperor)
        code = 0
        try:
            # only the pipe stays open: a copy of a status client, a vassal's
            # pipe or a listener held here would keep the peer from seeing EOF
            os.closerange(3, w)
            os.closerange(w + 1, max(w + 2, os.sysconf("SC_OPEN_MAX")))
            signal.set_wakeup_fd(-1)  # our signals are not the Emperor's events
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                        signal.SIGUSR2, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            try:
                out = b"O" + render_compiled(tmpl, path, name).encode("utf-8", "surrogateescape")
            except TemplateFailure as e:
                out = b"E" + str(e).encode("utf-8", "replace")
            view = memoryview(out)
            while view:
                view = view[os.write(w, view):]
        except BaseException:  # noqa: BLE001 - the parent sees a truncated reply
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _result(path: Path, data: bytes) -> str:
    """The text a child sent, or TemplateFailure."""
    if data[:1] == b"O":
        return data[1:].decode("utf-8", "surrogateescape")
    if data[:1] == b"E":
        raise TemplateFailure(data[1:].decode("utf-8", "replace"))
    raise TemplateFailure(f"{path.name}: the render process died without a result")


def _timed_out(path: Path, timeout: float) -> TemplateFailure:
    return TemplateFailure(f"{path.name}: rendering took more than {timeout:g} s: stopped "
                           "(a loop in the template?)")


def render_with_deadline(path: Path, source: str, name: str,
                         timeout: float = DEFAULT_TIMEOUT) -> str:
    """Render in a child and wait for it, at most `timeout` seconds: for
    the few reads before the Emperor's loop runs (the fork-server sockets
    it locks at start)."""
    pid, fd = _fork_render(path, source, name)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _timed_out(path, timeout)
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    return _result(path, b"".join(chunks))
                chunks.append(data)
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


@dataclass
class _Job:
    key: tuple[str, str, int]  # (file, sha256 of its source, mtime_ns)
    path: Path
    source: str
    name: str
    pid: int = 0
    fd: int = -1
    deadline: float = 0.0
    chunks: list[bytes] = field(default_factory=list)


@dataclass
class Renderer:
    """The Emperor's template renders in flight, in its selector.

    `on_done(path)` is called when a render ended (text, failure or
    timeout): the Emperor reads the file again and `render` returns the
    result. Pids are reaped by the Emperor (`_reap`), which hands ours to
    `reaped`."""

    sel: selectors.BaseSelector
    on_done: Callable[[Path], None]
    timeout: float = DEFAULT_TIMEOUT
    parallel: int = DEFAULT_PARALLEL
    running: dict[tuple[str, str, int], _Job] = field(default_factory=dict)
    queued: deque[_Job] = field(default_factory=deque)
    results: dict[tuple[str, str, int], str | TemplateFailure] = field(default_factory=dict)
    # sources that ran out of time: not rendered again until the file changes
    # or is touched (a new key), else every rescan would burn `timeout` of CPU
    timed_out: OrderedDict[tuple[str, str, int], TemplateFailure] = field(
        default_factory=OrderedDict)
    pids: set[int] = field(default_factory=set)  # children not reaped yet
    forks: int = 0  # render children started so far (bench, status)

    def render(self, path: Path, source: str, name: str) -> str | None:
        """The rendered text, None while the render runs; TemplateFailure."""
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            mtime = 0
        key = (str(path), hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest(),
               mtime)
        res = self.results.pop(key, None)
        if res is None:
            res = self.timed_out.get(key)
        if isinstance(res, TemplateFailure):
            raise res
        if res is not None:
            return res
        if key in self.running or any(j.key == key for j in self.queued):
            return None
        compile_template(path, source)  # a syntax error is known at once, no child
        self.queued.append(_Job(key, path, source, name))
        self._start_queued()
        return None

    def _start_queued(self) -> None:
        while self.queued and len(self.running) < self.parallel:
            job = self.queued.popleft()
            try:
                job.pid, job.fd = _fork_render(job.path, job.source, job.name)
            except TemplateFailure as e:
                self._finish(job, e)
                continue
            except OSError as e:  # EAGAIN, EMFILE: the vassal's error, read again later
                # read again at the next rescan: the failure is not kept
                self._finish(job, TemplateFailure(
                    f"{job.path.name}: cannot render: {e.strerror or e}"))
                continue
            self.forks += 1
            self.pids.add(job.pid)
            job.deadline = time.monotonic() + self.timeout
            os.set_blocking(job.fd, False)
            self.running[job.key] = job
            self.sel.register(job.fd, selectors.EVENT_READ, lambda now, j=job: self._readable(j))

    def _readable(self, job: _Job) -> None:
        try:
            data = os.read(job.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            job.chunks.append(data)
            return
        self._stop(job)
        try:
            res: str | TemplateFailure = _result(job.path, b"".join(job.chunks))
        except TemplateFailure as e:
            res = e
        self._finish(job, res)

    def _stop(self, job: _Job, kill: bool = False) -> None:
        self.running.pop(job.key, None)
        if job.fd >= 0:
            self.sel.unregister(job.fd)
            os.close(job.fd)
            job.fd = -1
        if kill and job.pid in self.pids:
            try:
                os.kill(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _finish(self, job: _Job, res: str | TemplateFailure) -> None:
        """A result, read once by `render` (the file read again after on_done)."""
        self.results[job.key] = res
        while len(self.results) > _TIMED_OUT_MAX:  # files removed before their result was read
            del self.results[next(iter(self.results))]
        self._start_queued()
        self.on_done(job.path)

    def expire(self, now: float) -> None:
        """Kill the renders past their deadline (once per loop turn)."""
        for job in [j for j in self.running.values() if now >= j.deadline]:
            self._stop(job, kill=True)
            failure = _timed_out(job.path, self.timeout)
            self.timed_out[job.key] = failure
            while len(self.timed_out) > _TIMED_OUT_MAX:
                self.timed_out.popitem(last=False)
            self._finish(job, failure)

    def next_wakeup(self) -> float | None:
        return min((j.deadline for j in self.running.values()), default=None)

    def reaped(self, pid: int) -> bool:
        """The Emperor reaped `pid`: True when it was one of ours."""
        if pid in self.pids:
            self.pids.discard(pid)
            return True
        return False

    def close(self) -> None:
        """Shutdown: every render stops (their pids are reaped by the Emperor)."""
        self.queued.clear()
        for job in list(self.running.values()):
            self._stop(job, kill=True)
