"""The Emperor's shutdown: asked for by SIGTERM or SIGINT (a second one
takes the mercy away), complete once every vassal, the front door and
every child is gone; stragglers are killed once the mercy timeout is over,
and the Emperor gives up on them ten seconds later."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .orphans import Sweeper
from .outcomes import Outcomes
from .processes import ProcessTable
from .routing import Routes
from .vassal import Vassal

#: after the mercy timeout, how long stragglers are killed before giving up
GIVE_UP_AFTER = 10.0


@dataclass
class Shutdown:
    mercy: float
    log: Callable[[str], None]
    asked: bool = False  # the Emperor is shutting down
    deadline: float = 0.0  # the mercy timeout: then stragglers are killed
    next_straggler_kill: float = 0.0

    def ask(self, why: str, now: float) -> bool:
        """A shutdown asked for (`why`: the signal's name). True the first
        time; a second time, everything is killed now."""
        if self.asked:
            self.log(f"{why} again: killing everything now")
            self.deadline = now
            return False
        self.log(f"{why}: stopping every vassal")
        self.asked = True
        self.deadline = now + self.mercy
        return True

    def wakeups(self, now: float) -> list[float]:
        # while shutting down, keep polling for the last children
        return [self.deadline, now + 0.5] if self.asked else []

    def step(self, now: float, vassals: dict[str, Vassal], routes: Routes, outcomes: Outcomes,
             procs: ProcessTable, sweeper: Sweeper) -> bool:
        """A turn of the shutdown: True when everything is gone."""
        if not vassals:
            if routes.front is not None:
                routes.front.stop()  # last: it served until every vassal was gone
            outcomes.reap(now)
            if procs.no_children:
                return True
            if sweeper.shutdown_sweep_due():
                outcomes.sweep(now, everything=True)
        if now >= self.deadline and now >= self.next_straggler_kill:
            self.next_straggler_kill = now + 1.0
            sweeper.kill_stragglers()
            if now >= self.deadline + GIVE_UP_AFTER:
                self.log("giving up waiting for children")
                return True
        return False
