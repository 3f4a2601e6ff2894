"""The Emperor's log: one line per event, timestamped, attributed to its vassal.

Every line starts with an ISO 8601 UTC timestamp in milliseconds. The
Emperor's own lines read `TIME emperor: [NAME] message`; a line a vassal's
processes wrote reads `TIME [NAME] line`, so `grep '\\[NAME\\]'` finds both.
`--log-format json` writes one JSON object per line instead, with the keys
time, level, vassal, pid, event and message.

The Emperor owns each vassal process's output (docs/CONTRACT.md, "Logs"):
its stdout and stderr are one pipe (`OutputPipe`), made per process, whose
read end the Emperor's loop reads. A spawned process gets the write end as
descriptors 1 and 2; an adopted one, whose descriptors come from the base,
gets it with its config packet (SCM_RIGHTS on the config pipe: the bytes
stay uWSGI's) and moves it onto 1 and 2 itself (perl/ForkServer/Vassal/Output.pm).
Every process of the vassal (workers, what the app runs) inherits it. The
pipe is read line by line; a process writing a whole line with one write(2)
(< PIPE_BUF bytes) is never interleaved mid-line with another.

What one vassal gets relayed is limited: outputs.py's `OutputLimit`.

A vassal with `logto = PATH` has its lines written to that file (O_APPEND);
`reopen()` (SIGUSR2, `emperor reopen-logs`) reopens every file, for
logrotate's rename-then-signal.
"""

from __future__ import annotations

import json
import os
import selectors
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .printable import printable
from .outputs import MAX_LINE, PAUSE, OutputLimit, OutputPipe  # noqa: F401 (logs.MAX_LINE, logs.OutputLimit)
from .rights import Rights, open_append

FORMATS = ("text", "json")


_second: list = [None, ""]  # the last whole second formatted, and its text


def timestamp(now: float | None = None) -> str:
    """ISO 8601, UTC, milliseconds: 2026-11-28T01:37:27.123Z."""
    t = time.time() if now is None else now
    ms = int(t * 1000)
    sec = ms // 1000
    if _second[0] != sec:  # strftime once a second, not once a line
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{ms % 1000:03d}Z"


def level_of(message: str) -> str:
    """The level of an Emperor line, from the words it starts with (the
    Emperor's lines are written for people; this keeps them so)."""
    m = message.lower()
    if m.startswith(("error", "cannot", "bad config", "adoption failed", "sigkill")):
        return "error"
    if " died " in m or m.startswith(("giving up", "inotify unavailable", "orphan", "refused")):
        return "warning"
    return "info"


