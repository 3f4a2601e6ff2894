"""The vassal state machine, without processes: start, adoption, crashes
and backoff, changes, heartbeats, shutdown."""

import pytest

from pathlib import Path

from psgi_forkserver.config import VassalConfig
from psgi_forkserver.protocol import EmperorByte
from psgi_forkserver.emperor.vassal import (
    Adopt, Forget, ForkServer, Kill, Kind, Phase, Send, Spawn, Vassal,
)

from support.vassals import POLICY, adopted_vassal, cfg, ctx


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
    assert v.on_byte(22, 0.3) is None  # not loyal yet: its app's, as it loads
    assert v.step(ctx(0.35)) == []
    v.on_byte(17, 0.4)
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
