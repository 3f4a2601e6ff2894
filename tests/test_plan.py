"""The turn's plan (plan.py): draining, shutdown order, deploy and adoption
slots, queuing, and every action the Emperor's loop carries out, each shown
planned from facts alone. Real Vassal state machines, no processes."""

import ast
from pathlib import Path

import inspect
import random

from psgi_forkserver.emperor import loop
from psgi_forkserver.emperor.plan import (Admit, AdoptionFailure, CleanCgroups, FailAdoption, Facts,
                                  KillOrphans, KillStragglers, KillWedged, Settled, StopFrontDoor, Sweep,
                                  plan)
from psgi_forkserver.protocol import EmperorByte
from psgi_forkserver.emperor.vassal import (Adopt, Context, Forget, ForkServer, Kill, Kind, Phase,
                                    ProcState, Send, Spawn, Vassal)
from psgi_forkserver.emperor.vassal_view import VassalView

from support.vassals import POLICY, cfg


def facts(now, **kw):
    kw.setdefault("fork_server", ForkServer.READY)
    kw.setdefault("base_generation", 1)
    return Facts(now, **kw)


def base(gen=1, pid=10, now=0.0):
    """A base vassal serving generation `gen` (ready)."""
    b = Vassal("base", cfg("base", **{"fork-server": "fs.sock"}), is_base=True, policy=POLICY)
    b.want_base_generation = gen
    acts = b.step(Context(now, ForkServer.WAITING))
    assert acts == [Spawn(Kind.BASE)]
    b.spawned(pid, now, seq=acts[0].seq)
    b.on_byte(1, now, seq=acts[0].seq)
    return b


def running(name, gen=1, pid=100, now=0.0, owns_socket=True):
    """An adopted vassal, loyal, on base generation `gen`."""
    v = Vassal(name, cfg(name), policy=POLICY, owns_socket=owns_socket)
    acts = plan([v], facts(now, base_generation=gen)).actions()[name]
    assert acts == [Adopt()]
    v.adopted(pid, now, seq=acts[0].seq)
    v.on_byte(17, now)
    return v


def test_adoptions_queue_beyond_adopt_parallel_and_go_as_slots_free():
    vs = [Vassal(f"app{i}", cfg(f"app{i}"), policy=POLICY) for i in range(5)]
    acts = plan(vs, facts(0, adopt_parallel=3)).actions()
    assert [n for n, a in acts.items() if a == [Adopt()]] == ["app0", "app1", "app2"]
    assert acts["app3"] == acts["app4"] == [] and vs[3].phase == Phase.NEW
    # two requests still in flight: one more may go
    acts = plan(vs, facts(1, adopt_parallel=3, adoptions_in_flight=2)).actions()
    assert acts["app3"] == [Adopt()] and acts["app4"] == []


def test_a_code_deploy_moves_deploy_parallel_vassals_at_a_time():
    vs = [running(f"app{i}", pid=100 + i) for i in range(5)]
    # generation 2 serves now: every adopted vassal on generation 1 must move
    p = plan(vs, facts(1, base_generation=2, deploy_parallel=2))
    moving = [n for n, a in p.actions().items() if a == [Adopt()]]
    assert moving == ["app0", "app1"]
    assert all(v.successor.reason == "code deploy" for v in vs[:2])
    assert all(v.successor is None for v in vs[2:])
    # next turn: both still moving, no slot free
    p = plan(vs, facts(1.1, base_generation=2, deploy_parallel=2))
    assert all(a == [] for a in p.actions().values())
    assert set(p.movers) == {"app0", "app1"}
    # app0's successor is loyal: promoted this turn (the old process
    # retires); its slot was counted when the turn began
    vs[0].adopted(200, 1.2, seq=vs[0].successor.seq)
    vs[0].on_byte(17, 1.2, seq=vs[0].successor.seq)
    p = plan(vs, facts(1.3, base_generation=2, deploy_parallel=2))
    acts = p.actions()
    assert acts["app0"] == [Send(EmperorByte.STOP)] and acts["app2"] == []
    # a mover whose successor changed: the Emperor plans again at once, and
    # the free slot goes to the next vassal by name
    assert vs[0].successor is not p.movers["app0"]
    acts = plan(vs, facts(1.3, base_generation=2, deploy_parallel=2)).actions()
    assert acts["app2"] == [Adopt()] and acts["app3"] == []


