"""The vassal state machine, without processes: successors, gap-free
reloads and code deploys."""

import pytest

from psgi_forkserver.protocol import EmperorByte
from psgi_forkserver.emperor.vassal import (
    Adopt, Forget, ForkServer, Kill, Kind, Phase, Policy, Send, Spawn, Vassal,
)

from support.vassals import POLICY, adopted_vassal, base_vassal, cfg, ctx, seamless_vassal


# -- successors: gap-free reloads and code deploys ---------------------------

def test_seamless_reload_starts_successor_then_retires_old_on_loyalty():
    v = seamless_vassal()
    v.update_config(cfg(fp="b"))
    acts = v.step(ctx(1))
    assert acts == [Adopt()] and acts[0].seq == v.successor.seq
    assert v.phase == Phase.RELOADING and v.pid == 100  # the old one serves
    assert v.successor.reason == "config changed"
    v.adopted(200, 1.01, seq=acts[0].seq)
    assert v.step(ctx(1.02)) == []
    assert v.on_byte(17, 1.1, seq=acts[0].seq) == "successor loyal"
    acts = v.step(ctx(1.1))
    assert acts == [Send(EmperorByte.STOP)]
    old = v.retiring[0]
    assert acts[0].seq == old.seq and old.pid == 100
    assert v.pid == 200 and v.phase == Phase.LOYAL and v.running.fingerprint == "b"
    assert v.exited(0, 1.5, pid=100) == "retired"
    assert not v.retiring and v.phase == Phase.LOYAL


def test_successor_without_byte_17_is_promoted_after_grace():
    v = seamless_vassal()
    v.policy = Policy(mercy=5, backoff_first=0.1, backoff_max=2, reload_grace=0.5)
    v.update_config(cfg(fp="b"))
    seq = v.step(ctx(1))[0].seq
    v.adopted(200, 1.0, seq=seq)
    v.on_byte(5, 1.1, seq=seq)
    assert v.next_wakeup() == pytest.approx(1.6)
    assert v.step(ctx(1.5)) == []
    assert v.step(ctx(1.6)) == [Send(EmperorByte.STOP)]
    assert v.pid == 200


def test_successor_that_dies_leaves_old_serving_and_is_retried_later():
    v = seamless_vassal()
    v.update_config(cfg(fp="b"))
    seq = v.step(ctx(1))[0].seq
    v.adopted(200, 1.0, seq=seq)
    assert v.exited(256, 1.1, pid=200) == "successor died"
    assert v.pid == 100 and v.phase == Phase.LOYAL and v.successor is None
    assert v.step(ctx(1.15)) == []
    assert v.next_wakeup() == pytest.approx(1.2)
    assert v.step(ctx(v.not_before)) == [Adopt()]


def test_old_dies_during_reload_successor_takes_over():
    v = seamless_vassal()
    v.update_config(cfg(fp="b"))
    seq = v.step(ctx(1))[0].seq
    v.adopted(200, 1.0, seq=seq)
    assert v.exited(9, 1.1, pid=100) == "died (successor took over)"
    assert v.pid == 200 and v.successor is None and v.phase == Phase.STARTING


def test_not_seamless_reload_stops_first():
    v = adopted_vassal()
    v.update_config(cfg(fp="b"))
    assert v.step(ctx(1)) == [Send(EmperorByte.STOP)]
    assert v.successor is None


def test_removed_during_reload_stops_both():
    v = seamless_vassal()
    v.update_config(cfg(fp="b"))
    seq = v.step(ctx(1))[0].seq
    v.adopted(200, 1.0, seq=seq)
    v.update_config(None)
    acts = v.step(ctx(1.1))
    assert acts == [Send(EmperorByte.STOP), Send(EmperorByte.STOP)]
    v.exited(0, 1.2, pid=100)
    v.exited(0, 1.3, pid=200)
    assert v.step(ctx(1.3)) == [Forget()]


def test_code_deploy_new_base_then_old_base_retires_once_drained():
    b = base_vassal()
    b.request_deploy()
    acts = b.step(ctx(1, base_generation=1, base_users=frozenset({1})))
    assert acts == [Spawn(Kind.BASE)] and b.successor.base_generation == 2
    assert b.phase == Phase.RELOADING
    b.spawned(11, 1.0, seq=acts[0].seq)
    assert b.step(ctx(1.1, base_generation=1, base_users=frozenset({1}))) == []
    b.on_byte(1, 1.2, seq=acts[0].seq)
    # promoted at once, but the old base waits for its vassals to move
    assert b.step(ctx(1.2, base_generation=1, base_users=frozenset({1}))) == []
    assert b.pid == 11 and b.base_generation == 2 and b.retiring[0].pid == 10
    assert b.step(ctx(2, base_generation=2, base_users=frozenset({1, 2}))) == []
    acts = b.step(ctx(3, base_generation=2, base_users=frozenset({2})))
    assert acts == [Send(EmperorByte.STOP)] and acts[0].seq == b.retiring[0].seq
    assert b.exited(0, 3.1, pid=10) == "retired"


