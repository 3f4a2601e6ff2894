"""Telling orphans by session id (psgi_forkserver/emperor/orphans.py), no Emperor."""

from __future__ import annotations

import os
import signal
import subprocess

from psgi_forkserver.emperor.orphans import EndedSessions, classify_orphans
from psgi_forkserver.procfs import scan_proc, spare_of


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


def test_a_spare_is_known_by_its_title_and_nothing_else(tmp_path):
    titles = {
        101: b"psgi-vassal base (spare of 42)\0",
        102: b"psgi-vassal my base (spare of 42, warming)\0\0",
        103: b"psgi-vassal base (fork server)\0",
        104: b"perl\0-e\0(spare of 42)\0",
        105: b"psgi-vassal app1\0",
    }
    for pid, title in titles.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(title)
    found = {pid: spare_of(pid, str(tmp_path)) for pid in titles}
    assert found == {101: 42, 102: 42, 103: None, 104: None, 105: None}
    # warming: a spare, but not one an adoption can take yet
    assert spare_of(102, str(tmp_path), ready=True) is None
    assert spare_of(101, str(tmp_path), ready=True) == 42
    assert spare_of(999, str(tmp_path)) is None  # gone
