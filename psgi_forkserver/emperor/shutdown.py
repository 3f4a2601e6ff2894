"""The Emperor's shutdown: asked for by SIGTERM or SIGINT (a second one
takes the mercy away), complete once every vassal, the front door and
every child is gone; stragglers are killed once the mercy timeout is over,
and the Emperor gives up on them ten seconds later. This part keeps the
shutdown's clock and measures its facts; the plan decides its actions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..frontdoor import FrontDoor
from .orphans import Sweeper
from .processes import ProcessTable

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

    def measure(self, now: float, vassals_gone: bool, front: FrontDoor | None, procs: ProcessTable,
                sweeper: Sweeper) -> dict[str, bool]:
        """The shutdown's facts for the plan (which decides what to do with
        them: plan.fleet_actions); none before a shutdown is asked for."""
        if not self.asked:
            return {}
        return {
            "front_running": front is not None and not front.stopping,
            "no_children": procs.no_children,
            # once every vassal is gone: everything once, then again after
            # each orphan that ends (its own children come to us)
            "final_sweep_due": vassals_gone and sweeper.shutdown_sweep_due(),
            "stragglers_due": now >= self.deadline and now >= self.next_straggler_kill,
            "give_up": now >= self.deadline + GIVE_UP_AFTER,
        }

    def stragglers_killed(self, now: float) -> None:
        self.next_straggler_kill = now + 1.0
