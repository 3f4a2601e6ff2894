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
  backlog (`adopt_slots`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .proc import CODE_DEPLOY, Action, Adopt, Context, Forget, ForkServer, Kind, Proc
from .vassal import Vassal


@dataclass(frozen=True)
class Facts:
    """What the Emperor knows at the start of a turn, besides the vassals."""

    now: float
    fork_server: ForkServer = ForkServer.NONE
    base_generation: int = 0  # generation of the ready fork server
    shutting_down: bool = False
    deploy_parallel: int = 4
    adopt_parallel: int = 8
    adoptions_in_flight: int = 0


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

    def actions(self) -> dict[str, list[Action]]:
        """Name -> actions (for tests and logs)."""
        return {s.vassal.name: s.actions for s in self.steps}


def runs_as_base(v: Vassal) -> bool:
    """Its process is a base (or, with none, its file says it is one)."""
    return v.kind == Kind.BASE if v.has_process else v.is_base


def plan(vassals: Iterable[Vassal], facts: Facts) -> Plan:
    vassals = list(vassals)
    others = sorted((v for v in vassals if not runs_as_base(v)), key=lambda v: v.name)
    bases = sorted((v for v in vassals if runs_as_base(v)), key=lambda v: v.name)
    out = Plan(movers={v.name: v.successor for v in others
                       if v.successor is not None and v.successor.reason == CODE_DEPLOY})
    deploy_slots = max(0, facts.deploy_parallel - len(out.movers))
    adopt_slots = max(0, facts.adopt_parallel - facts.adoptions_in_flight)
    staying = 0  # vassals that are not bases and are not forgotten this turn
    for v in others:
        before = v.successor
        ctx = Context(facts.now, facts.fork_server, facts.shutting_down,
                      base_generation=facts.base_generation,
                      deploy_slots=deploy_slots, adopt_slots=adopt_slots)
        s = _step(v, ctx, False)
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
        out.steps.append(_step(v, ctx, True))
    return out


def _step(v: Vassal, ctx: Context, base: bool) -> Step:
    try:
        return Step(v, base, v.step(ctx))
    except Exception as e:  # noqa: BLE001 - one vassal's failure is its own
        return Step(v, base, [], e)
