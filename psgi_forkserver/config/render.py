"""Templates rendered with a deadline, in a forked child, off the Emperor's loop.

A template is code: `{% for x in range(10**9) %}` renders for minutes. In
the Emperor's only loop that froze everything (status, reaping, restarts,
SIGTERM). So the Emperor compiles a template (bounded by the file's size,
and cached), then forks a child that renders it and writes the text back on
a pipe; the loop goes on meanwhile, and a child still rendering after
`timeout` seconds is killed and the vassal is a `config-error`. Plain `.ini`
files never come here: only templates pay for a fork.

One child renders a batch of templates in turn (a fork costs about 1 ms of
the Emperor's loop, a render of an ordinary template 0.03 ms: a rescan of
200 templates forks a few children, not 200). The deadline is per
template: when one runs out of time the child is killed, that template is a
`config-error`, and the rest of its batch goes to a new child. On the pipe,
one record per template, in order: a 4-byte big-endian length, then `O`
(the rendered text follows, UTF-8) or `E` (a TemplateFailure's one-line
message follows).

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
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .templates import TemplateFailure, compile_template, render_compiled
from ..nonblocking import recv_ready

DEFAULT_TIMEOUT = 5.0  # seconds a template may render
DEFAULT_PARALLEL = 2  # render children at once (each holds one descriptor)
_TIMED_OUT_MAX = 1024


BATCH = 50  # templates one child renders in turn


def _fork_render(jobs: list[tuple[Path, object, str]]) -> tuple[int, int]:
    """Render compiled templates [(path, compiled, name)] in a child, in
    order: (pid, read end of its pipe)."""
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
            for path, tmpl, name in jobs:
                try:
                    out = b"O" + render_compiled(tmpl, path, name).encode("utf-8", "surrogateescape")
                except TemplateFailure as e:
                    out = b"E" + str(e).encode("utf-8", "replace")
                view = memoryview(struct.pack(">I", len(out)) + out)
                while view:
                    view = view[os.write(w, view):]
        except BaseException:  # noqa: BLE001 - the parent sees a missing record
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _result(data: bytes) -> str:
    """The text of one record, or TemplateFailure."""
    if data[:1] == b"O":
        return data[1:].decode("utf-8", "surrogateescape")
    raise TemplateFailure(data[1:].decode("utf-8", "replace"))


def _records(buf: bytearray) -> list[bytes]:
    """The whole records at the start of `buf` (removed from it)."""
    out = []
    while len(buf) >= 4:
        (n,) = struct.unpack(">I", buf[:4])
        if len(buf) < 4 + n:
            break
        out.append(bytes(buf[4:4 + n]))
        del buf[:4 + n]
    return out


def _died(path: Path) -> TemplateFailure:
    return TemplateFailure(f"{path.name}: the render process died without a result")


def _timed_out(path: Path, timeout: float) -> TemplateFailure:
    return TemplateFailure(f"{path.name}: rendering took more than {timeout:g} s: stopped "
                           "(a loop in the template?)")


def render_with_deadline(path: Path, source: str, name: str,
                         timeout: float = DEFAULT_TIMEOUT) -> str:
    """Render in a child and wait for it, at most `timeout` seconds: for
    the few reads before the Emperor's loop runs (the fork-server sockets
    it locks at start)."""
    pid, fd = _fork_render([(path, compile_template(path, source), name)])
    buf = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _timed_out(path, timeout)
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 65536)
                buf += data
                recs = _records(buf)
                if recs:
                    return _result(recs[0])
                if not data:
                    raise _died(path)
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


Key = tuple[str, str, int]  # (file, sha256 of its source, mtime_ns)


@dataclass
class _Job:
    key: Key
    path: Path
    tmpl: object  # compiled
    name: str


@dataclass
class _Child:
    pid: int
    fd: int
    jobs: deque[_Job]  # not answered yet, in the child's order
    deadline: float  # of jobs[0]
    buf: bytearray = field(default_factory=bytearray)


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
    parallel: int = DEFAULT_PARALLEL  # children at once
    batch: int = BATCH
    children: dict[int, _Child] = field(default_factory=dict)  # pid -> child
    queued: deque[_Job] = field(default_factory=deque)
    results: dict[Key, str | TemplateFailure] = field(default_factory=dict)
    # sources that ran out of time: not rendered again until the file changes
    # or is touched (a new key), else every rescan would burn `timeout` of CPU
    timed_out: OrderedDict[Key, TemplateFailure] = field(default_factory=OrderedDict)
    pids: set[int] = field(default_factory=set)  # children not reaped yet
    forks: int = 0  # render children started so far (bench, tests)
    _due: bool = False  # queued jobs wait for the end of this loop turn

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
        if self._known(key):
            return None
        # a syntax error is known at once, without a child
        self.queued.append(_Job(key, path, compile_template(path, source), name))
        self._due = True
        return None

    def _known(self, key: Key) -> bool:
        return any(j.key == key for j in self.queued) or any(
            j.key == key for c in self.children.values() for j in c.jobs)

    def start(self) -> None:
        """Fork for what was queued (once per loop turn: a rescan's
        templates share children)."""
        self._due = False
        while self.queued and len(self.children) < self.parallel:
            n = min(self.batch, max(1, -(-len(self.queued) // (self.parallel - len(self.children)))))
            jobs = deque(self.queued.popleft() for _ in range(min(n, len(self.queued))))
            try:
                pid, fd = _fork_render([(j.path, j.tmpl, j.name) for j in jobs])
            except OSError as e:  # EAGAIN, EMFILE: these vassals' error, read again later
                for j in jobs:
                    self._finish(j, TemplateFailure(
                        f"{j.path.name}: cannot render: {e.strerror or e}"))
                continue
            self.forks += 1
            self.pids.add(pid)
            os.set_blocking(fd, False)
            child = self.children[pid] = _Child(pid, fd, jobs, time.monotonic() + self.timeout)
            self.sel.register(fd, selectors.EVENT_READ, lambda now, c=child: self._readable(c))

    def _readable(self, child: _Child) -> None:
        data = recv_ready(child.fd)
        if data is None:
            return
        child.buf += data
        for rec in _records(child.buf):
            if not child.jobs:  # more records than templates: not our child's doing
                break
            job = child.jobs.popleft()
            try:
                res: str | TemplateFailure = _result(rec)
            except TemplateFailure as e:
                res = e
            self._finish(job, res)
            child.deadline = time.monotonic() + self.timeout  # the next template's
        if not data:
            self._close(child)
            for job in child.jobs:  # it died (killed by someone, out of memory)
                self._finish(job, _died(job.path))
            self.start()

    def _close(self, child: _Child, kill: bool = False) -> None:
        self.children.pop(child.pid, None)
        self.sel.unregister(child.fd)
        os.close(child.fd)
        if kill and child.pid in self.pids:
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _finish(self, job: _Job, res: str | TemplateFailure) -> None:
        """A result, read once by `render` (the file read again after on_done)."""
        self.results[job.key] = res
        while len(self.results) > _TIMED_OUT_MAX:  # files removed before their result was read
            del self.results[next(iter(self.results))]
        self.on_done(job.path)

    def expire(self, now: float) -> None:
        """Once per loop turn: kill the children whose current template ran
        out of time (the rest of their batch goes to a new child), and start
        the children for what was queued."""
        for child in [c for c in self.children.values() if now >= c.deadline]:
            self._close(child, kill=True)
            if not child.jobs:  # every result in, its exit late (stopped?): nothing lost
                continue
            job = child.jobs.popleft()
            failure = _timed_out(job.path, self.timeout)
            self.timed_out[job.key] = failure
            while len(self.timed_out) > _TIMED_OUT_MAX:
                self.timed_out.popitem(last=False)
            self._finish(job, failure)
            self.queued.extendleft(reversed(child.jobs))
        if self.queued:
            self.start()

    def next_wakeup(self) -> float | None:
        if self._due:
            return 0.0
        return min((c.deadline for c in self.children.values()), default=None)

    def reaped(self, pid: int) -> bool:
        """The Emperor reaped `pid`: True when it was one of ours."""
        if pid in self.pids:
            self.pids.discard(pid)
            return True
        return False

    def close(self) -> None:
        """Shutdown: every render stops (their pids are reaped by the Emperor)."""
        self.queued.clear()
        for child in list(self.children.values()):
            self._close(child, kill=True)
