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
- draining: an old generation of the base vassals are adopted from stops
  only once none runs on it (`base_users`); another base's, at once;
- code deploys: at most `deploy_parallel` adopted vassals move onto a new
  base generation at a time (`deploy_slots`);
- adoptions: at most `adopt_parallel` requests in flight; the fork server serves them one
  after another, so a mass start queues here, not in its backlog (`adopt_slots`);
- what the Emperor does for the fleet besides the vassals' own lives, each
  a planned action from a fact: an adoption that failed or got no reply in
  time is failed (`FailAdoption`), a refused vassal admitted when the
  descriptor budget has room (`Admit`), a base judged wedged killed
  (`KillWedged`), the orphans of ended processes swept (`Sweep`) and
  killed after the mercy timeout (`KillOrphans`), emptied cgroups removed
  (`CleanCgroups`), the cgroups of a starting fork server's first
  adoptions made meanwhile (`PrepareBirthplaces`);
- whether the turn must run again at once (`Plan.again`): a new base
  generation became ready, or a vassal's move ended and freed a deploy slot;
- which vassals to step at all (`Settled`): one whose last step decided
  nothing (its `Quiet`) is left out until a fact is recorded on it, its own
  wake-up comes, a slot it waits for is free, the world changes, or the
  safety net's turn (`Settled.SAFETY` after anything happened). A turn
  costs what changed, not the fleet; an idle fleet's costs nothing.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..proc import CODE_DEPLOY, Action, Adopt, Context, Forget, ForkServer, Kind, Proc, ProcState
from .fleet_actions import (CleanCgroups, FleetAction, KillOrphans, KillStragglers, KillWedged,
                            PrepareBirthplaces, StopFrontDoor, Sweep)
from .vassal import Slot, Vassal


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
    birthplaces: bool = False  # vassals are born in cgroups: made ahead (PrepareBirthplaces)
    # during a shutdown (the Emperor's Shutdown part measures them)
    front_running: bool = False  # the front door's nginx still runs
    no_children: bool = False  # every child of the Emperor is reaped
    final_sweep_due: bool = False  # the sweep once every vassal is gone
    stragglers_due: bool = False  # the mercy is over: kill what is left (once a second)
    give_up: bool = False  # ten seconds after that, stop waiting
    heard: float | None = None  # what was sent before this was read (Context.heard)
    events: int = 0  # what the Emperor handled so far (events, reaps, reads, actions: Settled)
    adopter: str | None = None  # the base vassals are adopted from (None: any base)


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
    # vassals moving to a new base generation as the turn began (one done: a slot is free)
    movers: dict[str, Proc] = field(default_factory=dict)
    fleet: list[FleetAction] = field(default_factory=list)  # carried out before the steps
    again: bool = False  # the turn must run again at once
    done: bool = False  # a shutdown is complete: the loop ends

    def actions(self) -> dict[str, list[Action]]:  # name -> actions (tests, logs)
        return {s.vassal.name: s.actions for s in self.steps}


@dataclass
class Mark:
    vassal: Vassal
    until: float | None  # its own next wake-up
    slot: Slot | None  # ADOPT or DEPLOY: queued for a slot of the turn


