"""The turn's plan (plan.py): a turn steps what changed (Settled), and a
plan that leaves settled vassals out decides what stepping every vassal
decides. Real Vassal state machines, no processes."""

import inspect
import random

from psgi_forkserver.emperor.plan import (AdoptionFailure, FailAdoption, Settled, plan)
from psgi_forkserver.protocol import EmperorByte
from psgi_forkserver.emperor.vassal import (Adopt, Forget, ForkServer, Kill, Phase, ProcState, Send,
                                    Vassal)
from psgi_forkserver.emperor.vassal_view import VassalView

from support.vassals import POLICY, cfg, facts, running


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
    # an event, on which a fact is recorded by a way that does not mark it
    # (a field written directly)
    vs["app1"].held = True
    assert stepped(plan(vs, facts(10.5, events=1), settled)) == []
    # within Settled.SAFETY of the last full turn, every vassal is stepped again
    p = plan(vs, facts(10 + Settled.SAFETY, events=1), settled)
    assert p.actions() == {"app0": [], "app1": [Send(EmperorByte.STOP)]}


def test_a_large_fleet_in_a_mass_start_gets_the_safety_net_a_vassal_s_share_of_a_second_apart():
    """A mass start has an event every turn: with the net once a second, a
    fleet of 1,000 was stepped whole every second of the burst. While events
    keep coming, its turns come SAFETY_PER_VASSAL a vassal apart (5 s at
    1,000); once they stop, SAFETY after the last, as for a small fleet. A
    fact that left no mark is seen then, never lost."""
    vs = fleet_of(*(running(f"app{i:04d}", pid=1000 + i) for i in range(1000)))
    settled = Settled()
    assert len(stepped(plan(vs, facts(10, events=1), settled))) == 1000
    vs["app0001"].held = True  # a fact that leaves no mark
    events, now = 1, 10.0
    while now < 14.9:  # an event every 0.1 s: none of the turns steps the fleet
        events, now = events + 1, round(now + 0.1, 1)
        assert stepped(plan(vs, facts(now, events=events), settled)) == [], now
    assert settled.wakeups(vs) == [10 + 1000 * Settled.SAFETY_PER_VASSAL]
    p = plan(vs, facts(10 + 1000 * Settled.SAFETY_PER_VASSAL, events=events + 1), settled)
    assert len(p.steps) == 1000 and p.actions()["app0001"] == [Send(EmperorByte.STOP)]
    # the events stop: the next net's turn is SAFETY after the last of them
    vs["app0002"].held = True
    assert "app0002" not in stepped(plan(vs, facts(15.5, events=events + 2), settled))
    assert stepped(plan(vs, facts(15.6, events=events + 2), settled)) == []
    assert min(settled.wakeups(vs)) == 15.5 + Settled.SAFETY  # (and app0001's mercy timeout)
    p = plan(vs, facts(15.5 + Settled.SAFETY, events=events + 2), settled)
    assert len(p.steps) == 1000 and p.actions()["app0002"] == [Send(EmperorByte.STOP)]


def test_the_loop_waits_for_the_safety_net_only_after_a_turn_that_left_vassals_out():
    vs = fleet_of(running("app0"), running("app1", pid=101))
    settled = Settled()
    plan(vs, facts(20), settled)  # every vassal stepped: nothing to catch up on
    assert settled.wakeups(vs) == []
    plan(vs, facts(20.1, events=1), settled)  # an event's turn left them out
    assert settled.wakeups(vs) == [20 + Settled.SAFETY]


def test_a_fleet_nothing_happens_to_is_not_stepped_again():
    """The loop's own timers (the periodic rescan that found nothing to
    read) wake it with nothing handled since its last turn: the turn steps
    no vassal, however long since every vassal was stepped, and asks for no
    safety net's turn (an idle fleet of 1,000 costs no step of each)."""
    vs = fleet_of(running("app0"), running("app1", pid=101))
    settled = Settled()
    assert stepped(plan(vs, facts(30), settled)) == ["app0", "app1"]
    for t in (40, 50, 60):
        assert stepped(plan(vs, facts(t), settled)) == []
        assert settled.wakeups(vs) == []


def test_after_an_event_the_safety_net_steps_every_vassal_once():
    vs = fleet_of(running("app0"), running("app1", pid=101))
    settled = Settled()
    plan(vs, facts(30, events=3), settled)
    assert stepped(plan(vs, facts(40, events=3), settled)) == []
    # an event long after the last full turn: its turn steps every vassal
    assert stepped(plan(vs, facts(40.1, events=4), settled)) == ["app0", "app1"]
    # then events within Settled.SAFETY leave them out, and the safety
    # net's turn comes once, SAFETY after the last full one
    assert stepped(plan(vs, facts(40.2, events=5), settled)) == []
    assert settled.wakeups(vs) == [40.1 + Settled.SAFETY]
    assert stepped(plan(vs, facts(40.1 + Settled.SAFETY, events=5), settled)) == ["app0", "app1"]
    assert stepped(plan(vs, facts(50, events=5), settled)) == []
    assert settled.wakeups(vs) == []


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


# -- the front door's routes follow the same rule (emperor/routing.py) ---------------


def test_the_routes_are_recomputed_in_full_only_after_something_happened(tmp_path):
    """A turn recomputes the routes of the vassals it stepped, and all of
    them `Routes.EVERY` after anything happened: an idle fleet's timer
    turns (its rescan) recompute none."""
    import selectors

    from psgi_forkserver.emperor.routing import Routes
    from psgi_forkserver.options import Options
    from psgi_forkserver.sockets import Listeners

    sel = selectors.DefaultSelector()
    try:
        log = lambda *a, **k: None  # noqa: E731
        vs = {"app": Vassal("app", cfg("app", domain="app.localhost"), policy=POLICY)}
        routes = Routes(Options(tmp_path, program="/bin/false"), vs, Listeners(sel, log), tmp_path,
                        True, log, sel, None, on_refused=lambda n, why: None, spawning=lambda: None)
        assert routes._refresh(0.0, None)  # the first turn: every route
        assert [r.domains for r in routes.known.values()] == [("app.localhost",)]
        # its route changed by a way no turn names (its file's domain, read
        # by no step of it), long after the last full recompute
        vs["app"].update_config(cfg("app", domain="shop.localhost"))
        assert not routes._refresh(10.0, [])  # a timer's turn, nothing handled since
        assert routes._refresh(10.1, [], events=1)  # something happened: all of them again
        assert [r.domains for r in routes.known.values()] == [("shop.localhost",)]
    finally:
        sel.close()
