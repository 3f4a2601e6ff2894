"""What the operator watches of a running Emperor, fed once a turn: the
status server (the stats socket and the status page, bound by the cli:
`opts.status`), systemd's notify socket, the progress lines of a mass start
and the deploy metrics. It reads the fleet (control.Fleet) and changes
nothing of it; the operator's commands reach the vassals through
control.py."""

from __future__ import annotations

import selectors
from collections.abc import Callable
from typing import Any

from ..options import Options
from ..status import sweep_requests
from . import control, notify
from .plan import runs_as_base
from .progress import StartProgress


class Cockpit:
    def __init__(self, fleet: control.Fleet, opts: Options, log: Callable[[str], None]) -> None:
        self.fleet = fleet
        self.opts = opts
        self.notifier = notify.Notifier.from_env(log)
        self.start_progress = StartProgress(log)

    @property
    def status(self) -> Any:
        """The status server (status.StatusServer), or None; the cli binds
        it once the Emperor holds its locks, after the Emperor is made."""
        return self.opts.status

    def attach(self, sel: selectors.BaseSelector, log: Callable[..., None]) -> None:
        """Before anything starts: the requests files a run killed with -9
        left are swept, the status sockets join the Emperor's selector."""
        sweep_requests()
        if self.status is not None:
            self.status.attach(sel, log, control.link(self.fleet))

    def observe(self, now: float) -> None:
        """Once a turn, after it acted. Lazily: the progress lines look
        every StartProgress.LOOK_EVERY seconds."""
        fleet = self.fleet
        self.start_progress.observe(now, lambda: {v.name: v.phase for v in fleet.vassals.values()
                                                  if not runs_as_base(v)})
        if self.status is not None:
            self.status.poll(now)
        fleet.metrics.observe_deploy(fleet.bases.deploys.last)
        self.notifier.poll(lambda: control.snapshot(fleet), now)

    def next_wakeups(self) -> list[float]:
        times = (self.notifier.next_wakeup(), self.start_progress.next_wakeup(),
                 self.status.next_wakeup() if self.status is not None else None)
        return [t for t in times if t is not None]

    def close(self) -> None:
        self.notifier.close()