def test_an_old_base_generation_drains_before_it_stops():
    b = base(gen=1, pid=10)
    app = running("app", gen=1)
    b.request_deploy()  # generation 2
    acts = plan([b, app], facts(1, base_generation=1)).actions()
    assert acts["base"] == [Spawn(Kind.BASE)]
    b.spawned(11, 1.0, seq=b.successor.seq)
    b.on_byte(1, 1.0, seq=b.successor.seq)
    # the new generation is promoted; the old one holds while `app` runs on it
    acts = plan([b, app], facts(1.1, base_generation=1)).actions()
    assert acts["base"] == [] and b.base_generation == 2
    assert [p.base_generation for p in b.retiring] == [1]
    # app moves to generation 2 (a successor), still on 1 until promoted
    acts = plan([b, app], facts(1.2, base_generation=2)).actions()
    assert acts["app"] == [Adopt()] and acts["base"] == []
    app.adopted(200, 1.3, seq=app.successor.seq)
    app.on_byte(17, 1.3, seq=app.successor.seq)
    # promoted: its old process stops, and generation 1 has no user left
    acts = plan([b, app], facts(1.4, base_generation=2)).actions()
    assert acts["app"] == [Send(EmperorByte.STOP)]
    assert acts["base"] == [Send(EmperorByte.STOP)] and b.retiring[0].pid == 10


def test_shutdown_stops_the_others_first_and_the_bases_once_they_are_gone():
    b = base()
    app = running("app")
    p = plan([app, b], facts(5, shutting_down=True))
    assert [s.vassal.name for s in p.steps] == ["app", "base"]  # others first
    assert p.actions() == {"app": [Send(EmperorByte.STOP)], "base": []}
    app.exited(0, 5.5)
    # app is forgotten this turn: the base is not held any more
    p = plan([app, b], facts(6, shutting_down=True))
    assert p.actions() == {"app": [Forget()], "base": [Send(EmperorByte.STOP)]}


class Broken(Vassal):
    def step(self, ctx):
        raise RuntimeError("a bug in its state machine")


def test_a_vassal_whose_step_fails_is_reported_and_the_others_are_planned():
    good = Vassal("good", cfg("good"), policy=POLICY)
    bad = Broken("bad", cfg("bad"), policy=POLICY)
    p = plan([bad, good], facts(0))
    steps = {s.vassal.name: s for s in p.steps}
    assert isinstance(steps["bad"].error, RuntimeError) and steps["bad"].actions == []
    assert steps["good"].actions == [Adopt()]


def test_a_vassal_that_outlives_its_mercy_is_killed():
    app = running("app")
    assert plan([app], facts(5, shutting_down=True)).actions()["app"] == [Send(EmperorByte.STOP)]
    acts = plan([app], facts(5 + POLICY.mercy + 0.1, shutting_down=True)).actions()["app"]
    assert [type(a) for a in acts] == [Kill]


def test_an_adoption_that_failed_or_timed_out_is_failed_by_the_plan():
    v = Vassal("app", cfg("app"), policy=POLICY)
    (adopt,) = plan([v], facts(0)).actions()["app"]
    failed = AdoptionFailure("app", adopt.seq, "no reply within 2 s", timed_out=True)
    acts = plan([v], facts(3, adoptions_failed=(failed,))).actions()["app"]
    assert acts == [FailAdoption("no reply within 2 s", timed_out=True)]
    assert acts[0].seq == adopt.seq
    # the reply said so: failed the same way, not counted against the base
    acts = plan([v], facts(3, adoptions_failed=(
        AdoptionFailure("app", adopt.seq, "refused"),))).actions()["app"]
    assert acts == [FailAdoption("refused")]


