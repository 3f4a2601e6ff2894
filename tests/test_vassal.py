"""The vassal state machine, without processes."""

import pytest

from pathlib import Path

from psgi_forkserver.config import VassalConfig
from psgi_forkserver.protocol import EmperorByte
from psgi_forkserver.emperor.vassal import (
    Adopt, Context, Forget, ForkServer, Kill, Kind, Phase, Policy, Send, Spawn, Vassal,
)

from support.vassals import POLICY, base_vassal, cfg, ctx


def adopted_vassal(now=0.0, pid=100):
    v = Vassal("app1", cfg(), policy=POLICY)
    assert v.step(ctx(now)) == [Adopt()]
    assert v.phase == Phase.ADOPTING
    v.adopted(pid, now + 0.01)
    return v


def test_adopted_waits_for_base_then_adopts():
    v = Vassal("app1", cfg(), policy=POLICY)
    assert v.step(ctx(0, ForkServer.WAITING)) == []
    assert v.phase == Phase.WAITING_FOR_BASE
    assert v.step(ctx(1, ForkServer.WAITING)) == []
    assert v.step(ctx(2, ForkServer.READY)) == [Adopt()]
    assert v.phase == Phase.ADOPTING and v.kind == Kind.ADOPTED
    v.adopted(1234, 2.01)
    assert (v.phase, v.pid) == (Phase.STARTING, 1234)


def test_plain_when_no_fork_server():
    v = Vassal("app1", cfg(), policy=POLICY)
    assert v.step(ctx(0, ForkServer.NONE)) == [Spawn(Kind.PLAIN)]
    v.spawned(7, 0)
    assert v.phase == Phase.STARTING and v.kind == Kind.PLAIN


def test_base_spawns_without_fork_server_and_becomes_ready():
    v = Vassal("base", cfg("base", **{"fork-server": "fs.sock"}), is_base=True, policy=POLICY)
    assert v.step(ctx(0, ForkServer.WAITING)) == [Spawn(Kind.BASE)]
    v.spawned(9, 0)
    assert v.on_byte(1, 0.5) == "ready"
    assert v.phase == Phase.RUNNING


def test_bytes_move_through_running_and_loyal():
    v = adopted_vassal()
    v.failures = 3
    assert v.on_byte(1, 0.1) == "spawned"
    assert v.phase == Phase.RUNNING
    assert v.on_byte(5, 0.2) is None  # already running
    assert v.on_byte(17, 0.3) == "loyal"
    assert v.phase == Phase.LOYAL and v.failures == 0
    assert v.step(ctx(0.4)) == []


def test_crash_respawns_with_growing_backoff_then_resets_when_loyal():
    v = adopted_vassal()
    delays = []
    t = 0.0
    for _ in range(6):
        t += 0.05
        v.exited(9, t)
        assert v.phase == Phase.THROTTLED
        delays.append(v.not_before - t)
        assert v.step(ctx(v.not_before - 0.001)) == []
        t = v.not_before
        assert v.step(ctx(t)) == [Adopt()]
        v.adopted(200, t)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
    v.on_byte(17, t + 0.1)
    v.exited(9, t + 0.2)
    assert v.not_before - (t + 0.2) == pytest.approx(0.1)


def test_long_lived_death_is_not_a_crash_loop():
    v = adopted_vassal()
    v.failures = 4
    v.exited(9, 100.0)
    assert v.failures == 0 and v.restarts == 1
    assert v.not_before == pytest.approx(100.0)  # restarted at once
    assert v.step(ctx(100.0)) == [Adopt()]


def test_adoption_failure_throttles():
    v = Vassal("app1", cfg(), policy=POLICY)
    assert v.step(ctx(0)) == [Adopt()]
    v.start_failed(0.5, "timeout")
    assert v.phase == Phase.THROTTLED and v.pid is None
    assert v.step(ctx(0.55)) == []
    assert v.step(ctx(0.6)) == [Adopt()]


def test_removed_file_stops_then_forgets():
    v = adopted_vassal()
    v.update_config(None)
    assert v.step(ctx(1)) == [Send(EmperorByte.STOP)]
    assert v.phase == Phase.STOPPING and v.current.stop_reason == "file removed"
    assert v.step(ctx(2)) == []
    v.exited(0, 2.5)
    assert v.step(ctx(2.5)) == [Forget()]
    assert v.phase == Phase.GONE


def test_mercy_timeout_kills_once():
    v = adopted_vassal()
    v.update_config(None)
    v.step(ctx(1))
    assert v.next_wakeup() == 6.0
    assert v.step(ctx(5.9)) == []
    actions = v.step(ctx(6.0))
    assert len(actions) == 1 and isinstance(actions[0], Kill)
    assert v.step(ctx(7.0)) == []
    v.exited(9, 7.1)
    assert v.step(ctx(7.1)) == [Forget()]