@dataclass
class Settled:
    """The plan's memory of which vassals need no step: those whose last step was quiet
    (`Vassal.quiet`) and to which nothing happened since.

    A vassal is marked after a quiet step, unless it is a base, a mover (its successor is
    a code deploy's: the deploy slots count them every turn) or waits on the other vassals
    (`Slot.TURN`). Its mark goes, and it is stepped again, when a fact is recorded on it
    (every fact method adds its name to `dirty`), when its `until` comes, when an action
    from outside its life is planned for it (a failed adoption, an admission), when the
    world changes (the fork server's state or generation, a shutdown: every mark goes),
    and `SAFETY` seconds (while events keep coming, `SAFETY_PER_VASSAL` a vassal above 200)
    after anything happened (`Facts.events` grew: every mark goes): a fact not marked is
    seen that late, never lost. Of the vassals queued for a slot, the first free-slots by
    name are stepped."""

    SAFETY = 1.0  # s: after anything happened, every vassal is stepped this soon
    # while events keep coming (a mass start), this much a vassal if longer (its turn steps
    # the whole fleet, ~0.05 ms each); once they stop, SAFETY after the last
    SAFETY_PER_VASSAL = 0.005

    marks: dict[str, Mark] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)  # filled by Vassal's fact methods
    wakes: list[tuple[float, str]] = field(default_factory=list)  # heap of marks' `until`
    queues: dict[Slot, list[str]] = field(default_factory=lambda: {Slot.ADOPT: [], Slot.DEPLOY: []})
    world: tuple | None = None
    next_safety: float = float("-inf")
    events: int = 0  # Facts.events at the last turn that stepped every vassal
    seen: tuple[int, float] = (0, float("-inf"))  # Facts.events, and when it last grew
    partial: bool = False  # since, something happened and a turn left vassals out
    steps: int = 0  # vassals stepped so far (tests, measurements)

    def clear(self) -> None:
        self.marks.clear()
        self.wakes.clear()
        for q in self.queues.values():
            q.clear()

    def unmark(self, name: str) -> None:
        m = self.marks.pop(name, None)
        if m is not None and m.slot is not None:
            q = self.queues[m.slot]
            i = bisect.bisect_left(q, name)
            if i < len(q) and q[i] == name:
                del q[i]
        # its entry in `wakes`, if any, is dropped when it comes up

    def mark(self, v: Vassal) -> None:
        """After v's quiet step."""
        q = v.quiet
        assert q is not None and q.slot != Slot.TURN
        self.marks[v.name] = Mark(v, q.until, q.slot)
        if q.until is not None:
            heapq.heappush(self.wakes, (q.until, v.name))
        if q.slot is not None:
            bisect.insort(self.queues[q.slot], v.name)

    def begin(self, facts: Facts, vassals: int = 0) -> None:
        """Once a turn, first: the marks of what happened since go (`vassals`: how many)."""
        world = (facts.fork_server, facts.base_generation, facts.shutting_down)
        happened = facts.events != self.events
        if facts.events != self.seen[0]:
            self.seen = (facts.events, facts.now)
        due = min(self.next_safety, self.seen[1] + self.SAFETY)  # the safety net's turn
        if world != self.world or (facts.now >= due and happened):
            self.world = world
            self.next_safety = facts.now + max(self.SAFETY, vassals * self.SAFETY_PER_VASSAL)
            self.events = facts.events
            self.clear()
            self.partial = False
        elif happened:
            self.partial = True
        for name in self.dirty:
            self.unmark(name)
        self.dirty.clear()
        while self.wakes and self.wakes[0][0] <= facts.now:
            t, name = heapq.heappop(self.wakes)
            m = self.marks.get(name)
            if m is not None and m.until == t:
                self.unmark(name)

    def unmarked(self, vassals: Mapping[str, Vassal]) -> list[Vassal]:
        return [vassals[n] for n in vassals.keys() - self.marks.keys()]

    def take(self, vassals: Mapping[str, Vassal], adopt_slots: int, deploy_slots: int,
             outside: Iterable[str]) -> list[Vassal]:
        """The marked vassals to step this turn after all (their marks go):
        those an action from outside is planned for, and of those queued
        for a slot, the first free-slots by name (each of them takes one if
        it is left when its turn comes: the later ones could not get one)."""
        queued = self.queues[Slot.ADOPT][:max(0, adopt_slots)] \
            + self.queues[Slot.DEPLOY][:max(0, min(adopt_slots, deploy_slots))]
        out = []
        for name in {*queued, *outside}:
            if name in self.marks:
                self.unmark(name)
                if name in vassals:
                    out.append(vassals[name])
        return out

    def stepped(self, s: Step) -> None:
        """After a vassal's step: marked if it was quiet and may be left out."""
        v = s.vassal
        self.steps += 1
        self.dirty.discard(v.name)  # what its own step changed, it has seen
        v.report_facts_to(self.dirty)
        q = v.quiet
        if (s.error is None and not s.actions and not s.base and q is not None
                and q.slot != Slot.TURN
                and not (v.successor is not None and v.successor.reason == CODE_DEPLOY)):
            self.mark(v)

    def wakeups(self, vassals: Mapping[str, Vassal]) -> list[float]:
        """When a turn is due without any event: the marked vassals' earliest
        wake-up, the safety net's turn (`partial`: a fleet nothing happens
        to is never woken for it), every unmarked vassal's wake-up."""
        while self.wakes:
            t, name = self.wakes[0]
            m = self.marks.get(name)
            if m is not None and m.until == t:
                break
            heapq.heappop(self.wakes)  # its mark went
        times = [min(self.next_safety, self.seen[1] + self.SAFETY)] if self.marks and self.partial else []
        if self.wakes:
            times.append(self.wakes[0][0])
        for n in vassals.keys() - self.marks.keys():
            if (t := vassals[n].next_wakeup()) is not None:
                times.append(t)
        return times


def runs_as_base(v: Vassal) -> bool:
    """Its process is a base (or, with none, its file says it is one)."""
    return v.kind == Kind.BASE if v.has_process else v.is_base


def serving(v: Vassal) -> tuple[bool, int]:
    """A base vassal's fork server: (ready, its generation)."""
    cur = v.current
    ready = cur is not None and cur.kind == Kind.BASE and cur.state in (
        ProcState.RUNNING, ProcState.LOYAL)
    return (True, cur.base_generation) if ready and cur is not None else (False, 0)