@dataclass
class LogFile:
    """A file lines are appended to, reopened by path on `reopen()`."""

    path: Path
    rights: Rights | None = None  # a vassal's that drops root (rights.py)
    fd: int = -1
    error: str | None = None  # why it could not be opened (logged once)

    def open(self) -> None:
        try:
            fd = open_append(self.path, self.rights)
        except OSError as e:
            self.error = f"{self.path}: {e.strerror or e}"
            return
        self.close()
        self.fd, self.error = fd, None

    def write(self, data: bytes) -> bool:
        if self.fd < 0:
            return False
        try:
            view = memoryview(data)
            while view:  # whole lines per write(2); O_APPEND: never over another writer's
                view = view[os.write(self.fd, view):]
            return True
        except OSError as e:
            self.error = f"{self.path}: {e.strerror or e}"
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Log:
    """Where every line goes: the Emperor's stream (stderr, or `--logto`),
    and each vassal's own file (`logto` key)."""

    fmt: str = "text"
    stream: TextIO | None = None  # default: sys.stderr at write time
    path: Path | None = None  # --logto: the Emperor's own log file
    files: dict[str, LogFile] = field(default_factory=dict)  # vassal -> its logto
    main: LogFile | None = None
    # also told every relayed line (vassal, lines, process): the Emperor
    # keeps a vassal's recent lines for its status page, and each process's
    # last words (process: the vassal's process sequence number)
    keep: Callable[[str, list[str], int | None], None] | None = None
    limits: dict[str, OutputLimit] = field(default_factory=dict)  # vassal -> what it may relay

    def set_limit(self, vassal: str, lines: int, nbytes: int) -> None:
        """The vassal's output limit (0 and 0: none); a changed one starts
        full, an unchanged one keeps its state."""
        old = self.limits.get(vassal)
        if old is not None and (old.lines, old.nbytes) == (lines, nbytes):
            return
        if lines or nbytes:
            self.limits[vassal] = OutputLimit(lines, nbytes)
        else:
            self.limits.pop(vassal, None)

    def keep_with(self, keep: Callable[[str, list[str], int | None], None]) -> None:
        """Who keeps a vassal's lines (the Emperor's recent.RecentLines)."""
        self.keep = keep

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"log format {self.fmt!r}: one of {', '.join(FORMATS)}")
        if self.path is not None:
            self.main = LogFile(self.path)
            self.main.open()
            if self.main.error:
                raise OSError(self.main.error)
        self.pid = os.getpid()

    def format(self, message: str, vassal: str | None = None, *, pid: int | None = None,
               level: str | None = None, event: str = "emperor",
               now: float | None = None) -> str:
        """One line, newline included. `event` "emperor" is one of the
        Emperor's own lines; "output" a line relayed from a vassal."""
        # a file name or an app's line may hold ESC or a newline: escaped,
        # they can neither drive a terminal nor forge a line
        message = printable(message)
        vassal = None if vassal is None else printable(vassal)
        if self.fmt == "json":
            return json.dumps({
                "time": timestamp(now), "level": level or level_of(message), "vassal": vassal,
                "pid": pid if pid is not None else (self.pid if event == "emperor" else None),
                "event": event, "message": message,
            }, ensure_ascii=False) + "\n"
        if event == "emperor":
            tag = f"emperor: [{vassal}] " if vassal else "emperor: "
        else:
            tag = f"[{vassal}] " if vassal else ""
        return f"{timestamp(now)} {tag}{message}\n"

    def emit(self, message: str, vassal: str | None = None, **kw) -> None:
        """Write one line to the Emperor's log."""
        self._write_main(self.format(message, vassal, **kw))

    def relay(self, vassal: str, lines: list[str], pid: int | None,
              seq: int | None = None) -> None:
        """Lines a vassal's process wrote: to its `logto` file if it has one
        that is open, else to the Emperor's log; one write for all of them.
        `seq`: which of the vassal's processes (its pid may be unknown yet,
        or no longer, when it dies at once)."""
        if self.keep is not None:
            self.keep(vassal, lines, seq)
        now = time.time()
        text = "".join(self.format(line, vassal, pid=pid, level="info", event="output", now=now)
                       for line in lines)
        f = self.files.get(vassal)
        if f is not None and f.write(text.encode("utf-8", "surrogateescape")):
            return
        self._write_main(text)

    def relay_formatted(self, vassal: str, data: bytes) -> None:
        """Whole lines already in this log's format (nginx's access log),
        in one write, where `relay` would put them; not UTF-8: replaced."""
        text = data.decode("utf-8", "replace")
        f = self.files.get(vassal)
        if f is not None and f.write(text.encode("utf-8")):
            return
        self._write_main(text)

    def _write_main(self, text: str) -> None:
        if self.main is not None and self.main.write(text.encode("utf-8", "surrogateescape")):
            return
        stream = self.stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass

    def set_logto(self, vassal: str, path: Path | None, rights: Rights | None = None) -> str | None:
        """The vassal's `logto` file (None: its lines go to the Emperor's
        log), opened with `rights`. The reason it cannot be opened, if so."""
        old = self.files.get(vassal)
        if old is not None and (old.path, old.rights) == (path, rights) and old.fd >= 0:
            return None
        if old is not None:
            old.close()
            del self.files[vassal]
        if path is None:
            return None
        f = LogFile(path, rights)
        f.open()
        if f.error:
            return f.error
        self.files[vassal] = f
        return None

    def reopen(self) -> list[str]:
        """Reopen every file by its path (logrotate renamed the old one);
        the reasons of those that could not be reopened (they keep writing
        to the old file)."""
        errors = []
        for f in ([self.main] if self.main is not None else []) + list(self.files.values()):
            f.open()
            if f.error:
                errors.append(f.error)
        return errors

    def reopen_and_say(self) -> list[str]:
        """SIGUSR2, `emperor reopen-logs`: `reopen()`, with each failure and
        the end said in the Emperor's log."""
        errors = self.reopen()
        for err in errors:
            self.emit(f"reopen-logs: {err}")
        self.emit("reopen-logs: log files reopened")
        return errors

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
        if self.main is not None:
            self.main.close()


class Quiet:
    """A selector callback after which the Emperor need not plan again:
    copying lines changes nothing the plan reads (Loop._wait)."""
    quiet = True

    def __init__(self, fn: Callable[[float], object]) -> None:
        self.fn = fn

    def __call__(self, now: float) -> object:
        return self.fn(now)


