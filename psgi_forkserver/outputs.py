"""A vassal process's output pipe (`OutputPipe`: stdout and stderr, read by
the Emperor line by line) and how much of a vassal's output is relayed
(`OutputLimit`); logs.py relays the lines.

What one vassal gets relayed is limited: so many lines and bytes a second
(`log-lines-per-second`, `log-bytes-per-second`), with two seconds' worth
as a burst. Lines over it are dropped, counted, and said once a second; a
pipe whose vassal is over it is read only every `PAUSE` seconds (what it
holds then is dropped whole, without looking at its lines), so a tenant
that floods its output costs the Emperor a few reads a second, and its
writers wait on their full pipe meanwhile.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

from .nonblocking import recv_ready

MAX_LINE = 16384  # a longer line is cut into pieces of this many bytes
READ_CHUNK = 65536
PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size
PAUSE = 0.1  # a pipe whose vassal is over its limit is read again after this long
BURST = 2.0  # a limit's bucket holds this many seconds' worth
REPORT_EVERY = 1.0  # dropped lines are said at most this often per vassal


@dataclass
class OutputLimit:
    """How much of one vassal's output is relayed: `lines` and `nbytes` a
    second (0: no limit of that kind), from buckets that hold BURST seconds'
    worth; what is over it is counted, to be said (`report`)."""

    lines: int
    nbytes: int
    line_tokens: float = 0.0
    byte_tokens: float = 0.0
    stamp: float | None = None
    dropped_lines: int = 0
    dropped_bytes: int = 0
    dropping_since: float | None = None  # the first drop not said yet
    said: float = float("-inf")
    # the bytes the line that did not fit wants (at most a burst): until the
    # bucket holds them the vassal is over its limit, though not empty, or
    # lines longer than what is left would be read and dropped without end
    wanted: float = 0.0

    def refill(self, now: float) -> None:
        if self.stamp is None:
            self.line_tokens, self.byte_tokens = self.lines * BURST, self.nbytes * BURST
        else:
            dt = max(0.0, now - self.stamp)
            self.line_tokens = min(self.lines * BURST, self.line_tokens + self.lines * dt)
            self.byte_tokens = min(self.nbytes * BURST, self.byte_tokens + self.nbytes * dt)
        self.stamp = now
        if self.byte_tokens >= self.wanted:
            self.wanted = 0.0

    def spent(self) -> bool:
        return (self.lines > 0 and self.line_tokens < 1) or \
            (self.nbytes > 0 and self.byte_tokens < max(1.0, self.wanted))

    def take(self, lines: list[str], now: float) -> list[str]:
        """The first of `lines` that fit (the others are counted dropped)."""
        self.refill(now)
        n = 0
        for line in lines:
            size = len(line) + 1
            if self.spent():
                break
            if self.nbytes > 0 and size > self.byte_tokens:
                self.wanted = min(size, self.nbytes * BURST)
                break
            self.line_tokens -= 1
            self.byte_tokens -= size
            n += 1
        if n < len(lines):
            self.drop(len(lines) - n, sum(len(line) + 1 for line in lines[n:]), now)
        return lines[:n] if n < len(lines) else lines

    def drop(self, lines: int, nbytes: int, now: float) -> None:
        if not (lines or nbytes):
            return
        self.dropped_lines += lines
        self.dropped_bytes += nbytes
        if self.dropping_since is None:
            self.dropping_since = now

    def report_due(self) -> float | None:
        """When the drops not said yet are to be said."""
        if self.dropping_since is None:
            return None
        return max(self.said + REPORT_EVERY, self.dropping_since)

    def report(self, now: float, at_once: bool = False) -> str | None:
        """The line that says the drops since the last one, if it is time
        (`at_once`: if there are any; the vassal is gone)."""
        due = self.report_due()
        if due is None or (now < due and not at_once):
            return None
        since = min(self.dropping_since or now, now)
        text = (f"log limit: {self.dropped_lines} lines ({self.dropped_bytes} bytes) of its output dropped "
                f"in {max(now - since, 0.0):.1f} s, over {self._what()}")
        self.dropped_lines = self.dropped_bytes = 0
        self.dropping_since = None
        self.said = now
        return text

    def _what(self) -> str:
        parts = []
        if self.lines:
            parts.append(f"{self.lines} lines")
        if self.nbytes:
            parts.append(f"{self.nbytes} bytes")
        return " or ".join(parts) + " a second (log-lines-per-second, log-bytes-per-second)"


class OutputPipe:
    """One vassal process's stdout and stderr: the pipe the Emperor reads.

    `wfd` is the write end to pass to the process (closed by `passed()`
    once it is); `rfd` the non-blocking read end, in the Emperor's loop
    until every process holding the write end has exited (EOF)."""

    def __init__(self, rfd: int | None = None) -> None:
        """A new pipe; or, with `rfd`, the read end of one made elsewhere."""
        if rfd is None:
            self.rfd, self.wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            os.set_blocking(self.wfd, True)  # the vassal's end: writers block, never lose lines
            # room for a busy vassal's lines while the Emperor is busy or
            # frozen (the 64 KiB default is ~600 access lines); best effort
            try:
                fcntl.fcntl(self.rfd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass
        else:
            self.rfd, self.wfd = rfd, -1
            os.set_blocking(rfd, False)
        self.buf = bytearray()

    def passed(self) -> None:
        if self.wfd >= 0:
            os.close(self.wfd)
            self.wfd = -1

    def read_lines(self) -> tuple[bytes, bool]:
        """`read`'s whole lines, as they are: bytes, newlines kept."""
        data = recv_ready(self.rfd, READ_CHUNK)
        if data is None:
            return b"", False
        self.buf += data
        # whole lines; a line of MAX_LINE bytes, or what is left at the end, as one
        end = len(self.buf) if not data or len(self.buf) >= MAX_LINE else self.buf.rfind(b"\n") + 1
        whole = bytes(self.buf[:end])
        del self.buf[:end]
        return (whole if not whole or whole.endswith(b"\n") else whole + b"\n"), not data

    def read(self) -> tuple[list[str], bool]:
        """The whole lines read now, and whether the pipe reached its end
        (then a last partial line is among them)."""
        data = recv_ready(self.rfd, READ_CHUNK)
        if data is None:
            return [], False
        eof = not data
        self.buf += data
        lines = []
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                if len(self.buf) >= MAX_LINE:
                    i = MAX_LINE
                    lines.append(bytes(self.buf[:i]))
                    del self.buf[:i]
                    continue
                break
            lines.append(bytes(self.buf[:i]))
            del self.buf[:i + 1]
        if eof and self.buf:
            lines.append(bytes(self.buf))
            self.buf.clear()
        return [ln.rstrip(b"\r").decode("utf-8", "replace") for ln in lines], eof

    def drop(self) -> tuple[int, int, bool]:
        """Read what the pipe holds (up to PIPE_SIZE) and throw it away,
        lines not looked at but counted; a partial last line is kept (its
        head was relayed or counted). (lines, bytes, end of file)."""
        data = recv_ready(self.rfd, PIPE_SIZE)
        if data is None:
            return 0, 0, False
        if not data:
            n = len(self.buf)
            self.buf.clear()
            return (1 if n else 0), n, True
        self.buf += data
        end = self.buf.rfind(b"\n") + 1
        if end == 0 and len(self.buf) >= MAX_LINE:
            end = len(self.buf)
        lines = self.buf.count(b"\n", 0, end) if end else 0
        if end and not self.buf.endswith(b"\n", 0, end):
            lines += 1  # a long line cut at MAX_LINE
        del self.buf[:end]
        return lines, end, False

    def close(self) -> None:
        self.passed()
        if self.rfd >= 0:
            os.close(self.rfd)
            self.rfd = -1