def test_refused_vassals_are_admitted_by_name_as_the_budget_has_room():
    vs = [Vassal(f"app{i}", cfg(f"app{i}"), policy=POLICY) for i in range(3)]
    for v in vs:
        v.refuse("refused: no descriptors to spare")
    acts = plan(vs, facts(0)).actions()
    assert all(Admit() not in a for a in acts.values())  # no room: nothing
    acts = plan(vs, facts(1, room=2)).actions()
    assert [n for n, a in acts.items() if Admit() in a] == ["app0", "app1"]


def test_a_base_judged_wedged_is_killed_by_the_plan():
    p = plan([base(), running("app")], facts(0, wedged=((10, "wedged: 3 adoptions"),)))
    assert p.fleet == [KillWedged(10, "wedged: 3 adoptions")]


def test_orphans_are_swept_and_killed_and_cgroups_cleaned_when_due():
    assert plan([], facts(0)).fleet == []
    p = plan([], facts(0, sweep_due=True, orphans_due=True, cgroups_due=True))
    assert p.fleet == [Sweep(), KillOrphans(), CleanCgroups()]
    # during a shutdown one sweep once every vassal is gone does it all
    assert plan([], facts(0, sweep_due=True, shutting_down=True)).fleet == []


def test_a_shutdown_stops_the_front_door_and_sweeps_once_every_vassal_is_gone():
    down = dict(shutting_down=True, front_running=True, final_sweep_due=True)
    # a vassal still there: the front door serves on, nothing is swept yet
    assert plan([running("app")], facts(0, **down)).fleet == []
    p = plan([], facts(0, **down))
    assert p.fleet == [StopFrontDoor(), Sweep(everything=True)]
    assert not p.done
    # nginx gone, the sweep done: waiting for the last children
    assert plan([], facts(0, shutting_down=True)).fleet == []
    assert not plan([], facts(0, shutting_down=True)).done
    done = plan([], facts(0, shutting_down=True, no_children=True))
    assert done.done and done.fleet == []
    # not shutting down: no vassal and no child is no reason to end
    assert not plan([], facts(0, no_children=True, front_running=True)).done


def test_a_shutdown_past_its_mercy_kills_stragglers_then_gives_up():
    p = plan([running("app")], facts(0, shutting_down=True, stragglers_due=True))
    assert KillStragglers() in p.fleet and not p.done
    p = plan([running("app")], facts(0, shutting_down=True, stragglers_due=True, give_up=True))
    assert p.done


def test_the_turn_runs_again_when_a_new_base_generation_takes_over():
    b = base(gen=1, pid=10)
    b.request_deploy()
    assert plan([b], facts(1)).actions()["base"] == [Spawn(Kind.BASE)]
    b.spawned(11, 1.0, seq=b.successor.seq)
    b.on_byte(1, 1.0, seq=b.successor.seq)
    p = plan([b], facts(1.1))  # promoted in this turn's step
    assert p.again and b.base_generation == 2
    assert not plan([b], facts(1.2, base_generation=2)).again


# -- a turn steps what changed (Settled) ---------------------------------------------


def stepped(p):
    return [s.vassal.name for s in p.steps]


def fleet_of(*vassals):
    return {v.name: v for v in vassals}


