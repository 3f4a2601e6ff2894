"""Warm spares (perl/ForkServer/Spares.pm), end to end: a real
Emperor, the real Perl base and its spares, real HTTP.

A spare is the Emperor's child in the base's session until an adoption
makes it a vassal; its first worker was forked (and warmed) before that,
and applies the vassal's env, chdir and uid itself."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from support import EMPEROR, PROGRAM, alive, app_ini, assert_no_zombies, free_port, get, wait_for
from support.spares import WHOAMI, spare_masters, spares, warm_base

pytestmark = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)

HERE = Path(__file__).resolve().parent
NOBODY = pwd.getpwnam("nobody")


def fd_targets(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) > 2:
            try:
                out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
    return out


def whoami(port: int) -> dict[str, str]:
    return get(port)


def test_a_spare_serves_an_adoption_with_its_own_env_cwd_and_uid(emp, tmp_path):
    e = emp({"base": warm_base(2)}, base=False)
    sp = spares(e, 2)
    assert len(sp["pids"]) == 4, sp  # each spare and its warm first worker
    assert sp["pss"] > 0 and 0 < sp["uss"] < sp["pss"], sp
    waiting = spare_masters(e)
    assert len(waiting) == 2, (waiting, sp)
    base = e.vpid("base")
    workdir = tmp_path / "work"
    workdir.mkdir()
    os.chmod(tmp_path, 0o755)
    port = free_port()
    (e.dir / "one.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\nenv = APP_NAME=one\n"
        f"chdir = {workdir}\nuid = nobody\ngid = {NOBODY.pw_gid}\ndisable-logging = true\n")
    wait_for(lambda: whoami(port), 30, "the adopted vassal to answer")
    pid = e.vpid("one")
    assert pid in waiting, f"vassal pid {pid} was forked, not one of the spares {waiting}"
    # the vassal leads its own session from its adoption on, as a forked one
    assert os.getsid(pid) == pid
    assert psutil.Process(pid).ppid() == e.pid
    seen = {}
    # both workers (the warm one and the one forked at adoption) apply the config
    for _ in range(200):
        r = whoami(port)
        seen[r["pid"]] = r
        if len(seen) == 2:
            break
    assert seen, "no answer"
    for r in seen.values():
        assert r["name"] == "one", r
        assert r["cwd"] == str(workdir), r
        assert int(r["uid"]) == int(r["euid"]) == NOBODY.pw_uid, r
        assert int(r["ppid"]) == pid, r
    # the pool is refilled, with new processes
    wait_for(lambda: len(spare_masters(e)) == 2 and pid not in spare_masters(e), 30,
             "the pool to be refilled")
    assert e.status()["base"]["spares"]["count"] == 2
    assert e.vpid("base") == base


def test_a_warm_worker_judges_by_its_own_warm_up_whether_it_fits_its_vassal(emp, tmp_path):
    """An adopted spare gives its warm worker the vassal's argv and socket
    as soon as it has them, before it is set up as the vassal's master; the
    worker applies env and chdir and judges itself by its own warm-up: it
    serves a vassal its warm-up fits, and leaves one whose env key its
    warm-up read (whoami.psgi reads APP_NAME) to a fresh worker."""
    e = emp({"base": warm_base(2)}, base=False)
    spares(e, 2)
    workers = {m: {c.pid for c in psutil.Process(m).children()} for m in spare_masters(e)}
    port = free_port()
    (e.dir / "fits.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\ndisable-logging = true\n")
    r = wait_for(lambda: whoami(port), 30, "the vassal that fits to answer")
    master = e.vpid("fits")
    assert master in workers, f"vassal pid {master} was forked, not one of the spares {workers}"
    assert int(r["pid"]) in workers[master], (r, workers)
    assert r["name"] == "-", r

    wait_for(lambda: len(spare_masters(e)) == 2 and master not in spare_masters(e), 30, "the pool refilled")
    spares(e, 2)
    workers = {m: {c.pid for c in psutil.Process(m).children()} for m in spare_masters(e)}
    workdir = tmp_path / "work"
    workdir.mkdir()
    port = free_port()
    (e.dir / "other.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\nenv = APP_NAME=other\n"
        f"chdir = {workdir}\ndisable-logging = true\n")
    r = wait_for(lambda: whoami(port), 30, "the vassal that does not fit to answer")
    master = e.vpid("other")
    assert master in workers, f"vassal pid {master} was forked, not one of the spares {workers}"
    assert r["name"] == "other" and r["cwd"] == str(workdir), r
    assert int(r["ppid"]) == master and int(r["pid"]) not in workers[master], (r, workers)
    warm = [psutil.Process(pid) for pid in workers[master] if psutil.pid_exists(pid)]
    wait_for(lambda: not any(alive(p) for p in warm), 10, "the warm worker that did not fit to leave")


def test_a_spare_is_not_reachable_before_its_adoption(emp):
    e = emp({"base": warm_base(2)}, base=False)
    spares(e, 2)
    base = psutil.Process(e.vpid("base"))
    fork_server = str(e.dir / "fs.sock")
    pids = e.status()["base"]["spares"]["pids"]
    assert len(pids) == 4
    for pid in pids:
        p = psutil.Process(pid)
        for c in p.net_connections(kind="inet"):
            raise AssertionError(f"spare process {pid} holds an inet socket: {c}")
        for c in p.net_connections(kind="unix"):
            assert c.laddr != fork_server, f"spare process {pid} holds the fork-server socket"
            assert c.status != psutil.CONN_LISTEN, (pid, c)
        # besides stdio, nothing the base holds (its fork-server socket, its
        # Emperor pipe, clients): only its own ends of links and pipes
        shared = fd_targets(pid) & fd_targets(base.pid)
        assert not shared, (pid, shared)
    # the base itself answers adoptions as before
    assert base.is_running()


def test_a_config_with_its_own_psgi_app_is_served_by_that_app(emp):
    port = free_port()
    e = emp({"base": warm_base(1, app=HERE / "apps" / "hello.psgi")}, base=False)
    spares(e, 1)
    (e.dir / "own.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\npsgi = {WHOAMI}\n"
        "env = APP_NAME=own\ndisable-logging = true\n")
    r = wait_for(lambda: get(port), 30, "the vassal with its own app")
    assert "cwd" in r and r["name"] == "own", r  # whoami.psgi, not the base's hello.psgi


def test_a_burst_beyond_the_pool_falls_back_to_forks_and_the_pool_comes_back(emp):
    e = emp({"base": warm_base(2)}, base=False)
    spares(e, 2)
    waiting = spare_masters(e)
    ports = {f"b{i}": free_port() for i in range(6)}
    for name, port in ports.items():
        tmp = e.dir / f".{name}.tmp"
        tmp.write_text(app_ini(name, port, processes=1))
    for name in ports:  # as close to all at once as renames go
        os.rename(e.dir / f".{name}.tmp", e.dir / f"{name}.ini")
    for port in ports.values():
        wait_for(lambda p=port: get(p), 30, f"port {port} to answer")
    pids = {name: e.vpid(name) for name in ports}
    from_spares = [n for n, p in pids.items() if p in waiting]
    assert len(from_spares) <= 2, (pids, waiting)
    assert len(pids) - len(from_spares) >= 4, "the adoptions beyond the pool were not forked"
    for name, port in ports.items():
        assert get(port)["name"] == name
    wait_for(lambda: len(spare_masters(e)) == 2, 30, "the pool back to 2 after the burst")
    assert_no_zombies(e)
    # the Emperor took no spare for an orphan or a stranger
    assert not e.lines("orphan pid") and not e.lines("in no vassal's session"), e.text()


def test_a_deploy_replaces_the_pool(emp, tmp_path):
    pidfile = tmp_path / "emperor.pid"
    port = free_port()
    e = emp({"base": warm_base(2), "app": app_ini("app", port, processes=1)}, "--pidfile", pidfile,
            base=False, wait=[port])
    spares(e, 2)
    old_base = e.vpid("base")
    old = set(e.status()["base"]["spares"]["pids"])
    assert len(old) == 4
    r = subprocess.run([EMPEROR, "reload-base", "--pidfile", pidfile, "--wait", "--stats", e.stats],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r
    wait_for(lambda: e.vpid("base") != old_base, 30, "the new base")
    new_base = e.vpid("base")
    wait_for(lambda: not any(psutil.pid_exists(p) and alive(psutil.Process(p)) for p in old), 30,
             "the old generation's spares to end")
    sp = spares(e, 2)
    assert len(spare_masters(e)) == 2
    assert not set(sp["pids"]) & old
    assert get(port)["name"] == "app"
    assert_no_zombies(e)


def test_the_warm_workers_output_goes_to_its_vassal_not_to_the_base(emp):
    """The spare's first worker was forked before the adoption, with the
    base's output; from its adoption on, what it writes (its access log,
    the app's warnings) is its vassal's, as every other worker's."""
    e = emp({"base": warm_base(1)}, base=False)
    spares(e, 1)
    waiting = spare_masters(e)
    port = free_port()
    (e.dir / "loud.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n"
                                    "env = APP_NAME=loud\n")
    wait_for(lambda: whoami(port), 30, "the adopted vassal to answer")
    assert e.vpid("loud") in waiting, "the vassal was forked, not taken from the pool"
    line = wait_for(lambda: [x for x in e.lines('"GET / HTTP/1.') if "loud 127.0.0.1" in x],
                    15, "the access log line")[0]
    assert "[loud]" in line and "[base]" not in line, line