def test_changed_file_restarts_without_backoff():
    v = adopted_vassal()
    v.on_byte(17, 0.2)
    assert v.update_config(cfg(fp="b"))
    assert v.step(ctx(1)) == [Send(EmperorByte.STOP)]
    assert v.current.stop_reason == "config changed"
    v.exited(0, 1.2)
    assert v.phase == Phase.NEW
    assert v.step(ctx(1.2)) == [Adopt()]
    assert v.running.fingerprint == "b"


def test_same_content_is_not_a_change():
    v = adopted_vassal()
    assert not v.update_config(cfg(fp="a"))
    assert v.step(ctx(1)) == []


def test_new_config_cuts_a_crash_loop_backoff():
    v = adopted_vassal()
    v.failures = 5
    v.exited(1, 1.0)
    assert v.not_before > 2
    v.update_config(cfg(fp="fixed"))
    assert v.step(ctx(1.01)) == [Adopt()]


def test_removed_while_throttled_is_forgotten():
    v = adopted_vassal()
    v.exited(1, 1.0)
    v.update_config(None)
    assert v.step(ctx(1.01)) == [Forget()]


def test_change_during_adoption_restarts_after_pid():
    v = Vassal("app1", cfg(), policy=POLICY)
    v.step(ctx(0))
    v.update_config(cfg(fp="b"))
    assert v.step(ctx(0.01)) == []  # adoption in flight
    v.adopted(55, 0.02)
    assert v.step(ctx(0.03)) == [Send(EmperorByte.STOP)]


def test_shutdown_stops_others_before_bases():
    base = Vassal("base", cfg("base"), is_base=True, policy=POLICY)
    assert base.step(ctx(0)) == [Spawn(Kind.BASE)]
    base.spawned(1, 0)
    base.on_byte(1, 0.1)
    app = adopted_vassal()
    assert base.step(ctx(1, shutting_down=True, hold_bases=True)) == []
    assert app.step(ctx(1, shutting_down=True)) == [Send(EmperorByte.STOP)]
    app.exited(0, 1.5)
    assert app.step(ctx(1.5, shutting_down=True)) == [Forget()]
    assert base.step(ctx(1.5, shutting_down=True, hold_bases=False)) == [Send(EmperorByte.STOP)]


def test_shutdown_forgets_waiting_vassals():
    v = Vassal("app1", cfg(), policy=POLICY)
    v.step(ctx(0, ForkServer.WAITING))
    assert v.step(ctx(1, ForkServer.WAITING, shutting_down=True)) == [Forget()]


def test_done_byte_stops_and_restarts():
    v = adopted_vassal()
    assert v.on_byte(22, 0.5) == "asked to be stopped"
    assert v.step(ctx(0.6)) == [Send(EmperorByte.STOP)]
    v.exited(0, 0.7)
    assert v.step(ctx(0.7)) == [Adopt()]


def test_heartbeat_missed_kills():
    v = Vassal("app1", cfg(heartbeat="2"), policy=POLICY)
    v.step(ctx(0))
    v.adopted(10, 0)
    assert v.next_wakeup() is None  # no heartbeat expected before the first
    v.on_byte(26, 1.0)
    assert v.next_wakeup() > 3.0
    assert v.step(ctx(2.9)) == []
    actions = v.step(ctx(3.1))
    assert isinstance(actions[0], Kill) and v.phase == Phase.STOPPING


def test_a_missed_heartbeat_is_judged_against_what_was_read():
    # the Emperor froze after its last read (at 1.2) and runs a turn at 5.0
    # before reading again: the bytes sent meanwhile wait in the pipe, so
    # nothing is judged missing until they were looked for
    v = Vassal("app1", cfg(heartbeat="2"), policy=POLICY)
    v.step(ctx(0))
    v.adopted(10, 0)
    v.on_byte(26, 1.0)
    assert v.step(ctx(5.0, heard=1.2)) == []
    # read at 5.05 and none was there: missed
    actions = v.step(ctx(5.1, heard=5.05))
    assert isinstance(actions[0], Kill) and v.phase == Phase.STOPPING


def test_invalid_config_waits_for_a_fix():
    bad = VassalConfig("app1", Path("/v/app1.ini"), "x", error="line 1: empty key")
    v = Vassal("app1", bad, policy=POLICY)
    assert v.step(ctx(0)) == [] and v.phase == Phase.CONFIG_ERROR
    v.update_config(cfg(fp="good"))
    assert v.step(ctx(1)) == [Adopt()]


# -- successors: gap-free reloads and code deploys ---------------------------

def seamless_vassal(now=0.0, pid=100):
    v = adopted_vassal(now, pid)
    v.owns_socket = True  # the Emperor owns its http-socket: reloads overlap
    assert v.seamless
    v.on_byte(17, now + 0.1)
    return v


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


# -- operator commands: stop, start, reload ------------------------------------


def test_hold_stops_gracefully_and_stays_stopped_until_released():
    v = seamless_vassal()
    v.hold()
    acts = v.step(ctx(1))
    assert acts == [Send(EmperorByte.STOP)] and v.current.stop_reason == "stopped by the operator"
    assert v.exited(0, 1.2, pid=100) == "stopped"
    assert v.step(ctx(1.3)) == [] and v.phase == Phase.STOPPED
    assert v.step(ctx(500)) == [] and v.phase == Phase.STOPPED  # no timer restarts it
    assert v.restarts == 0 and v.next_wakeup() is None
    v.release()
    assert v.step(ctx(501)) == [Adopt()]


