"""The vassal state machine, without processes: the operator's commands
(stop, start, reload), touches, admission."""

from psgi_forkserver.protocol import EmperorByte
from psgi_forkserver.emperor.vassal import Adopt, Forget, ForkServer, Phase, Send, Vassal

from support.vassals import POLICY, adopted_vassal, cfg, ctx, seamless_vassal


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
