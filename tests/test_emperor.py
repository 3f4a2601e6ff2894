"""End to end: a real Emperor (pytest-xprocess), the real Perl base vassal,
adopted vassals answering real HTTP on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from psgi_forkserver import paths

from support import EmperorLog, alive, descendants, free_port, wait_for, start_emperor, stop_emperor

HERE = Path(__file__).resolve().parent
APP = HERE / "apps" / "hello.psgi"
PROGRAM = paths.vassal_program()

pytestmark = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)


def app_ini(name: str, port: int, value: str = "v1", processes: int = 2) -> str:
    return (
        "[uwsgi]\n"
        f"http-socket = 127.0.0.1:{port}\n"
        f"processes = {processes}\n"
        f"env = APP_NAME={name}\n"
        f"env = APP_VALUE={value}\n"
        "disable-logging = true\n"
    )


def get(port: int, timeout: float = 2.0) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as r:
        assert r.status == 200
        body = r.read().decode()
    return dict(kv.split("=", 1) for kv in body.split())


def refused(port: int) -> bool:
    try:
        get(port, timeout=1)
    except OSError:
        return True
    return False


@dataclass
class Fleet(EmperorLog):
    pid: int
    dir: Path
    log: Path
    popen: object
    ports: dict[str, int] = field(default_factory=dict)


    def answers_from(self, name: str, vassal_pid: int) -> bool:
        """The app answers, and the answering process is vassal_pid or below it."""
        got = get(self.ports[name])
        worker = psutil.Process(int(got["pid"]))
        return worker.pid == vassal_pid or vassal_pid in [p.pid for p in worker.parents()]


@pytest.fixture
def fleet(xprocess):
    vdir = Path(tempfile.mkdtemp(prefix="pfs-"))
    (vdir / "base.ini").write_text(
        f"[uwsgi]\nearly-psgi = {APP}\nfork-server = fs.sock\n"
    )
    ports = {}
    for i in (1, 2, 3):
        name = f"app{i}"
        ports[name] = free_port()
        (vdir / f"{name}.ini").write_text(app_ini(name, ports[name]))

    em = None
    try:
        em = start_emperor(xprocess, "emperor", [vdir, "--mercy", "5", "--rescan-interval", "2"])
        f = Fleet(em.pid, vdir, em.log, em.popen, ports)
        for name in ports:
            wait_for(lambda n=name: get(ports[n])["name"] == n, 30, f"{name} to answer")
        yield f
    finally:
        if em is not None:
            stop_emperor(em)
        shutil.rmtree(vdir, ignore_errors=True)


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
    new = fleet.vpid("app1")
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