def fleet_actions(facts: Facts, no_vassals: bool) -> list[FleetAction]:
    out: list[FleetAction] = [KillWedged(pid, why) for pid, why in facts.wedged]
    if facts.sweep_due and not facts.shutting_down:
        # during a shutdown, one sweep once every vassal is gone does it
        # all (below), not one per vassal that stops
        out.append(Sweep())
    if facts.orphans_due:
        out.append(KillOrphans())
    if facts.cgroups_due:
        out.append(CleanCgroups())
    if facts.birthplaces and facts.fork_server == ForkServer.WAITING and not facts.shutting_down:
        out.append(PrepareBirthplaces())
    if facts.shutting_down:
        if no_vassals and facts.front_running:
            out.append(StopFrontDoor())
        if no_vassals and not facts.no_children and facts.final_sweep_due:
            out.append(Sweep(everything=True))
        if facts.stragglers_due:
            out.append(KillStragglers())
    return out


def _from_outside(vassals: Iterable[Vassal], facts: Facts) -> dict[str, list]:
    """Per vassal, the actions on it that are facts from outside its life:
    failed adoptions, admissions (the refused, by name, as room allows)."""
    out: dict[str, list] = {}
    for f in facts.adoptions_failed:
        out.setdefault(f.name, []).append(FailAdoption(f.reason, f.timed_out, seq=f.seq))
    room = facts.room
    if room <= 0:
        return out
    for v in sorted(vassals, key=lambda v: v.name):
        if room <= 0:
            break
        if v.refused:
            out.setdefault(v.name, []).append(Admit())
            room -= 1
    return out


def plan(vassals: Iterable[Vassal] | Mapping[str, Vassal], facts: Facts,
         settled: Settled | None = None) -> Plan:
    """The turn's plan. With `settled` (the Emperor's), only the vassals it
    does not leave out are stepped (and it is told what each step decided);
    without, every vassal is."""
    fleet = vassals if isinstance(vassals, Mapping) else {v.name: v for v in vassals}
    outside = _from_outside(fleet.values(), facts)
    adopt_slots = max(0, facts.adopt_parallel - facts.adoptions_in_flight)
    if settled is None:
        active = list(fleet.values())
    else:
        settled.begin(facts, len(fleet))
        active = settled.unmarked(fleet)
        # movers are never marked: all of them are among the unmarked
        moving = sum(1 for v in active if v.successor is not None and v.successor.reason == CODE_DEPLOY)
        active += settled.take(fleet, adopt_slots, facts.deploy_parallel - moving, outside)
    others = sorted((v for v in active if not runs_as_base(v)), key=lambda v: v.name)
    bases = sorted((v for v in active if runs_as_base(v)), key=lambda v: v.name)
    out = Plan(movers={v.name: v.successor for v in others
                       if v.successor is not None and v.successor.reason == CODE_DEPLOY},
               fleet=fleet_actions(facts, not fleet))
    deploy_slots = max(0, facts.deploy_parallel - len(out.movers))
    # vassals that are not bases and are not forgotten this turn (the marked left out too)
    staying = len(settled.marks) if settled is not None else 0
    for v in others:
        before = v.successor
        ctx = Context(facts.now, facts.fork_server, facts.shutting_down,
                      base_generation=facts.base_generation,
                      deploy_slots=deploy_slots, adopt_slots=adopt_slots, heard=facts.heard)
        s = _step(v, ctx, False, outside.get(v.name, []))
        out.steps.append(s)
        if settled is not None:
            settled.stepped(s)
        adopt_slots -= sum(1 for a in s.actions if isinstance(a, Adopt))
        if v.successor is not None and v.successor is not before \
                and v.successor.reason == CODE_DEPLOY:
            deploy_slots -= 1
        if not any(isinstance(a, Forget) for a in s.actions):
            staying += 1
    hold_bases = facts.shutting_down and staying > 0
    # only a base with a process retiring asks (is its generation drained?)
    users = frozenset(
        p.base_generation
        for v in fleet.values()
        for p in (v.current, v.successor)
        if p is not None and p.kind == Kind.ADOPTED
    ) if any(b.retiring for b in bases) else frozenset()
    for v in bases:
        ctx = Context(facts.now, facts.fork_server, facts.shutting_down, hold_bases,
                      base_generation=facts.base_generation, heard=facts.heard,
                      base_users=users if facts.adopter in (None, v.name) else frozenset())
        was = serving(v)
        s = _step(v, ctx, True, outside.get(v.name, []))
        out.steps.append(s)
        if settled is not None:
            settled.stepped(s)
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
    # a vassal gone during a shutdown: the fleet's last steps may be due
    if facts.shutting_down and any(isinstance(a, Forget) for s in out.steps for a in s.actions):
        out.again = True
    out.done = facts.shutting_down and ((not fleet and facts.no_children) or facts.give_up)  # all gone
    return out


def _step(v: Vassal, ctx: Context, base: bool, outside: list) -> Step:
    try:
        return Step(v, base, [*outside, *v.step(ctx)])
    except Exception as e:  # noqa: BLE001 - one vassal's failure is its own
        return Step(v, base, outside, e)