def test_settled_vassals_are_not_stepped_until_a_fact_is_recorded_on_them():
    vs = fleet_of(*(running(f"app{i}", pid=100 + i) for i in range(3)))
    settled = Settled()
    # the first turn steps every vassal; each serves and decides nothing
    assert stepped(plan(vs, facts(1), settled)) == ["app0", "app1", "app2"]
    assert stepped(plan(vs, facts(1.1), settled)) == []
    # a fact on one (the operator stops it): that one alone is stepped, and stopped
    vs["app1"].hold()
    p = plan(vs, facts(1.2), settled)
    assert p.actions() == {"app1": [Send(EmperorByte.STOP)]}
    # it stops: stepped in the turn after each fact, then left out again
    assert stepped(plan(vs, facts(1.3), settled)) == ["app1"]  # its own action's turn
    assert stepped(plan(vs, facts(1.4), settled)) == []
    vs["app1"].exited(0, 1.5)
    assert plan(vs, facts(1.6), settled).actions() == {"app1": []}
    assert vs["app1"].phase == Phase.STOPPED
    assert stepped(plan(vs, facts(1.7), settled)) == []


def test_a_settled_vassal_is_stepped_when_its_own_deadline_comes():
    v = Vassal("hb", cfg("hb", heartbeat="2"), policy=POLICY, owns_socket=True)
    vs = fleet_of(v)
    settled = Settled()
    (adopt,) = plan(vs, facts(0), settled).actions()["hb"]
    v.adopted(100, 0.1, seq=adopt.seq)
    v.on_byte(17, 0.1)
    v.on_byte(26, 0.2)  # a heartbeat: the next one is due by 2.2
    assert plan(vs, facts(0.3), settled).actions() == {"hb": []}
    assert stepped(plan(vs, facts(0.9), settled)) == []
    # its deadline passed with no heartbeat: stepped, and killed
    acts = plan(vs, facts(2.3), settled).actions()["hb"]
    assert [type(a) for a in acts] == [Kill]


def test_a_new_base_generation_or_a_shutdown_brings_every_settled_vassal_back():
    vs = fleet_of(*(running(f"app{i}", pid=100 + i) for i in range(3)))
    settled = Settled()
    plan(vs, facts(1), settled)
    assert stepped(plan(vs, facts(1.1), settled)) == []
    # generation 2 serves: every vassal is stepped, deploy_parallel of them move
    p = plan(vs, facts(1.2, base_generation=2, deploy_parallel=2), settled)
    assert stepped(p) == ["app0", "app1", "app2"]
    assert [n for n, a in p.actions().items() if a == [Adopt()]] == ["app0", "app1"]
    # a shutdown: every vassal is stepped and asked to stop
    p = plan(vs, facts(1.3, base_generation=2, shutting_down=True), settled)
    assert p.actions() == {n: [Send(EmperorByte.STOP)] for n in vs}
    # and so does a fork server that went away
    vs = fleet_of(*(running(f"app{i}", pid=100 + i) for i in range(3)))
    settled = Settled()
    plan(vs, facts(2), settled)
    assert stepped(plan(vs, facts(2.1), settled)) == []
    assert stepped(plan(vs, facts(2.2, fork_server=ForkServer.WAITING), settled)) == list(vs)


def test_queued_vassals_wait_unstepped_and_go_in_name_order_as_slots_free():
    vs = fleet_of(*(Vassal(f"app{i}", cfg(f"app{i}"), policy=POLICY) for i in (4, 2, 0, 3, 1)))
    settled = Settled()
    acts = plan(vs, facts(0, adopt_parallel=2), settled).actions()
    assert [n for n, a in acts.items() if a == [Adopt()]] == ["app0", "app1"]
    # no slot free: the three queued are not stepped (the two adopting are,
    # once, after their action)
    assert stepped(plan(vs, facts(0.1, adopt_parallel=2, adoptions_in_flight=2), settled)) \
        == ["app0", "app1"]
    assert stepped(plan(vs, facts(0.2, adopt_parallel=2, adoptions_in_flight=2), settled)) == []
    # one slot free: the first queued by name alone is stepped, and adopted
    p = plan(vs, facts(0.3, adopt_parallel=2, adoptions_in_flight=1), settled)
    assert p.actions() == {"app2": [Adopt()]}
    # two free: the next two by name
    p = plan(vs, facts(0.4, adopt_parallel=2, adoptions_in_flight=0), settled)
    assert p.actions() == {"app2": [], "app3": [Adopt()], "app4": [Adopt()]}


