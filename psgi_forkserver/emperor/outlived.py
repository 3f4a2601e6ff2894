"""Output pipes that outlive their process.

A vassal process's output pipe is read until its end of file, so that what
its orphans write while they are stopped is logged too (logs.Relay). But a
process outside the vassal may hold the write end for ever: the tenant's
app can pass it over a UNIX socket to another of its processes (SCM_RIGHTS),
and a helper that left the session keeps it where no cgroup holds it. Each
such pipe kept one of the Emperor's descriptors, and a vassal asking for its
replacement again and again (byte 22) could take all of them, and with them
every other vassal's start.

So a pipe whose process has exited is read for `mercy` seconds more (by
then the orphan sweep and the cgroup have ended what was the vassal's),
and at most KEEP of them per vassal; then it is closed, said in the log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import logs

KEEP = 2  # pipes of a vassal's exited processes read at once
GRACE = 1.0  # past `mercy`: the last SIGKILLed orphan's end of file arrives


@dataclass
class Outlived:
    out: logs.OutputPipe
    vassal: str
    pid: int
    exited: float
    until: float


class OutlivedOutput:
    """The output pipes of exited processes still read, oldest first."""

    def __init__(self, relay: logs.Relay, log: Callable[..., None], mercy: float) -> None:
        self.relay = relay
        self.log = log
        self.mercy = mercy
        self.held: list[Outlived] = []

    def exited(self, vassal: str, pid: int, out: logs.OutputPipe | None, now: float) -> None:
        """Process `pid` of `vassal` was reaped; `out` its output pipe."""
        if out is None or out.rfd < 0:  # its end of file came already
            return
        self.held = [h for h in self.held if h.out.rfd >= 0]
        self.held.append(Outlived(out, vassal, pid, now, now + self.mercy + GRACE))
        mine = [h for h in self.held if h.vassal == vassal]
        for h in mine[:-KEEP]:
            self._close(h, now)

    def next_wakeup(self) -> list[float]:
        self.held = [h for h in self.held if h.out.rfd >= 0]
        return [min(h.until for h in self.held)] if self.held else []

    def expire(self, now: float) -> None:
        for h in [h for h in self.held if now >= h.until]:
            self._close(h, now)

    def _close(self, h: Outlived, now: float) -> None:
        self.held.remove(h)
        if h.out.rfd < 0:
            return
        self.relay.finish(h.out.rfd)
        self.log(f"output of pid {h.pid} no longer read ({now - h.exited:.1f} s after it exited): "
                 "its pipe is still held by a process outside it", h.vassal)