def test_held_vassal_starts_again_when_its_file_changes():
    v = seamless_vassal()
    v.hold()
    v.step(ctx(1))
    v.exited(0, 1.2, pid=100)
    v.step(ctx(1.3))
    v.update_config(cfg(fp="a"))  # same content: still stopped
    assert v.step(ctx(2)) == [] and v.phase == Phase.STOPPED
    v.update_config(cfg(fp="b"))
    assert v.step(ctx(3)) == [Adopt()]


def test_held_vassal_is_forgotten_at_shutdown_and_when_its_file_goes():
    v = seamless_vassal()
    v.hold()
    v.step(ctx(1))
    v.exited(0, 1.2, pid=100)
    v.step(ctx(1.3))
    v.update_config(None)
    assert v.step(ctx(2)) == [Forget()]


def test_hold_during_a_crash_loop_backoff_stops_the_retries():
    v = adopted_vassal()
    v.exited(1, 0.5)
    assert v.phase == Phase.THROTTLED
    v.hold()
    assert v.step(ctx(100)) == [] and v.phase == Phase.STOPPED
    v.release()
    assert v.failures == 0 and v.step(ctx(100.1)) == [Adopt()]


def test_reload_request_starts_a_successor_when_seamless():
    v = seamless_vassal()
    v.request_reload()
    acts = v.step(ctx(1))
    assert acts == [Adopt()] and v.successor.reason == "reload requested"
    assert v.phase == Phase.RELOADING and not v.reload_asked
    v.adopted(200, 1.01, seq=acts[0].seq)
    v.on_byte(17, 1.1, seq=acts[0].seq)
    assert v.step(ctx(1.2)) == [Send(EmperorByte.STOP)] and v.pid == 200
    assert v.step(ctx(1.3)) == []  # one reload per request
    assert v.operator_reloads == 1 and v.snapshot().operator_reloads == 1


def test_reload_request_stops_then_starts_when_not_seamless():
    v = adopted_vassal()
    v.on_byte(17, 0.1)
    v.request_reload()
    assert v.step(ctx(1)) == [Send(EmperorByte.STOP)]
    assert v.exited(0, 1.1) == "stopped"
    assert v.step(ctx(1.2)) == [Adopt()] and v.restarts == 0
    assert v.operator_reloads == 1


def test_reload_request_cuts_a_throttled_vassals_backoff():
    v = adopted_vassal()
    for t in (0.5, 1.0, 2.0):
        v.step(ctx(t + 10))  # adopt again after the backoff
        if v.current is None or v.current.pid is None:
            v.adopted(100, t + 10)
        v.exited(1, t + 10.01)
    assert v.phase == Phase.THROTTLED and v.not_before > 12.1
    v.request_reload()
    assert v.step(ctx(12.1)) == [Adopt()]


def test_reload_request_does_not_restart_a_base():
    v = Vassal("base", cfg("base", **{"fork-server": "fs.sock"}), is_base=True, policy=POLICY)
    v.step(ctx(0, ForkServer.WAITING))
    v.spawned(9, 0)
    v.on_byte(1, 0.1)
    v.request_reload()
    assert v.step(ctx(1)) == []


def test_touch_starts_a_successor_once_and_moves_a_base_to_a_new_generation():
    v = adopted_vassal()
    v.owns_socket = True  # the Emperor owns its http-socket: reloads overlap
    v.on_byte(17, 0.1)
    v.touch()
    assert v.step(ctx(1)) == [Adopt()]
    assert v.successor is not None and v.successor.reason == "file touched"
    seq = v.successor.seq
    v.adopted(101, 1.01, seq)
    v.on_byte(17, 1.1, seq)
    acts = v.step(ctx(1.2))
    assert acts == [Send(EmperorByte.STOP)] and v.pid == 101
    assert v.step(ctx(1.3)) == []  # touched once: one reload
    base = Vassal("base", cfg("base", **{"fork-server": "fs.sock"}), is_base=True, policy=POLICY)
    base.step(ctx(0, ForkServer.WAITING))
    base.spawned(9, 0)
    base.touch()
    assert base.want_base_generation == 2


def test_refused_waits_without_a_process_until_admitted():
    v = Vassal("app1", cfg(), policy=POLICY)
    v.refused = "refused: no descriptors to spare"
    assert v.step(ctx(0)) == []
    assert v.phase == Phase.REFUSED
    v.refused = None
    assert v.step(ctx(1)) == [Adopt()]


def test_touched_file_starts_a_stopped_vassal():
    v = seamless_vassal()
    v.hold()
    v.step(ctx(1))
    v.exited(0, 1.2, pid=100)
    assert v.step(ctx(1.3)) == [] and v.phase == Phase.STOPPED
    v.touch()
    assert v.step(ctx(2)) == [Adopt()]