def test_the_safety_net_steps_a_vassal_whose_fact_left_no_mark():
    vs = fleet_of(running("app0"), running("app1", pid=101))
    settled = Settled()
    plan(vs, facts(10), settled)
    # a fact recorded by a way that does not mark it (a field written directly)
    vs["app1"].held = True
    assert stepped(plan(vs, facts(10.5), settled)) == []
    # within Settled.SAFETY of the last full turn, every vassal is stepped again
    p = plan(vs, facts(10 + Settled.SAFETY), settled)
    assert p.actions() == {"app0": [], "app1": [Send(EmperorByte.STOP)]}


def test_the_loop_waits_for_the_safety_net_only_after_a_turn_that_left_vassals_out():
    vs = fleet_of(running("app0"), running("app1", pid=101))
    settled = Settled()
    plan(vs, facts(20), settled)  # every vassal stepped: nothing to catch up on
    assert settled.wakeups(vs) == []
    plan(vs, facts(20.1), settled)  # an event's turn left them out
    assert settled.wakeups(vs) == [20 + Settled.SAFETY]


def test_a_vassal_with_an_action_from_outside_is_stepped_though_settled():
    v = Vassal("app", cfg("app"), policy=POLICY)
    vs = fleet_of(v)
    settled = Settled()
    (adopt,) = plan(vs, facts(0), settled).actions()["app"]
    plan(vs, facts(0.1), settled)
    assert stepped(plan(vs, facts(0.2), settled)) == []  # waiting for the pid
    failed = AdoptionFailure("app", adopt.seq, "no reply within 2 s", timed_out=True)
    acts = plan(vs, facts(0.5, adoptions_failed=(failed,)), settled).actions()
    assert acts == {"app": [FailAdoption("no reply within 2 s", timed_out=True)]}


def test_every_method_that_changes_a_vassal_reports_a_fact():
    """A new public method of Vassal records a fact (`@fact`, and so marks
    the vassal for the plan), or is one of these, which change nothing the
    step reads."""
    readers = {"procs", "proc", "snapshot", "report_facts_to"}
    # its own methods and its read-only side's (vassal_view.py)
    methods = {n: f for c in (Vassal, VassalView) for n, f in vars(c).items()
               if inspect.isfunction(f) and not n.startswith("_")}
    assert {n for n, f in methods.items() if not getattr(f, "records_a_fact", False)} == readers
    v = Vassal("app", cfg("app"), policy=POLICY)
    marks = set()
    v.report_facts_to(marks)
    v.note_error("boom")
    assert marks == {"app"}