def test_the_warm_worker_serves_its_vassal_while_the_spare_itself_is_stopped(emp):
    """The base hands an adoption to the spare's warm worker itself, with
    the vassal's socket: the worker reads the vassal's config (peeked in the
    config pipe, with the vassal's output pipe), applies it and serves
    without a word from its spare, stopped here (SIGSTOP) through the whole
    first request."""
    e = emp({"base": warm_base(1)}, base=False)
    spares(e, 1)
    (spare,) = spare_masters(e)
    port = free_port()
    os.kill(spare, signal.SIGSTOP)
    try:
        (e.dir / "direct.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\n")
        r = wait_for(lambda: whoami(port), 30, "the warm worker to answer")
        # its access log line is its vassal's, relayed from the vassal's own output pipe
        line = wait_for(lambda: [x for x in e.lines('"GET / HTTP/1.') if "direct 127.0.0.1" in x],
                        15, "the access log line")[0]
        assert psutil.Process(spare).status() == psutil.STATUS_STOPPED
    finally:
        os.kill(spare, signal.SIGCONT)
    assert int(r["ppid"]) == spare, r
    assert "[direct]" in line and "[base]" not in line, line
    # then its master sets itself up as before: the vassal's second worker
    wait_for(lambda: e.vpid("direct") == spare and len(psutil.Process(spare).children()) == 2, 30,
             "the spare to become the vassal's master with both workers")
    assert_no_zombies(e)


