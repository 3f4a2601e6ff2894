"""Nothing of a vassal outlives it, by cgroup (v2): a helper that calls
setsid() and forks again is gone when its vassal is stopped, when the
Emperor is killed with SIGKILL (its guard), and when the guard is killed
with it (the next start's sweep).

Real Emperors, the real Perl base, real helpers; skipped where the
Emperor could not own a cgroup subtree (not root, no cgroup2, no
cgroup.kill)."""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from psgi_forkserver import adoption, paths
from psgi_forkserver.emperor import cgroup_tree, cgroups
from psgi_forkserver.status import default_stats_path

from support import EMPEROR, alive, base_ini, free_port, kill_all, start_emperor, stop_emperor, wait_for

HERE = Path(__file__).resolve().parent
DAEMON = HERE / "apps" / "daemon.psgi"
PROGRAM = paths.vassal_program()


def _usable() -> str | None:
    if not PROGRAM.is_file():
        return "no Perl vassal program"
    if os.geteuid() != 0:
        return "not root: the Emperor cannot own a cgroup subtree here"
    mount, own = cgroup_tree.cgroup2_mount(), cgroup_tree.own_cgroup()
    if mount is None or own is None:
        return "no cgroup2 hierarchy"
    home = mount / own.lstrip("/")
    if not os.access(home, os.W_OK) or not (mount / "cgroup.procs").exists():
        return f"{home} is not writable"
    return None


pytestmark = pytest.mark.skipif(_usable() is not None, reason=str(_usable()))


