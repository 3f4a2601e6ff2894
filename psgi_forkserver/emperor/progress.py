"""Progress lines of long operations: a mass start of many vassals at once.

One line a second while it runs (`start: 120/200 running, 0 failed`), and
one summary at the end, instead of one line per vassal to follow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Progress:
    """A long operation (a mass start, a deploy): one line per second while
    it runs (`deploy: 120/200 moved, 0 failed`), and one summary at the end."""

    what: str  # "start", "deploy"
    verb: str  # "running", "moved"
    total: int
    started: float
    next_line: float = 0.0

    def __post_init__(self) -> None:
        self.next_line = self.started + 1.0

    def line(self, done: int, failed: int) -> str:
        return f"{self.what}: {done}/{self.total} {self.verb}, {failed} failed"

    def due(self, now: float) -> bool:
        if now < self.next_line:
            return False
        self.next_line = now + 1.0
        return True

    def summary(self, done: int, failed: int, now: float) -> str:
        return f"{self.line(done, failed)} in {now - self.started:.1f} s (done)"



class StartProgress:
    """A mass start: while ten or more vassals are starting at once, one
    progress line a second (`start: 120/200 running, 0 failed`), and one
    summary when none is left starting."""

    MIN = 10
    STARTING = ("new", "waiting-for-base", "adopting", "starting")
    DONE = ("running", "loyal", "reloading", "on-demand")
    FAILED = ("throttled", "config-error", "refused")

    # s: a look is O(vassals) (7 % of the Emperor's time in a start of 1,000
    # at 0.05 s); a turn of a mass start costs what changed, the lines say
    # a second at a time
    LOOK_EVERY = 0.25

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.op: Progress | None = None
        self.names: set[str] = set()
        self.next_look = float("-inf")

    def observe(self, now: float, phases: dict[str, str] | Callable[[], dict[str, str]]) -> None:
        """Once per loop turn: each (non-base) vassal's phase (or what
        returns them), looked at every LOOK_EVERY seconds at most."""
        if now < self.next_look:
            return
        self.next_look = now + self.LOOK_EVERY
        if callable(phases):
            phases = phases()
        starting = {n for n, ph in phases.items() if ph in self.STARTING}
        if self.op is None:
            if len(starting) < self.MIN:
                return
            self.names = set(starting)
            self.op = Progress("start", "running", len(self.names), now)
        else:
            self.names |= starting
            self.op.total = len(self.names)
        names = self.names
        done = sum(1 for n in names if phases.get(n) in self.DONE)
        failed = sum(1 for n in names if phases.get(n) in self.FAILED)
        gone = sum(1 for n in names if n not in phases)
        if not (starting & names):
            self.emit(self.op.summary(done, failed + gone, now))
            self.op, self.names = None, set()
        elif self.op.due(now):
            self.emit(self.op.line(done, failed + gone))

    def next_wakeup(self) -> float | None:
        """While a start runs, its next look (its end is told without delay)."""
        return self.next_look if self.op is not None else None
