"""Base generations and deploy records (bases.py), on real Vassal state machines."""

from pathlib import Path

from psgi_forkserver.emperor.bases import socket_path
from psgi_forkserver.emperor.deploys import DeployState, DeployTracker
from psgi_forkserver.emperor.vassal import Adopt, Kind, Vassal

from support.vassals import POLICY, base_vassal, cfg, ctx


def test_socket_path_per_generation():
    root = Path("/run/x/fs.sock")
    assert socket_path(root, 1) == root
    assert socket_path(root, 2) == Path("/run/x/fs.sock.gen2")
    assert socket_path(None, 3) is None


def adopted_on(gen, name="app1", now=0.0):
    v = Vassal(name, cfg(name), policy=POLICY)
    v.owns_socket = True  # the Emperor owns its http-socket: reloads overlap
    acts = v.step(ctx(now, base_generation=gen))
    assert acts == [Adopt()]
    v.adopted(100 + gen, now, seq=acts[0].seq)
    v.on_byte(17, now)
    return v


def promote_new_base(b, now):
    acts = b.step(ctx(now, base_generation=1, base_users=frozenset({1})))
    b.spawned(11, now, seq=acts[0].seq)
    b.on_byte(1, now, seq=acts[0].seq)
    b.step(ctx(now, base_generation=1, base_users=frozenset({1})))
    assert b.base_generation == 2


def move(v, gen, now):
    acts = v.step(ctx(now, base_generation=gen, deploy_slots=1))
    assert acts == [Adopt()] and v.successor.reason == "code deploy"
    v.adopted(200, now, seq=acts[0].seq)
    v.on_byte(17, now, seq=acts[0].seq)
    v.step(ctx(now, base_generation=gen))
    assert v.base_generation == gen


def test_a_deploy_ends_with_one_summary_once_every_vassal_moved():
    lines = []
    t = DeployTracker(lambda m, n=None: lines.append(m))
    b = base_vassal()
    a1, a2 = adopted_on(1, "a1"), adopted_on(1, "a2")
    b.request_deploy()
    t.requested(1.0, b)
    t.observe(1.0, b, [a1, a2], False)
    assert t.last.state == DeployState.STARTING and t.last.request == 1
    promote_new_base(b, 2.0)
    t.observe(2.0, b, [a1, a2], False)
    assert t.last.state == DeployState.MOVING and t.last.to_move == {"a1", "a2"}
    move(a1, 2, 2.5)
    t.observe(2.5, b, [a1, a2], False)
    assert t.last.pending == {"a2"} and lines == []
    move(a2, 2, 3.0)
    t.observe(3.0, b, [a1, a2], False)
    t.observe(3.5, b, [a1, a2], False)
    assert t.last.state == DeployState.DONE
    assert lines == ["code deploy to generation 2 done: 2 moved, 0 failed, 2.00 s"]
    d = t.as_dict(4.0, b)
    assert d["requests"] == 1 and d["serving_generation"] == 2
    assert d["last"]["finished"] and d["last"]["first_move_after_ready_s"] == 0.5


def test_a_failed_move_makes_the_deploy_partial():
    lines = []
    t = DeployTracker(lambda m, n=None: lines.append(m))
    b = base_vassal()
    a1 = adopted_on(1, "a1")
    b.request_deploy()
    t.observe(1.0, b, [a1], False)
    promote_new_base(b, 2.0)
    t.observe(2.0, b, [a1], False)
    t.move_failed("a1", "adoption failed: no reply within 10 s")
    t.observe(2.1, b, [a1], False)
    assert t.last.state == DeployState.PARTIAL
    assert lines == ["code deploy to generation 2 done with failures: 0 moved, 1 failed, "
                     "1.10 s; a1: adoption failed: no reply within 10 s"]


def test_a_new_base_that_dies_fails_the_deploy_and_a_new_request_retries_it():
    lines = []
    t = DeployTracker(lambda m, n=None: lines.append(m))
    b = base_vassal()
    b.request_deploy()
    t.requested(1.0, b)
    t.observe(1.0, b, [], False)
    t.base_failed(1.5, "base", 2, "new base pid 11 died (exit status 1) before it was ready")
    assert t.last.state == DeployState.FAILED and "generation 1 keeps serving" in lines[-1]
    b.request_deploy()  # the generation that failed is asked for again
    t.requested(3.0, b)
    assert t.last.state == DeployState.STARTING and t.last.request == 2
    assert t.as_dict(3.0, b)["requested_generation"] == 2


def test_nothing_to_deploy_is_a_failed_request():
    t = DeployTracker(lambda m, n=None: None)
    t.refused(1.0, "no running base vassal")
    d = t.as_dict(1.0, None)["last"]
    assert (d["state"], d["finished"], d["request"]) == ("failed", True, 1)


def test_a_vassal_started_on_the_new_generation_is_not_counted_as_moved():
    t = DeployTracker(lambda m, n=None: None)
    b = base_vassal()
    b.request_deploy()
    t.observe(1.0, b, [], False)
    promote_new_base(b, 2.0)
    late = adopted_on(2, "late", 2.0)
    t.observe(2.0, b, [late], False)
    assert t.last.state == DeployState.DONE and t.last.moved == set()
    assert late.kind == Kind.ADOPTED and late.base_generation == 2


def test_a_deploy_logs_one_progress_line_a_second_while_vassals_move():
    lines = []
    t = DeployTracker(lambda m, n=None: lines.append(m))
    b = base_vassal()
    vs = [adopted_on(1, f"a{i}") for i in range(3)]
    b.request_deploy()
    t.requested(1.0, b)
    t.observe(1.0, b, vs, False)
    promote_new_base(b, 2.0)
    t.observe(2.0, b, vs, False)
    move(vs[0], 2, 2.5)
    t.observe(2.5, b, vs, False)
    assert lines == []  # less than a second of moving
    t.observe(3.0, b, vs, False)
    t.observe(3.5, b, vs, False)
    assert lines == ["deploy: 1/3 moved, 0 failed"]
    move(vs[1], 2, 4.0)
    t.observe(4.0, b, vs, False)
    assert lines[-1] == "deploy: 2/3 moved, 0 failed"
    move(vs[2], 2, 4.2)
    t.observe(4.2, b, vs, False)
    assert lines[1:] == ["deploy: 2/3 moved, 0 failed",
                         "code deploy to generation 2 done: 3 moved, 0 failed, 3.20 s"]


def test_wedge_watch_counts_timeouts_in_a_row_per_generation():
    """Only timeouts in a row make a base wedged: a reply from that
    generation starts the count again, another generation's does not."""
    from psgi_forkserver.emperor.bases import WEDGED_AFTER, WedgeWatch

    w = WedgeWatch()
    for _ in range(WEDGED_AFTER - 1):
        assert w.timed_out(None, 1, 2.0) is None
    w.replied(1)
    w.replied(2)
    for _ in range(WEDGED_AFTER - 1):
        w.timed_out(None, 1, 2.0)
    assert w.timeouts == {1: WEDGED_AFTER - 1}
    assert w.exited(12345) is None  # a base that was not killed as wedged