def test_a_plan_that_leaves_settled_vassals_out_decides_what_stepping_every_vassal_decides():
    """Two copies of a fleet live the same random life (starts queued for
    slots, bytes, heartbeats, deaths, the operator, a deploy, the fork
    server away and back, a shutdown): one planned with Settled, one with
    every vassal stepped every turn. Every turn, the same actions."""
    rnd = random.Random(25)

    def fleet():
        return {f"app{i:02d}": Vassal(f"app{i:02d}", cfg(f"app{i:02d}", **(
            {"heartbeat": "3"} if i % 4 == 0 else {})), policy=POLICY, owns_socket=True)
            for i in range(12)}

    every, some = fleet(), fleet()
    settled = Settled()
    now, gen, fs, pid = 0.0, 1, ForkServer.READY, 1000
    for turn in range(150):
        now += rnd.choice((0.01, 0.02, 0.05, 0.05, 0.3, 1.2))
        if turn == 60:
            gen = 2
        fs = ForkServer.WAITING if 90 <= turn < 95 else ForkServer.READY
        in_flight = sum(1 for v in every.values() for p in v.procs()
                        if p.state == ProcState.ADOPTING)
        f = facts(now, base_generation=gen, fork_server=fs, adopt_parallel=3, deploy_parallel=2,
                  adoptions_in_flight=in_flight, shutting_down=turn >= 130)
        a = {n: x for n, x in plan(every, f).actions().items() if x}
        b = {n: x for n, x in plan(some, f, settled).actions().items() if x}
        assert a == b, f"turn {turn}"
        for n in [n for n, x in a.items() if Forget() in x]:
            del every[n], some[n]
        assert {n: v.phase for n, v in every.items()} == {n: v.phase for n, v in some.items()}
        # the same facts for both copies
        for name, v in every.items():
            for p in v.procs():
                r = rnd.random()
                if p.state == ProcState.ADOPTING and r < 0.5:
                    pid += 1
                    events = [("adopted", pid, now, p.seq)]
                elif p.state == ProcState.STARTING and r < 0.4:
                    events = [("on_byte", rnd.choice((5, 17)), now, p.seq)]
                elif p.state == ProcState.STOPPING and r < 0.4:
                    events = [("exited", 0, now, p.pid)]
                elif p.live and r < 0.03:
                    events = [("exited", 9, now, p.pid)]  # died
                elif p.live and r < 0.1:
                    events = [("on_byte", 26, now, p.seq)]  # a heartbeat
                else:
                    continue
                for meth, *args in events:
                    getattr(v, meth)(*args)
                    getattr(some[name], meth)(*args)
                break  # one fact per vassal and turn: its processes changed
            r = rnd.random()
            if r < 0.01:
                v.hold(), some[name].hold()
            elif r < 0.03:
                v.release(), some[name].release()
            elif r < 0.04:
                v.request_reload(), some[name].request_reload()
    assert settled.steps < 150 * 12 / 3  # and it stepped far fewer vassals


ACTIONS_OF_THE_LOOP = {t.__name__ for t in loop.EXECUTED}


def _matched_classes(path: Path) -> set[str]:
    """The classes the loop's `match` statements carry out (`case Spawn(...)`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.match_case) and isinstance(node.pattern, ast.MatchClass):
            out.add(ast.unparse(node.pattern.cls))
    return out


def shown_planned(source: str, leave_out: str = "") -> set[str]:
    """The names a test (but `leave_out`) compares in an assert: `plan(...)
    .fleet == [Sweep()]`, `[type(a) for a in acts] == [Kill]`, `Forget() in
    acts`. A name only mentioned (`assert Sweep is not None`) shows nothing."""
    tree = ast.parse(source)
    out = set()
    for t in tree.body:
        if not (isinstance(t, ast.FunctionDef) and t.name.startswith("test_") and t.name != leave_out):
            continue
        for a in ast.walk(t):
            if not isinstance(a, ast.Assert):
                continue
            for c in ast.walk(a):
                if isinstance(c, ast.Compare) and any(
                        isinstance(op, (ast.Eq, ast.In, ast.NotIn)) for op in c.ops):
                    out |= {n.id for n in ast.walk(c) if isinstance(n, ast.Name)}
    return out


def test_a_name_only_mentioned_in_an_assert_shows_no_plan():
    src = ("def test_a():\n    assert Sweep is not None and KillOrphans\n"
           "def test_b():\n    assert p.fleet == [CleanCgroups()]\n"
           "def test_c():\n    assert [type(a) for a in acts] == [Kill]\n"
           "def test_d():\n    assert Forget() in acts\n")
    assert shown_planned(src) == {"p", "CleanCgroups", "type", "a", "acts", "Kill", "Forget"}


def test_every_action_the_loop_carries_out_is_shown_planned_here():
    """A new action the executor handles fails this test until a test
    above shows the plan emitting it from facts alone."""
    assert _matched_classes(Path(loop.__file__)) == ACTIONS_OF_THE_LOOP
    me = "test_every_action_the_loop_carries_out_is_shown_planned_here"
    assert ACTIONS_OF_THE_LOOP - shown_planned(Path(__file__).read_text(), me) == set()
