"""The actions the plan takes for the fleet as a whole, not for one
vassal's life: a wedged base killed, what ended processes left swept, due
orphans killed, emptied cgroups removed, the cgroups of the vassals a
starting fork server is to fork made ahead, and a shutdown's last steps (the
front door stopped once every vassal is gone, one final sweep, stragglers
killed once the mercy is over). Decided from facts alone (plan.fleet_actions),
carried out by the loop."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KillWedged:
    """SIGKILL a base process judged wedged (bases.WedgeWatch)."""

    pid: int
    why: str


@dataclass(frozen=True)
class Sweep:
    """Look for what ended vassal processes left behind; ask it to go
    (`everything`: the shutdown's final sweep, of every session we made)."""

    everything: bool = False


@dataclass(frozen=True)
class KillOrphans:
    """SIGKILL the orphans whose mercy timeout is over."""


@dataclass(frozen=True)
class CleanCgroups:
    """Remove the cgroups of ended processes (killing what is left in them)."""


@dataclass(frozen=True)
class PrepareBirthplaces:
    """While the fork server starts: make the cgroups its first adoptions
    will be cloned into (each waiting vassal's next process), so that the
    mass start that follows makes none."""


@dataclass(frozen=True)
class StopFrontDoor:
    """A shutdown with every vassal gone: stop nginx (it served until then)."""


@dataclass(frozen=True)
class KillStragglers:
    """A shutdown past its mercy timeout: SIGKILL every child left."""


FleetAction = (KillWedged | Sweep | KillOrphans | CleanCgroups | PrepareBirthplaces | StopFrontDoor
               | KillStragglers)
