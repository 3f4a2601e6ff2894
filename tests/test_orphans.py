"""Telling orphans by session id (psgi_forkserver/orphans.py), no Emperor."""

from __future__ import annotations

import os
import signal
import subprocess

from psgi_forkserver.orphans import EndedSessions, classify_orphans, scan_proc


def test_children_of_running_vassals_are_left_alone():
    # vassals 100 and 200 run; 300 ended
    children = {
        100: 100,  # a vassal process itself
        101: 100,  # a helper of vassal 100, in its session
        201: 200,  # a helper of 200
        301: 300,  # a worker of the ended 300
        302: 300,  # another
        400: 400,  # a daemon that called setsid() itself
        500: 7,  # in the Emperor's session (a uWSGI vassal's process)
    }
    got = classify_orphans(children, live={100, 200}, ended={300: "app3"})
    assert got.orphans == {301: "app3", 302: "app3"}
    assert got.unknown == {400, 500}


def test_a_session_leader_is_never_an_orphan():
    # 300 ended; a new process got pid 300 and its own session: not the vassal's
    got = classify_orphans({300: 300}, live=set(), ended={300: "app3"})
    assert got.orphans == {} and got.unknown == {300}


def test_ended_sessions_are_forgotten_when_empty_and_bounded():
    e = EndedSessions(limit=3)
    for sid in (1, 2, 3, 4):
        e.add(sid, f"v{sid}")
    assert list(e.by_sid) == [2, 3, 4]
    e.prune(sessions={3, 99})
    assert list(e.by_sid) == [3] and 3 in e and len(e) == 1


def test_scan_proc_finds_our_children_and_their_sessions():
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        scan = scan_proc(os.getpid())
        assert scan.children.get(child.pid) == child.pid
        assert os.getsid(0) in scan.sessions and child.pid in scan.sessions
        assert all(os.getppid() != pid for pid in scan.children)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
