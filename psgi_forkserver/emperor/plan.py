"""One turn's plan: what every vassal must do now, from the facts alone.

`plan()` is the middle of the Emperor's turn (read facts -> plan -> act):
given the vassals (each a state machine holding its facts), what the
Emperor knows about the fork server, and its limits, it returns every
vassal's actions in the order they must be carried out. It starts no
process and reads no file, socket or clock; its only effect is on the state
machines it is given (`Vassal.step` records what it decided, e.g. that a
successor is starting), so it is unit-tested with plain Vassal objects.

What it decides across vassals (each vassal decides its own life):

- order: vassals that are not bases first, by name; then the bases. During
  a shutdown the bases are held until no other vassal is left, since every
  adopted vassal was forked from one (`hold_bases`);
- draining: an old base generation stops only once no adopted vassal runs
  on it (`base_users`);
- code deploys: at most `deploy_parallel` adopted vassals move onto a new
  base generation at a time (`deploy_slots`);
- adoptions: at most `adopt_parallel` requests in flight; the fork server
  serves them one after another, so a mass start queues here, not in its
  backlog (`adopt_slots`);
- what the Emperor does for the fleet besides the vassals' own lives, each
  a planned action from a fact: an adoption that failed or got no reply in
  time is failed (`FailAdoption`), a refused vassal admitted when the
  descriptor budget has room (`Admit`), a base judged wedged killed
  (`KillWedged`), the orphans of ended processes swept (`Sweep`) and
  killed after the mercy timeout (`KillOrphans`), emptied cgroups removed
  (`CleanCgroups`);
- whether the turn must run again at once (`Plan.again`): a new base
  generation became ready, or a vassal's move ended and freed a deploy slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..proc import CODE_DEPLOY, Action, Adopt, Context, Forget, ForkServer, Kind, Proc, ProcState
from .vassal import Vassal


@dataclass(frozen=True)
class AdoptionFailure:
    """An adoption request that failed: its reply said so, or none came in time."""

    name: str
    seq: int
    reason: str
    timed_out: bool = False


@dataclass(frozen=True)
class Facts:
    """What the Emperor knows at the start of a turn, besides the vassals."""

    now: float
    fork_server: ForkServer = ForkServer.NONE
    base_generation: int = 0  # generation of the ready fork server
    shutting_down: bool = False
    deploy_parallel: int = 4
    adopt_parallel: int = 8
    adoptions_in_flight: int = 0  # those that failed left out
    adoptions_failed: tuple[AdoptionFailure, ...] = ()
    room: int = 0  # refused vassals the descriptor budget has room for
    wedged: tuple[tuple[int, str], ...] = ()  # (pid, why) of bases judged wedged
    sweep_due: bool = False  # a vassal process (or an orphan) ended since the last sweep
    orphans_due: bool = False  # an orphan's mercy timeout is over
    cgroups_due: bool = False  # a vassal's emptied cgroup waits to be removed


# Actions for the fleet, or for one vassal from outside its own life --------


@dataclass(frozen=True)
class FailAdoption:
    """The vassal's adoption request `seq` failed: its handles go, the
    vassal retries after its backoff; a timeout counts against its base."""

    reason: str
    timed_out: bool = False
    seq: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Admit:
    """A refused vassal: the descriptor budget has room for it now."""


@dataclass(frozen=True)
class KillWedged:
    """SIGKILL a base process judged wedged (bases.WedgeWatch)."""

    pid: int
    why: str


@dataclass(frozen=True)
class Sweep:
    """Look for what ended vassal processes left behind; ask it to go."""


@dataclass(frozen=True)
class KillOrphans:
    """SIGKILL the orphans whose mercy timeout is over."""


@dataclass(frozen=True)
class CleanCgroups:
    """Remove the cgroups of ended processes (killing what is left in them)."""


FleetAction = KillWedged | Sweep | KillOrphans | CleanCgroups


@dataclass
class Step:
    """One vassal's part of the plan: its actions, or why it could not decide."""

    vassal: Vassal
    base: bool  # planned as a base (after the others)
    actions: list[Action] = field(default_factory=list)
    error: Exception | None = None  # step() raised: that vassal's failure alone


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    # vassals moving to a new base generation when the turn began: when one
    # of them is done, a deploy slot is free and the turn must run again
    movers: dict[str, Proc] = field(default_factory=dict)
    fleet: list[FleetAction] = field(default_factory=list)  # carried out before the steps
    again: bool = False  # the turn must run again at once

    def actions(self) -> dict[str, list[Action]]:
        """Name -> actions (for tests and logs)."""
        return {s.vassal.name: s.actions for s in self.steps}


