"""The turn's plan (plan.py): draining, shutdown order, deploy and adoption
slots, queuing, and every action the Emperor's loop carries out, each shown
planned from facts alone (in this module: its last test reads it). Real
Vassal state machines, no processes."""

import ast
from pathlib import Path

from psgi_forkserver.emperor import loop
from psgi_forkserver.emperor.plan import (Admit, AdoptionFailure, CleanCgroups, FailAdoption, KillOrphans,
                                  KillStragglers, KillWedged, PrepareBirthplaces, StopFrontDoor, Sweep,
                                  plan)
from psgi_forkserver.protocol import EmperorByte
from psgi_forkserver.emperor.vassal import (Adopt, Context, Forget, ForkServer, Kill, Kind, Phase,
                                    Send, Spawn, Vassal)

from support.vassals import POLICY, cfg, facts, running


def base(gen=1, pid=10, now=0.0):
    """A base vassal serving generation `gen` (ready)."""
    b = Vassal("base", cfg("base", **{"fork-server": "fs.sock"}), is_base=True, policy=POLICY)
    b.want_base_generation = gen
    acts = b.step(Context(now, ForkServer.WAITING))
    assert acts == [Spawn(Kind.BASE)]
    b.spawned(pid, now, seq=acts[0].seq)
    b.on_byte(1, now, seq=acts[0].seq)
    return b


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


def test_cgroups_are_made_ahead_while_the_fork_server_starts_only():
    waiting = dict(fork_server=ForkServer.WAITING, birthplaces=True)
    assert plan([], facts(0, **waiting)).fleet == [PrepareBirthplaces()]
    # ready: the adoptions make what is missing; no cgroups, a foreign fork
    # server (moved, not born there) or a shutdown: nothing made ahead
    assert plan([], facts(0, birthplaces=True)).fleet == []
    assert plan([], facts(0, fork_server=ForkServer.WAITING)).fleet == []
    assert plan([], facts(0, shutting_down=True, **waiting)).fleet == []


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
