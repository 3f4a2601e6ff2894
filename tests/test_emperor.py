"""End to end: a real Emperor (pytest-xprocess), the real Perl base vassal,
adopted vassals answering real HTTP on loopback."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from support import Emperors, alive, app_ini, descendants, free_port, get, needs_program, refused, wait_for

pytestmark = needs_program


@pytest.fixture
def fleet(xprocess):
    """Three apps, app1..app3, each answering on its port."""
    emperors = Emperors(xprocess, "pfs-", args=["--mercy", "5", "--rescan-interval", "2"], stats=False)
    try:
        ports = {f"app{i}": free_port() for i in (1, 2, 3)}
        f = emperors({name: app_ini(name, port) for name, port in ports.items()})
        f.ports = ports
        for name in ports:
            wait_for(lambda n=name: get(ports[n])["name"] == n, 30, f"{name} to answer")
        yield f
    finally:
        emperors.stop()


def test_all_apps_answer_and_adopted_vassals_are_the_emperors_children(fleet):
    emperor = psutil.Process(fleet.pid)
    base = fleet.vpid("base")
    assert psutil.Process(base).ppid() == fleet.pid
    for name, port in fleet.ports.items():
        got = get(port)
        assert (got["name"], got["value"]) == (name, "v1")
        vpid = fleet.vpid(name)
        assert vpid != base
        assert psutil.Process(vpid).ppid() == fleet.pid, "adopted vassal not reparented"
        assert fleet.answers_from(name, vpid)
    log = fleet.text()
    assert "adopted pid" in log
    assert "adoption failed" not in log, "adoptions must wait for the base"
    assert emperor.is_running()


def test_kill_9_of_a_vassal_brings_a_new_pid_that_answers(fleet):
    old = fleet.vpid("app2")
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: fleet.vpid("app2") != old and fleet.vpid("app2"), 15, "a new app2 pid")
    assert psutil.Process(new).ppid() == fleet.pid
    wait_for(lambda: fleet.answers_from("app2", new), 15, "the new app2 to answer")
    # the others did not move
    assert fleet.vpids("app1") == fleet.vpids("app1")[:1]


def test_removing_a_file_stops_its_vassal(fleet):
    proc = psutil.Process(fleet.vpid("app3"))
    (fleet.dir / "app3.ini").unlink()
    wait_for(lambda: not alive(proc), 15, "app3 to stop")
    wait_for(lambda: refused(fleet.ports["app3"]), 10, "app3's port to close")
    assert get(fleet.ports["app1"])["name"] == "app1"


def test_changing_a_file_restarts_its_vassal(fleet):
    old = fleet.vpid("app1")
    tmp = fleet.dir / ".app1.ini.tmp"
    tmp.write_text(app_ini("app1", fleet.ports["app1"], value="v2"))
    os.rename(tmp, fleet.dir / "app1.ini")
    wait_for(lambda: get(fleet.ports["app1"])["value"] == "v2", 15, "app1 to serve v2")
    # the successor may answer before the Emperor has read its adoption
    # reply and logged its pid
    new = wait_for(lambda: fleet.vpid("app1") != old and fleet.vpid("app1"), 15, "the successor's pid")
    assert new != old
    wait_for(lambda: not alive_pid(old), 15, "the old app1 to stop")


def alive_pid(pid: int) -> bool:
    try:
        return alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def test_added_file_is_adopted_and_a_dead_base_is_restarted(fleet):
    base = fleet.vpid("base")
    adopted = {n: fleet.vpid(n) for n in fleet.ports}
    os.kill(base, signal.SIGKILL)
    wait_for(lambda: fleet.vpid("base") != base, 15, "a new base")
    # adopted vassals keep running
    for name, pid in adopted.items():
        assert fleet.answers_from(name, pid)
    fleet.ports["app4"] = port = free_port()
    (fleet.dir / "app4.ini").write_text(app_ini("app4", port, processes=1))
    wait_for(lambda: get(port)["name"] == "app4", 15, "app4 to answer")
    assert psutil.Process(fleet.vpid("app4")).ppid() == fleet.pid


def test_sigterm_leaves_no_process_behind(fleet):
    procs = descendants(fleet.pid)
    assert len(procs) >= 4  # base + 3 vassals (+ workers)
    os.kill(fleet.pid, signal.SIGTERM)
    assert fleet.popen.wait(20) == 0
    # the Emperor exits only once it has no child left: everything is gone
    assert not [p for p in procs if alive(p)], "processes left behind"
    assert not (fleet.dir / "fs.sock").exists()
    for port in fleet.ports.values():
        assert refused(port)