def runs_as_base(v: Vassal) -> bool:
    """Its process is a base (or, with none, its file says it is one)."""
    return v.kind == Kind.BASE if v.has_process else v.is_base


def serving(v: Vassal) -> tuple[bool, int]:
    """A base vassal's fork server: (ready, its generation)."""
    cur = v.current
    ready = cur is not None and cur.kind == Kind.BASE and cur.state in (
        ProcState.RUNNING, ProcState.LOYAL)
    return (True, cur.base_generation) if ready and cur is not None else (False, 0)


def _fleet(facts: Facts) -> list[FleetAction]:
    out: list[FleetAction] = [KillWedged(pid, why) for pid, why in facts.wedged]
    if facts.sweep_due and not facts.shutting_down:
        # during a shutdown, one sweep once every vassal is gone does it
        # all (the Emperor's shutdown step), not one per vassal that stops
        out.append(Sweep())
    if facts.orphans_due:
        out.append(KillOrphans())
    if facts.cgroups_due:
        out.append(CleanCgroups())
    return out


def _from_outside(vassals: list[Vassal], facts: Facts) -> dict[str, list]:
    """Per vassal, the actions on it that are facts from outside its life:
    failed adoptions, admissions (the refused, by name, as room allows)."""
    out: dict[str, list] = {}
    for f in facts.adoptions_failed:
        out.setdefault(f.name, []).append(FailAdoption(f.reason, f.timed_out, seq=f.seq))
    room = facts.room
    for v in sorted(vassals, key=lambda v: v.name):
        if room <= 0:
            break
        if v.refused:
            out.setdefault(v.name, []).append(Admit())
            room -= 1
    return out


def plan(vassals: Iterable[Vassal], facts: Facts) -> Plan:
    vassals = list(vassals)
    others = sorted((v for v in vassals if not runs_as_base(v)), key=lambda v: v.name)
    bases = sorted((v for v in vassals if runs_as_base(v)), key=lambda v: v.name)
    out = Plan(movers={v.name: v.successor for v in others
                       if v.successor is not None and v.successor.reason == CODE_DEPLOY},
               fleet=_fleet(facts))
    outside = _from_outside(vassals, facts)
    deploy_slots = max(0, facts.deploy_parallel - len(out.movers))
    adopt_slots = max(0, facts.adopt_parallel - facts.adoptions_in_flight)
    staying = 0  # vassals that are not bases and are not forgotten this turn
    for v in others:
        before = v.successor
        ctx = Context(facts.now, facts.fork_server, facts.shutting_down,
                      base_generation=facts.base_generation,
                      deploy_slots=deploy_slots, adopt_slots=adopt_slots)
        s = _step(v, ctx, False, outside.get(v.name, []))
        out.steps.append(s)
        adopt_slots -= sum(1 for a in s.actions if isinstance(a, Adopt))
        if v.successor is not None and v.successor is not before \
                and v.successor.reason == CODE_DEPLOY:
            deploy_slots -= 1
        if not any(isinstance(a, Forget) for a in s.actions):
            staying += 1
    hold_bases = facts.shutting_down and staying > 0
    users = frozenset(
        p.base_generation
        for v in vassals
        for p in (v.current, v.successor)
        if p is not None and p.kind == Kind.ADOPTED
    )
    for v in bases:
        ctx = Context(facts.now, facts.fork_server, facts.shutting_down, hold_bases,
                      base_generation=facts.base_generation, base_users=users)
        was = serving(v)
        s = _step(v, ctx, True, outside.get(v.name, []))
        out.steps.append(s)
        # a new base generation took over (its successor was promoted just
        # now), or the base goes: nothing else may wake the loop before the
        # next rescan, so the turn runs again
        if serving(v) != was or any(isinstance(a, Forget) for a in s.actions):
            out.again = True
    # a vassal's move ended: a deploy slot is free
    steps = {s.vassal.name: s for s in out.steps}
    if any(any(isinstance(a, Forget) for a in steps[n].actions) or steps[n].vassal.successor is not p
           for n, p in out.movers.items()):
        out.again = True
    return out


def _step(v: Vassal, ctx: Context, base: bool, outside: list) -> Step:
    try:
        return Step(v, base, [*outside, *v.step(ctx)])
    except Exception as e:  # noqa: BLE001 - one vassal's failure is its own
        return Step(v, base, outside, e)
