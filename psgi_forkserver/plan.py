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
- settled vassals (`Settled`): one whose process serves, that decided
  nothing last turn and to which nothing happened since, is not stepped
  again until something does or its own deadline (a heartbeat's) comes.
  A turn then costs what changed, not the whole fleet: a mass start of N
  vassals takes some N turns, and stepping all N in each was most of the
  Emperor's CPU at 1,000.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from .proc import CHANGED, CODE_DEPLOY, Action, Adopt, Context, Forget, ForkServer, Kind, Phase, Proc
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


@dataclass
class Settled:
    """Vassals whose step decided nothing and cannot decide anything until
    one of their fields or their current process's is assigned (Versioned),
    the fork server's state or generation moves, a shutdown starts, or their
    own next wake-up comes: a process that serves (no successor, none
    retiring, no reload due), or none and none to start (stopped, refused, a
    config error, throttled, on-demand asleep, waiting for the base). A
    vassal queued for an adoption slot is left out only while no slot is
    free at its place in the turn's order. Bases are stepped every turn."""

    # name -> (the Vassal, its current Proc, next wake-up or None, queued for a slot)
    marks: dict[str, tuple[Vassal, Proc | None, float | None, bool]] = field(default_factory=dict)
    owners: dict[int, str] = field(default_factory=dict)  # id of a marked Vassal or Proc -> name
    wakes: dict[str, float] = field(default_factory=dict)  # the marked with a wake-up
    world: tuple = ()

    def _drop(self, name: str) -> None:
        m = self.marks.pop(name, None)
        if m is not None:
            self.owners.pop(id(m[0]), None)
            if m[1] is not None:
                self.owners.pop(id(m[1]), None)
            self.wakes.pop(name, None)

    def begin(self, facts: Facts) -> None:
        """Once a turn, before anything is looked at: forget the marks of
        what changed since, or all of them when the world did."""
        world = (facts.fork_server, facts.base_generation, facts.shutting_down)
        if world != self.world:
            self.world = world
            self.marks.clear()
            self.owners.clear()
            self.wakes.clear()
        else:
            self.forget_changed()
            for name in [n for n, t in self.wakes.items() if facts.now >= t]:
                self._drop(name)
        CHANGED.clear()

    def forget_changed(self) -> None:
        """Unmark the vassals assigned to since the last look."""
        for oid in CHANGED:
            name = self.owners.get(oid)
            if name is not None:
                self._drop(name)
        CHANGED.clear()

    def active(self, vassals: dict[str, Vassal] | list[Vassal], slots: int) -> list[Vassal]:
        """The vassals to step this turn: the unmarked, and the first `slots`
        queued by name (only those can get one of the turn's free slots: each
        of them takes one, nothing having happened to it since it queued)."""
        queued = heapq.nsmallest(slots, (n for n, m in self.marks.items() if m[3])) if slots > 0 else []
        if isinstance(vassals, dict):
            return [vassals[n] for n in vassals.keys() - self.marks.keys()] + [self.marks[n][0] for n in queued]
        first = set(queued)
        return [v for v in vassals if v.name not in self.marks or v.name in first]

    def queued(self, v: Vassal) -> bool:
        m = self.marks.get(v.name)
        return m is not None and m[3]

    def settle(self, v: Vassal, ctx: Context) -> None:
        """After a step that decided nothing: mark it if that holds until
        something happens to it."""
        self._drop(v.name)
        queued = False
        cur = v.current
        if v.is_base or v.successor is not None or v.retiring:
            return
        if cur is not None:
            if (not cur.live or v.stop_reason or v.held or v.config is None
                    or v.config.error is not None or v._reload_reason(ctx) is not None):
                return
        # the reasons Decisions._step_idle starts nothing, in its order
        elif (not v.wanted(ctx) or (v.phase == Phase.THROTTLED and ctx.now < v.not_before)
              or (v.on_demand and not v.woken)
              or (v._kind_for(ctx) == Kind.ADOPTED and ctx.fork_server != ForkServer.READY)):
            pass  # nothing to start until a fact, its wake-up, or the world changes
        elif v._kind_for(ctx) == Kind.ADOPTED and ctx.adopt_slots <= 0:
            queued = True
        else:
            return
        wake = v.next_wakeup()
        self.marks[v.name] = (v, cur, wake, queued)
        self.owners[id(v)] = v.name
        if cur is not None:
            self.owners[id(cur)] = v.name
        if wake is not None:
            self.wakes[v.name] = wake

    def unmark(self, name: str) -> None:
        self._drop(name)

    def wakeups(self, vassals: dict[str, Vassal]) -> list[float]:
        """Every vassal's next wake-up: the marked from their marks."""
        self.forget_changed()
        times = list(self.wakes.values())
        for name in vassals.keys() - self.marks.keys():
            t = vassals[name].next_wakeup()
            if t is not None:
                times.append(t)
        return times


def runs_as_base(v: Vassal) -> bool:
    """Its process is a base (or, with none, its file says it is one)."""
    return v.kind == Kind.BASE if v.has_process else v.is_base


def plan(vassals: Iterable[Vassal] | dict[str, Vassal], facts: Facts,
         settled: Settled | None = None) -> Plan:
    if settled is None:
        every = list(vassals.values() if isinstance(vassals, dict) else vassals)
        active = every
        n_settled = 0
    else:
        settled.begin(facts)
        active = settled.active(vassals if isinstance(vassals, dict) else list(vassals),
                                max(0, facts.adopt_parallel - facts.adoptions_in_flight))
        n_settled = len(settled.marks) - sum(1 for v in active if settled.queued(v))
    others = sorted((v for v in active if not runs_as_base(v)), key=lambda v: v.name)
    bases = sorted((v for v in active if runs_as_base(v)), key=lambda v: v.name)
    out = Plan(movers={v.name: v.successor for v in others
                       if v.successor is not None and v.successor.reason == CODE_DEPLOY})
    deploy_slots = max(0, facts.deploy_parallel - len(out.movers))
    adopt_slots = max(0, facts.adopt_parallel - facts.adoptions_in_flight)
    # vassals that are not bases and are not forgotten this turn (a settled
    # vassal is never a base)
    staying = n_settled
    for v in others:
        if settled is not None and adopt_slots <= 0 and settled.queued(v):
            staying += 1
            continue  # still queued: no slot for it this turn
        before = v.successor
        ctx = Context(facts.now, facts.fork_server, facts.shutting_down,
                      base_generation=facts.base_generation,
                      deploy_slots=deploy_slots, adopt_slots=adopt_slots)
        s = _step(v, ctx, False)
        out.steps.append(s)
        if settled is not None:
            if s.actions or s.error is not None:
                settled.unmark(v.name)
            else:
                settled.settle(v, ctx)
        adopt_slots -= sum(1 for a in s.actions if isinstance(a, Adopt))
        if v.successor is not None and v.successor is not before \
                and v.successor.reason == CODE_DEPLOY:
            deploy_slots -= 1
        if not any(isinstance(a, Forget) for a in s.actions):
            staying += 1
    hold_bases = facts.shutting_down and staying > 0
    users: frozenset[int] = frozenset()
    if any(b.retiring for b in bases):  # only a retiring base asks (is it drained?)
        users = frozenset(
            p.base_generation
            for v in (vassals.values() if isinstance(vassals, dict) else vassals)
            for p in (v.current, v.successor)
            if p is not None and p.kind == Kind.ADOPTED
        )
    for v in bases:
        ctx = Context(facts.now, facts.fork_server, facts.shutting_down, hold_bases,
                      base_generation=facts.base_generation, base_users=users)
        out.steps.append(_step(v, ctx, True))
    if settled is not None:
        CHANGED.clear()  # what the steps assigned: decided with, so already seen
    return out


def _step(v: Vassal, ctx: Context, base: bool) -> Step:
    try:
        return Step(v, base, v.step(ctx))
    except Exception as e:  # noqa: BLE001 - one vassal's failure is its own
        return Step(v, base, [], e)