class Relay:
    """The readers of the vassals' output pipes, in the Emperor's selector.

    A pipe is read until its end of file (every process holding its write
    end has exited, the vassal's orphans included), not until the Emperor
    forgets the process: a dying vassal's last lines are not lost (emperor/outlived.py bounds it)."""

    def __init__(self, log: Log, sel: selectors.BaseSelector) -> None:
        self.log = log
        self.sel = sel
        # read end -> (the pipe, its vassal, how to learn its process's pid)
        self.pipes: dict[int, tuple[OutputPipe, str, Callable[[], int | None]]] = {}
        self.formatted: set[int] = set()  # read ends whose lines are in the log's format
        self.seqs: dict[int, int | None] = {}  # read end -> the vassal's process sequence
        self.callbacks: dict[int, Callable] = {}  # read end -> its selector callback
        self.paused: dict[int, float] = {}  # read ends of vassals over their limit -> read again at

    def watch(self, out: OutputPipe, vassal: str, pid: Callable[[], int | None],
              seq: int | None = None, formatted: bool = False) -> None:
        """Read `out` from now on, its lines relayed as `vassal`'s; `pid`
        tells the process's pid once known (an adoption's comes later).
        `formatted`: lines in the log's format already. Our copy of the
        write end is closed: the process has its own."""
        out.passed()
        self.pipes[out.rfd] = (out, vassal, pid)
        self.seqs[out.rfd] = seq
        read = Quiet(lambda now, fd=out.rfd: self._readable(fd))
        if formatted:
            self.formatted.add(out.rfd)
        self.callbacks[out.rfd] = read if formatted else read.fn
        self.sel.register(out.rfd, selectors.EVENT_READ, self.callbacks[out.rfd])

    def _readable(self, fd: int) -> bool:
        """Relay what can be read now; False once there is nothing more."""
        out, vassal, pid = self.pipes[fd]
        if fd in self.formatted:
            data, eof = out.read_lines()
            if data:
                self.log.relay_formatted(vassal, data)
            if eof:
                self._forget(fd)
            return bool(data) and not eof
        limit = self.log.limits.get(vassal)
        if limit is None:
            lines, eof = out.read()
        else:
            now = time.monotonic()
            limit.refill(now)
            if limit.spent():
                # over it: what the pipe holds goes unread line by line,
                # and the pipe waits (its writers too, once it is full)
                n, size, eof = out.drop()
                limit.drop(n, size, now)
                if not eof:
                    self._pause(fd, now + PAUSE)
                    return False
                lines = []
            else:
                lines, eof = out.read()
                lines = limit.take(lines, now)
        if lines:
            self.log.relay(vassal, lines, pid(), self.seqs.get(fd))
        if eof:
            self._forget(fd)
        return bool(lines) and not eof

    def _pause(self, fd: int, until: float) -> None:
        if fd in self.paused:
            return
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            return
        self.paused[fd] = until

    def next_wakeup(self) -> list[float]:
        """When a paused pipe is read again, or dropped lines are said."""
        times = list(self.paused.values())
        for limit in self.log.limits.values():
            due = limit.report_due()
            if due is not None:
                times.append(due)
        return times

    def poll(self, now: float) -> None:
        """Every turn: paused pipes whose time came are read again, and the
        drops of each vassal are said, at most once a second."""
        for fd, until in list(self.paused.items()):
            if now >= until:
                del self.paused[fd]
                if fd in self.pipes:
                    self.sel.register(fd, selectors.EVENT_READ, self.callbacks[fd])
        for vassal, limit in self.log.limits.items():
            if limit.dropping_since is not None:
                text = limit.report(now)
                if text is not None:
                    self.log.emit(text, vassal, level="warning")

    def forget_limit(self, vassal: str, now: float) -> None:
        """The vassal is gone: its drops not said yet are said now."""
        limit = self.log.limits.pop(vassal, None)
        text = limit.report(now, at_once=True) if limit is not None else None
        if text is not None:
            self.log.emit(text, vassal, level="warning")

    def _forget(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        out, _, _ = self.pipes.pop(fd)
        self.seqs.pop(fd, None)
        self.callbacks.pop(fd, None)
        self.paused.pop(fd, None)
        self.formatted.discard(fd)
        out.close()

    def close(self) -> None:
        """The Emperor exits: what is left in the pipes is relayed first."""
        for fd in list(self.pipes):
            self.finish(fd)

    def finish(self, fd: int) -> None:
        """Relay what `fd` holds (bounded: a writer that never stops cannot hold us), then stop."""
        for _ in range(64):
            if not self._readable(fd):
                break
        if fd in self.pipes:
            out, vassal, pid = self.pipes[fd]
            if out.buf and fd in self.formatted:
                self.log.relay_formatted(vassal, bytes(out.buf) + b"\n")
            elif out.buf:
                self.log.relay(vassal, [out.buf.decode("utf-8", "replace")], pid(), self.seqs.get(fd))
            self._forget(fd)