def spawn_helper(port: int, secs: int = 300) -> psutil.Process:
    """daemon.psgi: a `sleep` in a session of its own, forked twice."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/spawn?{secs}&setsid",
                                timeout=10) as r:
        body = r.read().decode()
    fields = dict(kv.split("=", 1) for kv in body.split())
    pid = int(fields["daemon"])
    p = psutil.Process(pid)
    # a session not the app's: no sweep by session finds it
    assert os.getsid(pid) != os.getsid(int(fields["pid"]))
    return p


def cgroup_of(pid: int) -> str:
    return cgroup_tree.own_cgroup(pid) or ""


def answers(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return r.status == 200


@pytest.fixture
def vdir():
    d = Path(tempfile.mkdtemp(prefix="pfs-cgroups-"))
    ports = {"a": free_port(), "b": free_port()}
    (d / "base.ini").write_text(base_ini(DAEMON))
    for name, port in ports.items():
        (d / f"{name}.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\n"
                                       f"processes = 1\nenv = APP_NAME={name}\n")
    helpers: list[psutil.Process] = []
    try:
        yield d, ports, helpers
    finally:
        kill_all(helpers)
        shutil.rmtree(d, ignore_errors=True)


def status(d: Path) -> dict:
    out = subprocess.run([EMPEROR, "status", "--dir", d, "--json"], capture_output=True,
                         text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def test_a_setsid_helper_goes_with_its_stopped_vassal(xprocess, vdir):
    d, ports, helpers = vdir
    em = start_emperor(xprocess, "emperor-cgroups-stop", [d, "--mercy", "3"])
    try:
        for port in ports.values():
            wait_for(lambda p=port: answers(p), 30, "the vassals to answer")
        doc = status(d)
        subtree = doc["emperor"]["cgroup"]
        assert subtree and subtree.endswith(cgroup_tree.subtree_name(d)), doc["emperor"]
        for name in ("base", "a", "b"):
            v = doc["vassals"][name]
            assert re.fullmatch(rf"{re.escape(subtree)}/v-{name}/\d+", v["cgroup"]), (name, v)
            assert cgroup_of(v["pid"]) == v["cgroup"], (name, v)
        table = subprocess.run([EMPEROR, "status", "--dir", d], capture_output=True, text=True,
                               timeout=30, check=True).stdout
        assert "CGROUP" in table and f"cgroups below {subtree}" in table
        assert re.search(r"^a .* v-a/\d+$", table, re.M), table

        helper = spawn_helper(ports["a"])
        helpers.append(helper)
        assert cgroup_of(helper.pid) == doc["vassals"]["a"]["cgroup"]
        other = spawn_helper(ports["b"])
        helpers.append(other)

        subprocess.run([EMPEROR, "stop", "a", "--dir", d], capture_output=True, text=True,
                       timeout=60, check=True)
        wait_for(lambda: not alive(helper), 15, "a's setsid helper to be gone")
        assert alive(other), "b's helper is b's: it stays while b runs"
        assert answers(ports["b"])
        wait_for(lambda: not Path(f"{cgroup_tree.cgroup2_mount()}{subtree}/v-a").exists(), 15,
                 "a's cgroup to be removed")
    finally:
        stop_emperor(em)
    wait_for(lambda: not alive(other), 15, "b's helper to be gone after the shutdown")
    assert not Path(f"{cgroup_tree.cgroup2_mount()}{subtree}").exists()
    assert not (default_stats_path(d).parent / cgroups.RECORD).exists()


def test_adopted_vassals_are_born_in_their_cgroup_and_never_moved(xprocess, vdir):
    """The base clones each adopted vassal straight into the cgroup the
    Emperor made for it (the request's cgroup directory, clone3 with
    CLONE_INTO_CGROUP): the reply says so, and the Emperor writes no pid to
    any cgroup.procs for it. Nobody else moves a process there, so a vassal
    found in its own cgroup with no move made was born in it."""
    d, ports, _ = vdir
    # no warm spares: a spare exists before its request, so it is moved
    (d / "base.ini").write_text(base_ini(DAEMON, "fs.sock", "fork-server-spares = 0"))
    em = start_emperor(xprocess, "emperor-cgroups-born", [d])
    try:
        for port in ports.values():
            wait_for(lambda p=port: answers(p), 30, "the vassals to answer")
        doc = status(d)
        counts = doc["emperor"]["cgroup_adoptions"]
        assert (counts["born_in"], counts["moved"]) == (2, 0), counts
        subtree = doc["emperor"]["cgroup"]
        for name in ports:
            v = doc["vassals"][name]
            assert re.fullmatch(rf"{re.escape(subtree)}/v-{name}/\d+", v["cgroup"]), (name, v)
            assert cgroup_of(v["pid"]) == v["cgroup"], (name, v)
        log = em.log.read_text(errors="replace")
        assert "moved into their cgroups by the Emperor" not in log, log[-2000:]
    finally:
        stop_emperor(em)


def _reply(pending: adoption.PendingAdoption) -> int:
    with selectors.DefaultSelector() as sel:
        sel.register(pending.sock, selectors.EVENT_READ)
        while True:
            assert sel.select(max(0.0, pending.deadline - time.monotonic())), "no reply in time"
            pid = pending.on_readable()
            if pid is not None:
                return pid


def test_the_base_clones_a_vassal_into_the_cgroup_its_request_names(tmp_path):
    """The base, asked by its parent with a cgroup directory (mask 0x08),
    clones the vassal into that cgroup: it is there when the pid reply
    arrives, before anyone could have moved it, and the reply says so. A
    request without one (uWSGI's bytes) gets a vassal in the base's own
    cgroup, and a reply with the pid alone; so does one naming a directory
    the kernel will not clone into (not a cgroup), said in the base's log,
    and the next request is cloned into its cgroup again."""
    mount, own = cgroup_tree.cgroup2_mount(), cgroup_tree.own_cgroup()
    assert mount is not None and own is not None
    cg = mount / own.lstrip("/") / f"pfs-test-born-{os.getpid()}"
    cg.mkdir()
    base_pipe, base_end = socket.socketpair()
    sock = tmp_path / "fs.sock"
    base_log = tmp_path / "base.log"
    with open(base_log, "w") as log:
        base = subprocess.Popen(
            ["perl", str(PROGRAM), "--early-psgi", str(DAEMON), "--fork-server", str(sock),
             "--fork-server-spares", "0"], stderr=log,
            pass_fds=[base_end.fileno()], env={**os.environ, "UWSGI_EMPEROR_FD": str(base_end.fileno())})
    base_end.close()
    pipes: list[socket.socket] = []
    vassals: list[int] = []
    try:
        assert base_pipe.recv(1) == b"\x01"  # listening
        cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        not_a_cgroup = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for into in (cg_fd, None, not_a_cgroup, cg_fd):
            ours, theirs = socket.socketpair()
            pipes.append(ours)
            pending = adoption.start_adoption(sock, [str(PROGRAM), "--http-socket", f"127.0.0.1:{free_port()}"],
                                              theirs.fileno(), cgroup_fd=into)
            theirs.close()
            try:
                pid = _reply(pending)
                where = cgroup_of(pid)  # at once: nobody has had a chance to move it
            finally:
                pending.close()
            vassals.append(pid)
            if into == cg_fd:
                assert where == "/" + str(cg.relative_to(mount)), where
                assert pending.born_in_cgroup
                assert pid in cgroup_tree.procs(cg)
            else:
                assert where == cgroup_of(base.pid), where
                assert not pending.born_in_cgroup
        os.close(cg_fd)
        os.close(not_a_cgroup)
        said = [line for line in base_log.read_text().splitlines() if "clone3" in line]
        assert len(said) == 1 and "this vassal is moved by the Emperor" in said[0], said
    finally:
        for p in pipes:
            p.close()  # end of file: each vassal stops
        base_pipe.close()
        for pid in vassals:  # the base's parent's children: ours to reap
            wait_for(lambda p=pid: os.waitpid(p, os.WNOHANG)[0] == p, 30, f"vassal {pid} to exit")
        base.wait(30)
        cgroup_tree.kill_tree(cg)
    assert not cg.exists()


def test_nothing_outlives_an_emperor_killed_with_sigkill(xprocess, vdir):
    d, ports, helpers = vdir
    em = start_emperor(xprocess, "emperor-cgroups-kill9", [d, "--mercy", "3"])
    try:
        wait_for(lambda: answers(ports["a"]), 30, "a to answer")
        tree = [psutil.Process(em.pid), *psutil.Process(em.pid).children(recursive=True)]
        helper = spawn_helper(ports["a"])
        helpers.append(helper)
        os.kill(em.pid, signal.SIGKILL)
        em.popen.wait(10)
        # the guard: the whole subtree killed at once, the setsid helper too
        wait_for(lambda: not alive(helper), 10, "the setsid helper to be gone")
        wait_for(lambda: not any(alive(p) for p in tree), 10, "every process of the run to end")
    finally:
        stop_emperor(em)


def test_the_next_start_removes_what_a_killed_emperor_and_guard_left(xprocess, vdir):
    d, ports, helpers = vdir
    em = start_emperor(xprocess, "emperor-cgroups-sweep1", [d, "--mercy", "3"])
    em2 = None
    try:
        wait_for(lambda: answers(ports["a"]), 30, "a to answer")
        guard = int(re.search(r"cgroups: .*\(guard pid (\d+)\)", em.text()).group(1))
        helper = spawn_helper(ports["a"])
        helpers.append(helper)
        old_tree = [psutil.Process(em.pid), *psutil.Process(em.pid).children(recursive=True)]
        os.kill(guard, signal.SIGKILL)
        os.kill(em.pid, signal.SIGKILL)
        em.popen.wait(10)
        # the vassals stop themselves (end of file on their pipes); the
        # helper in a session of its own is left: only its cgroup holds it
        wait_for(lambda: not any(alive(p) for p in old_tree if p.pid != helper.pid), 20,
                 "the vassals to stop on their own")
        assert alive(helper)
        em2 = start_emperor(xprocess, "emperor-cgroups-sweep2", [d, "--mercy", "3"])
        assert re.search(r"cgroups: killed [1-9]\d* processes an earlier run left in ",
                         em2.text()), em2.text()
        wait_for(lambda: not alive(helper), 10, "the helper of the earlier run to be gone")
        wait_for(lambda: answers(ports["a"]), 30, "a to answer again")
    finally:
        stop_emperor(em)
        if em2 is not None:
            stop_emperor(em2)


def test_a_read_only_hierarchy_is_said_once_and_the_fleet_runs(vdir):
    """The cgroup2 mount read-only (a mount namespace of the test's own):
    one line saying why, and the vassals run as before."""
    d, ports, _ = vdir
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mount = cgroup_tree.cgroup2_mount()
    script = f"mount -o bind,remount,ro {mount} && exec {EMPEROR} run {d} --mercy 3"
    p = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stderr=subprocess.PIPE,
                         text=True)
    try:
        wait_for(lambda: answers(ports["a"]), 30, "a to answer")
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    lines = [ln for ln in err.splitlines() if "cgroups:" in ln]
    assert len(lines) == 1 and "cgroups: not used (cannot create" in lines[0] \
        and "Read-only file system" in lines[0], err


UWSGI21 = os.environ.get("UWSGI21")  # a uWSGI 2.1 binary with its psgi profile (bench/uwsgi21.py)


@pytest.mark.skipif(not UWSGI21 or not os.access(UWSGI21, os.X_OK), reason="UWSGI21 not set")
def test_a_uwsgi_base_gets_uwsgis_bytes_and_the_emperor_moves_its_vassal(xprocess, vdir):
    """uWSGI 2.1's fork server as the base: it is never sent the cgroup's
    directory (it would refuse the mask bit), its reply has the pid alone,
    and the Emperor moves the vassal into its cgroup."""
    d, ports, _ = vdir
    (d / "b.ini").unlink()
    (d / "base.ini").write_text(base_ini(HERE / "apps" / "hello.psgi", d / "fs.sock"))
    (d / "a.ini").write_text(f"[uwsgi]\nmaster = true\nprocesses = 1\n"
                             f"http-socket = 127.0.0.1:{ports['a']}\n")
    em = start_emperor(xprocess, "emperor-cgroups-uwsgi21",
                       [d, "--vassal-binary", UWSGI21, "--vassal-fork-base", "base.ini"])
    try:
        wait_for(lambda: answers(ports["a"]), 30, "the uWSGI vassal to answer")
        doc = status(d)
        counts = doc["emperor"]["cgroup_adoptions"]
        assert (counts["born_in"], counts["moved"]) == (0, 1), counts
        v = doc["vassals"]["a"]
        assert v["cgroup"].endswith("/v-a/" + v["cgroup"].rsplit("/", 1)[1]), v
        assert cgroup_of(v["pid"]) == v["cgroup"], v
    finally:
        stop_emperor(em)


@pytest.mark.parametrize("own_base_file", [False, True])
def test_a_fork_server_this_emperor_did_not_start_is_never_sent_the_cgroup(xprocess, vdir, tmp_path,
                                                                           own_base_file):
    """A base started by hand (here one that refuses the cgroup's mask bit,
    as a base started before an upgrade does) and named with
    `--use-fork-server`, also beside a base file of the Emperor's own: the
    Emperor does not know its version, so it sends uWSGI's bytes, the
    vassals answer, and the Emperor moves each into its cgroup."""
    d, ports, _ = vdir
    if not own_base_file:
        (d / "base.ini").unlink()
    sock = tmp_path / "fs.sock"
    base_file = tmp_path / "base.ini"
    base_file.write_text(base_ini(HERE / "apps" / "hello.psgi", sock, "fork-server-spares = 0"))
    env = {**os.environ, "PERL5LIB": f"{HERE / 'apps' / 'lib'}:{PROGRAM.parent}",
           "PERL5OPT": "-MBaseBeforeCgroupMask"}
    base = subprocess.Popen(["perl", str(PROGRAM), "--ini", str(base_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 30, "the hand-started fork server")
        em = start_emperor(xprocess, f"emperor-cgroups-foreign-{own_base_file}", [d, "--use-fork-server", sock])
        try:
            for port in ports.values():
                wait_for(lambda p=port: answers(p), 30, "the vassals to answer")
            doc = status(d)
            counts = doc["emperor"]["cgroup_adoptions"]
            assert (counts["born_in"], counts["moved"]) == (0, 2), counts
            for name in ports:
                v = doc["vassals"][name]
                assert cgroup_of(v["pid"]) == v["cgroup"], (name, v)
        finally:
            stop_emperor(em)
    finally:
        left = [p.pid for p in psutil.Process(base.pid).children(recursive=True)]
        base.terminate()
        base.wait(20)
        kill_all([p for p in left if alive(p)])