def test_the_warm_worker_binds_the_vassals_own_socket_while_the_spare_is_stopped(emp):
    """A request without a socket (a requester other than `emperor run`:
    the vassal binds its own http-socket): the warm worker binds it, as its
    master would, serves, and gives it to its master, which forks its
    second worker on it."""
    from psgi_forkserver.adoption import adopt

    e = emp({"base": warm_base(1)}, base=False)
    spares(e, 1)
    (spare,) = spare_masters(e)
    port = free_port()
    ours, theirs = socket.socketpair()
    os.kill(spare, signal.SIGSTOP)
    try:
        try:
            pid = adopt(e.dir / "fs.sock", ["perl", "--http-socket", f"127.0.0.1:{port}", "--processes", "2"],
                        theirs.fileno())
        finally:
            theirs.close()
        assert pid == spare
        r = wait_for(lambda: whoami(port), 30, "the warm worker to answer on the socket it bound")
        assert psutil.Process(spare).status() == psutil.STATUS_STOPPED
        assert int(r["ppid"]) == spare, r
    finally:
        os.kill(spare, signal.SIGCONT)
    try:
        wait_for(lambda: len(psutil.Process(spare).children()) == 2, 30, "the master's second worker")
        seen = set()
        wait_for(lambda: seen.add(whoami(port)["pid"]) or len(seen) == 2, 30, "both workers to answer")
    finally:
        ours.close()  # end of file on its Emperor pipe: the vassal stops
    wait_for(lambda: not psutil.pid_exists(spare) or not alive(psutil.Process(spare)), 30, "the vassal to stop")
    assert_no_zombies(e)