def test_changed_base_file_is_a_code_deploy():
    b = base_vassal()
    b.update_config(cfg("base", fp="b", **{"fork-server": "fs.sock"}), is_base=True)
    acts = b.step(ctx(1, base_generation=1))
    assert acts == [Spawn(Kind.BASE)] and b.successor.base_generation == 2


def test_adopted_vassals_move_to_new_base_within_slots():
    v = seamless_vassal()
    assert v.base_generation == 0  # adopted from the ctx() default generation
    assert v.step(ctx(1, base_generation=2, deploy_slots=0)) == []
    acts = v.step(ctx(1, base_generation=2, deploy_slots=1))
    assert acts == [Adopt()] and v.successor.reason == "code deploy"
    assert v.successor.base_generation == 2


def test_base_crash_keeps_generation_and_adopted_keep_running():
    b = base_vassal()
    assert b.exited(9, 0.5) == "died"
    assert b.phase == Phase.THROTTLED
    acts = b.step(ctx(b.not_before))
    assert acts == [Spawn(Kind.BASE)] and b.current.base_generation == 1
    app = seamless_vassal()
    assert app.step(ctx(1, ForkServer.WAITING)) == []
    assert app.phase == Phase.LOYAL


def test_crash_loop_uwsgi_defaults():
    v = Vassal("app1", cfg())  # default policy: 1 s doubling to 180 s
    t = 0.0
    delays = []
    for _ in range(10):
        acts = v.step(ctx(t))
        assert acts == [Adopt()]
        v.adopted(1, t)
        v.exited(256, t + 0.1)
        delays.append(v.not_before - (t + 0.1))
        assert v.phase == Phase.THROTTLED
        t = v.not_before
    assert delays == pytest.approx([1, 2, 4, 8, 16, 32, 64, 128, 180, 180])
    v.step(ctx(t))
    v.adopted(2, t)
    v.on_byte(17, t + 0.1)
    assert v.failures == 0
    v.exited(256, t + 0.2)
    assert v.not_before - (t + 0.2) == pytest.approx(1)


def test_heartbeat_kill_restarts_at_once_and_counts_a_restart():
    v = Vassal("app1", cfg(heartbeat="1"), policy=POLICY)
    v.step(ctx(0))
    v.adopted(10, 0)
    v.on_byte(26, 0.5)
    acts = v.step(ctx(1.6))
    assert isinstance(acts[0], Kill)
    assert v.exited(9, 1.7) == "stopped"
    assert v.restarts == 1 and v.phase == Phase.NEW
    assert v.step(ctx(1.7)) == [Adopt()]


def test_on_demand_waits_for_connection_and_goes_back_when_idle():
    v = Vassal("app1", cfg(**{"on-demand": "true", "idle": "2"}), policy=POLICY)
    assert v.step(ctx(0)) == [] and v.phase == Phase.ON_DEMAND
    assert v.step(ctx(5)) == []
    v.on_connection(6)
    assert v.step(ctx(6)) == [Adopt()] and not v.woken
    v.adopted(10, 6.01)
    v.on_byte(17, 6.1)
    assert v.on_byte(22, 9) == "idle"
    assert v.step(ctx(9)) == [Send(EmperorByte.STOP)]
    assert v.current.stop_reason == "idle"
    v.exited(0, 9.1)
    assert v.step(ctx(9.1)) == [] and v.phase == Phase.ON_DEMAND


def test_snapshot_for_status_readers():
    v = seamless_vassal()
    v.update_config(cfg(fp="b"))
    v.step(ctx(1))  # a successor: two processes
    v.adopted(200, 1.1, seq=v.successor.seq)
    snap = v.snapshot()
    assert (snap.name, snap.phase, snap.pid, snap.kind, snap.processes_started) == (
        "app1", Phase.RELOADING, 100, Kind.ADOPTED, 2)
    assert snap.pids == (100, 200) and snap.file == "/v/app1.ini"
    with pytest.raises(AttributeError):
        snap.pid = 1  # read-only: status cannot write the vassal


def test_adoption_waits_for_a_free_slot():
    """A mass start queues in the Emperor, not in the fork server's backlog."""
    v = Vassal("app1", cfg(), policy=POLICY)
    assert v.step(ctx(0, adopt_slots=0)) == []
    assert v.phase == Phase.NEW and not v.has_process
    assert v.step(ctx(0.1, adopt_slots=1)) == [Adopt()]
    assert v.phase == Phase.ADOPTING


def test_reload_successor_waits_for_a_free_slot():
    v = seamless_vassal()
    v.update_config(cfg(fp="b"))
    assert v.step(ctx(1, adopt_slots=0)) == []
    assert v.successor is None and v.pid == 100
    acts = v.step(ctx(1.1, adopt_slots=1))
    assert acts == [Adopt()] and v.successor is not None
