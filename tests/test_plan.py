"""The turn's plan (plan.py): draining, shutdown order, deploy and adoption
slots, queuing. Real Vassal state machines, no processes."""

from psgi_forkserver.plan import Facts, plan
from psgi_forkserver.protocol import EmperorByte
from psgi_forkserver.vassal import Adopt, Context, Forget, ForkServer, Kind, Phase, Send, Spawn, Vassal

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
