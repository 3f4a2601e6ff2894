"""Warm spares (perl/ForkServer/Spares.pm), end to end: a real
Emperor, the real Perl base and its spares, real HTTP.

A spare is the Emperor's child in the base's session until an adoption
makes it a vassal; its first worker was forked (and warmed) before that,
and applies the vassal's env, chdir and uid itself.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from psgi_forkserver.procfs import spare_of

from support import (
    EMPEROR, PROGRAM, alive, app_ini, assert_no_zombies, base_ini, descendants, free_port, get, kill_all,
    reap_reparented, set_subreaper, stop_emperor, unix_peers, wait_for,
)

pytestmark = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)

HERE = Path(__file__).resolve().parent
WHOAMI = HERE / "apps" / "whoami.psgi"
NOBODY = pwd.getpwnam("nobody")


def warm_base(spares: int, app: Path = WHOAMI) -> str:
    return base_ini(app, "fs.sock", "early-warmup = /", f"fork-server-spares = {spares}")


def spares(e, count: int) -> dict:
    """The base's spares in `emperor status`, once `count` of them are warm."""
    def ready():
        sp = e.status()["base"].get("spares")
        # each spare and its warm first worker (forked just after the spare)
        return sp if sp and sp["ready"] == sp["count"] == count and len(sp["pids"]) == 2 * count else None
    return wait_for(ready, 30, f"{count} spares in the status")


def spare_masters(e) -> set[int]:
    """The spares themselves, waiting for an adoption (their workers are
    their children), as the Emperor knows them: its children titled after
    the base."""
    base = e.vpid("base")
    return {p.pid for p in psutil.Process(e.pid).children() if spare_of(p.pid) == base}


def _all_reaped() -> bool:
    """As subreaper: what came to us was reaped, and no child of ours is a
    zombie now (one that exits after the reaping is reaped next time: a
    later test counts zombies)."""
    if not reap_reparented():
        return False
    try:
        return not [c for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return False


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


def adopt_one(e, spare: int) -> int:
    """A new vassal `one`, and the base's answer: the spare's pid (which
    may be stopped: the base answers for it). Its port."""
    port = free_port()
    (e.dir / "one.ini").write_text(app_ini("one", port, processes=1))
    wait_for(lambda: e.vpids("one"), 30, "the base to answer with the spare's pid")
    assert e.vpid("one") == spare
    return port


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


def test_kill_9_of_the_emperor_leaves_no_spare_behind(emp):
    e = emp({"base": warm_base(2)}, base=False)
    spares(e, 2)
    procs = [psutil.Process(p) for p in e.status()["base"]["spares"]["pids"]]
    assert len(procs) == 4
    tree = descendants(e.pid)
    # orphans come to us, so that "gone" means exited and reaped
    set_subreaper(True)
    try:
        os.kill(e.pid, signal.SIGKILL)
        e.popen.wait(5)

        def gone():
            return _all_reaped() and not [p for p in procs if alive(p)]
        wait_for(gone, 10, "every spare and its worker to end after the Emperor's kill -9",
                 interval=0.05)
    finally:
        set_subreaper(False)
        kill_all([p for p in tree if alive(p)])


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


# -- attacks: what a hostile app, operator or local process does --

FORKED_WARMUP = HERE / "apps" / "forked_warmup.psgi"


def failing_warmup_base(extra: str = "") -> str:
    return base_ini(FORKED_WARMUP, "fs.sock", "early-warmup = /warm", "fork-server-spares = 2") + extra


def adopted_by_fork(e, name: str) -> None:
    """The base still adopts (by forking): a new vassal answers."""
    port = free_port()
    (e.dir / f"{name}.ini").write_text(app_ini(name, port, processes=1))
    r = wait_for(lambda: get(port), 30, f"{name} to answer")
    assert r["name"] == name, r


def test_a_warm_up_that_exits_in_a_forked_process_does_not_make_spares_in_a_loop(emp):
    # Before: the base replaced each dead spare at once, some 300 forks and
    # 1300 log lines a second for as long as the base lived.
    e = emp({"base": failing_warmup_base()}, base=False, env={"FORKED_WARMUP": "exit"})
    wait_for(lambda: e.lines("next spare in 4 s"), 40, "the third spare to fail")
    failed = e.lines("could not warm up")
    assert len(failed) == 3, e.text()
    for line, wait in zip(failed, (1, 2, 4)):
        assert line.endswith(f"could not warm up (its worker exited with status 3 while warming up): "
                             f"next spare in {wait} s"), line
    # one line from the base per failure, none from the spare itself
    assert not [ln for ln in e.lines("spare pid") if "could not warm up" not in ln], e.text()
    assert len(e.lines("reaped pid")) <= 8, e.text()  # the 3 spares and their workers, maybe a 4th
    sp = e.status()["base"]["spares"]
    assert sp["ready"] == 0 and sp["count"] <= 1, sp
    adopted_by_fork(e, "one")


def test_a_warm_up_that_hangs_in_a_forked_process_is_killed_after_the_spare_timeout(emp):
    # Before: the spare stayed "warming" for ever, and the pool with it.
    e = emp({"base": failing_warmup_base("fork-server-spare-timeout = 1\n")}, base=False,
            env={"FORKED_WARMUP": "hang"})
    def warming():
        sp = e.status()["base"].get("spares") or {}
        return sp if sp.get("pids") else None
    sp = wait_for(warming, 30, "a spare in the status")
    assert sp["ready"] == 0, sp  # warming, shown as such
    stuck = [psutil.Process(p) for p in sp["pids"]]
    # the fork path serves adoptions meanwhile
    adopted_by_fork(e, "one")
    wait_for(lambda: e.lines("next spare in 2 s"), 40, "the second spare to be killed")
    failed = e.lines("could not warm up")
    assert failed[0].endswith("could not warm up (its worker was still warming up after 1 s "
                              "(fork-server-spare-timeout): killed): next spare in 1 s"), failed
    wait_for(lambda: not [p for p in stuck if alive(p)], 30, "the first hung spare and its worker to end")
    assert_no_zombies(e)


def test_a_spare_that_fails_its_config_takes_its_warm_worker_with_it(emp):
    # Before: the warm worker outlived its vassal, an orphan the Emperor swept.
    e = emp({"base": warm_base(1)}, base=False)
    spares(e, 1)
    (master,) = spare_masters(e)
    (worker,) = [c.pid for c in psutil.Process(master).children()]
    (e.dir / "bad.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\nprocesses = 1\nchdir = /nonexistent/dir\n")
    wait_for(lambda: e.lines(f"[bad] pid {master} died"), 30, "the adopted spare to fail")
    # its last words are relayed from its output pipe, maybe after the death
    wait_for(lambda: e.lines("[bad] psgi-vassal bad: error: chdir '/nonexistent/dir'"), 30,
             "the spare's error line")
    wait_for(lambda: not psutil.pid_exists(worker), 30, "its warm worker to end")
    wait_for(lambda: len(e.lines("adopted pid")) >= 2, 30, "the next adoption")
    assert not e.lines(f"pid {worker} "), e.text()  # reaped by its spare, not left to the Emperor


def test_requesters_gone_before_the_reply_leak_no_descriptor_and_no_spare(emp):
    from psgi_forkserver.adoption import start_adoption

    e = emp({"base": warm_base(2)}, base=False)
    spares(e, 2)
    base = e.vpid("base")
    before_fds = len(os.listdir(f"/proc/{base}/fd"))
    for _ in range(100):
        ours, theirs = socket.socketpair()
        try:
            start_adoption(e.dir / "fs.sock", ["perl", "--http-socket", "127.0.0.1:1"], theirs.fileno()).close()
        finally:
            ours.close()
            theirs.close()
    wait_for(lambda: len(e.lines("dropped, the spare kept")) + len(e.lines("reaped pid")) >= 100, 30,
             "the base to see every request")
    sp = spares(e, 2)
    assert len(spare_masters(e)) == 2, sp
    wait_for(lambda: len(os.listdir(f"/proc/{base}/fd")) == before_fds, 30,
             f"the base's descriptors back to {before_fds}")
    assert e.vpid("base") == base
    assert_no_zombies(e)


def test_a_spare_whose_worker_died_just_before_its_adoption_serves_with_a_fresh_worker(emp):
    # Before: the spare saw its worker gone and exited 0 with the adoption the
    # base had already answered with its pid: the vassal died at birth.
    e = emp({"base": warm_base(1)}, base=False)
    spares(e, 1)
    (master,) = spare_masters(e)
    (worker,) = psutil.Process(master).children()
    os.kill(master, signal.SIGSTOP)  # it cannot see its worker go before the adoption comes
    try:
        worker.kill()
        wait_for(lambda: worker.status() == psutil.STATUS_ZOMBIE, 30, "the worker to die")
        port = adopt_one(e, master)
    finally:
        os.kill(master, signal.SIGCONT)
    r = wait_for(lambda: get(port), 30, "the vassal to answer")
    assert r["name"] == "one" and int(r["ppid"]) == master and int(r["pid"]) != worker.pid, r
    assert e.vpids("one") == [master], e.text()  # never restarted


def test_a_waiting_spare_whose_worker_dies_is_let_go_by_the_base_and_replaced(emp):
    # It asks the base, which may have answered an adoption with its pid:
    # here none came, so the base forgets it, and it leaves with its session.
    e = emp({"base": warm_base(1)}, base=False)
    spares(e, 1)
    (master,) = spare_masters(e)
    spare = psutil.Process(master)
    (worker,) = spare.children()
    worker.kill()
    wait_for(lambda: e.lines(f"spare pid {master} lost its worker before it was adopted"), 30,
             "the base to let the spare go")
    wait_for(lambda: not alive(spare), 30, "the spare to leave")
    sp = spares(e, 1)
    assert master not in sp["pids"], sp


def test_every_worker_draws_its_own_random_numbers(emp):
    # Before: every worker of every vassal (spare or forked) repeated the
    # base's rand() sequence, since the base had drawn before it forked.
    e = emp({"base": warm_base(1, app=HERE / "apps" / "rand.psgi")}, base=False)
    spares(e, 1)
    ports = [free_port() for _ in range(3)]
    for i, port in enumerate(ports):  # the first from the spare, the others forked
        (e.dir / f"r{i}.ini").write_text(app_ini(f"r{i}", port, processes=1))
    draws = {}
    for port in ports:
        r = wait_for(lambda p=port: get(p), 30, f"port {port} to answer")
        draws[r["pid"]] = r["rand"]
    assert len(draws) == 3, draws
    assert len(set(draws.values())) == 3, f"workers drew the same first number: {draws}"


def _sessions_alive(sids: set[int]) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in sids and alive(p):
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def _fleet_sessions(emperor: int) -> set[int]:
    """The sessions of the Emperor's descendants. One that exits between
    the listing and its getsid (a spare of a pool being replaced, a worker
    being let go) is left nothing behind by: skipped, where its session's
    other members, if any, count for themselves."""
    sids = set()
    for p in psutil.Process(emperor).children(recursive=True):
        try:
            sids.add(os.getsid(p.pid))
        except ProcessLookupError:
            pass
    return sids


def test_a_deploy_in_a_burst_of_adoptions_loses_no_vassal_and_leaves_no_process(emp):
    e = emp({"base": warm_base(2)}, base=False)
    spares(e, 2)
    old_base = e.vpid("base")
    ports = {f"d{i}": free_port() for i in range(6)}
    for name, port in ports.items():
        (e.dir / f".{name}.tmp").write_text(app_ini(name, port, processes=1))
    for i, name in enumerate(ports):
        os.rename(e.dir / f".{name}.tmp", e.dir / f"{name}.ini")
        if i == 2:  # mid-burst: the pool and the base are replaced
            os.kill(e.pid, signal.SIGUSR1)
    wait_for(lambda: e.vpid("base") != old_base, 30, "the new base")
    for name, port in ports.items():
        assert wait_for(lambda p=port: get(p), 60, f"{name} to answer")["name"] == name
    wait_for(lambda: all(e.vpid(n) in {c.pid for c in psutil.Process(e.pid).children()} for n in ports), 60,
             "every vassal to be the Emperor's child")
    def a_spare_parented_by_the_emperor():
        sp = spares(e, 2)
        try:
            return psutil.Process(sp["pids"][0]).ppid() in (e.pid, *sp["pids"])
        except psutil.NoSuchProcess:  # the status was read before the pool changed
            return False
    wait_for(a_spare_parented_by_the_emperor, 30, "a spare of the new pool, the Emperor's child")
    sids = _fleet_sessions(e.pid)
    stop_emperor(e)
    wait_for(lambda: not _sessions_alive(sids), 30, "every session of the fleet to end")


def test_kill_9_of_the_emperor_mid_adoption_leaves_no_process(emp):
    e = emp({"base": warm_base(2)}, base=False)
    spares(e, 2)
    sids = _fleet_sessions(e.pid)
    for i in range(4):
        port = free_port()
        (e.dir / f".k{i}.tmp").write_text(app_ini(f"k{i}", port, processes=2))
    set_subreaper(True)
    try:
        for i in range(4):
            os.rename(e.dir / f".k{i}.tmp", e.dir / f"k{i}.ini")
        wait_for(lambda: e.vpids("k0"), 30, "the first adoption")
        sids |= _fleet_sessions(e.pid)
        os.kill(e.pid, signal.SIGKILL)
        e.popen.wait(5)

        def gone():
            return _all_reaped() and not _sessions_alive(sids)
        wait_for(gone, 30, "every process of the fleet to end after the Emperor's kill -9", interval=0.05)
    finally:
        set_subreaper(False)


def test_a_pool_larger_than_the_descriptor_limit_stops_where_adoptions_still_fit(hostile):
    # Before: the links of the spares took every descriptor of the base; every
    # adoption was then refused ("no descriptors with the first bytes"), and
    # "cannot make a spare (socketpair: Too many open files)" came each second.
    e = hostile({"base": warm_base(400)}, base=False, nofile=(300, 300))
    line = wait_for(lambda: e.lines("keeps 272 for adoptions"), 60, "the pool to stop at the limit")
    assert "the descriptor limit (300)" in line[0], line
    k = int(line[0].split("spares: ")[1].split(",")[0])
    assert 0 < k < 30, line
    ports = {f"n{i}": free_port() for i in range(4)}
    for name, port in ports.items():
        (e.dir / f"{name}.ini").write_text(app_ini(name, port, processes=1))
    for name, port in ports.items():
        assert wait_for(lambda p=port: get(p), 30, f"{name} to answer")["name"] == name
    wait_for(lambda: e.status()["base"]["spares"]["ready"] == k, 30, f"the pool back to {k}")
    assert len(e.lines("keeps 272 for adoptions")) == 1, e.text()
    assert not e.lines("Too many open files") and not e.lines("refused request"), e.text()


def test_a_deploy_ends_a_spare_whose_warm_up_hangs_at_once(emp):
    # Before: it waited for its worker's warm-up (for ever, then for
    # fork-server-spare-timeout), titled the spare of a base that was gone.
    e = emp({"base": failing_warmup_base()}, base=False, env={"FORKED_WARMUP": "hang"})
    def warming():
        sp = e.status()["base"].get("spares") or {}
        return sp if sp.get("pids") else None
    sp = wait_for(warming, 30, "a warming spare")
    stuck = [psutil.Process(p) for p in sp["pids"]]
    assert stuck and sp["ready"] == 0, sp
    old = e.vpid("base")
    os.kill(e.pid, signal.SIGUSR1)
    wait_for(lambda: e.vpid("base") != old, 30, "the new base")
    wait_for(lambda: not [p for p in stuck if alive(p)], 10,
             "the old base's warming spare to end (fork-server-spare-timeout is 30 s)")
    assert not e.lines("could not warm up"), e.text()


def test_a_signal_the_app_handles_does_not_end_a_waiting_spare(emp):
    # Before: it interrupted the worker's wait for its socket, which took it
    # for the spare's end and exited; the spare followed.
    e = emp({"base": warm_base(1, app=HERE / "apps" / "usr2.psgi")}, base=False)
    spares(e, 1)
    (master,) = spare_masters(e)
    (worker,) = [c.pid for c in psutil.Process(master).children()]
    for pid in (worker, master):
        os.kill(pid, signal.SIGUSR2)
        wait_for(lambda p=pid: e.lines(f"caught USR2 in {p}"), 30, f"pid {pid} to catch the signal")
    port = free_port()
    # no env: its warm-up read APP_NAME unset, the warm worker serves only
    # vassals that leave it so (docs/tenants.md)
    (e.dir / "one.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n")
    r = wait_for(lambda: get(port), 30, "the vassal to answer")
    assert e.vpid("one") == master and int(r["pid"]) == worker, (r, e.text())
    assert not e.lines("before it was adopted"), e.text()


def test_a_spare_killed_after_the_base_answered_with_its_pid_is_restarted_by_the_emperor(emp):
    e = emp({"base": warm_base(1)}, base=False)
    spares(e, 1)
    (master,) = spare_masters(e)
    os.kill(master, signal.SIGSTOP)  # it gets its request only once it runs again
    try:
        port = adopt_one(e, master)
    finally:
        os.kill(master, signal.SIGKILL)
    wait_for(lambda: e.lines(f"[one] pid {master} died (killed by SIGKILL)"), 30, "the Emperor to see it die")
    r = wait_for(lambda: get(port), 30, "the vassal started again")
    assert r["name"] == "one" and int(r["ppid"]) != master, r
    assert e.status()["one"]["pid"] == int(r["ppid"]) == e.vpid("one"), e.text()
    assert_no_zombies(e)


def _fds_of_vassal(pid: int) -> tuple[int, list[int]]:
    """Descriptors above 2 of a vassal's master and of each of its workers,
    less the client connections a worker may still hold."""
    def count(p: int) -> int:
        conns = [c for c in psutil.Process(p).net_connections("inet") if c.status != psutil.CONN_LISTEN]
        return len([fd for fd in os.listdir(f"/proc/{p}/fd") if int(fd) > 2]) - len(conns)
    return count(pid), sorted(count(c.pid) for c in psutil.Process(pid).children())


def test_the_rehearsals_leave_no_descriptor_in_an_adopted_spare(emp):
    """What a vassal taken from a spare holds, master and workers, is no more
    than what a forked one holds (the rehearsals' socket pairs, bound socket
    and /dev/null are all closed)."""
    ini = "[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\nenv = APP_NAME=fd\n"
    counts = {}
    for k in (1, 0):
        e = emp({"base": warm_base(k)}, base=False)
        if k:
            spares(e, 1)
            waiting = spare_masters(e)
        port = free_port()
        (e.dir / "fd.ini").write_text(ini.format(port=port))
        wait_for(lambda: get(port), 30, "the vassal")
        pid = e.vpid("fd")
        assert (pid in waiting) if k else True
        seen: set[str] = set()
        # a worker that answered is past its set-up (a worker just forked
        # still holds what it then closes)
        wait_for(lambda: seen.add(get(port)["pid"]) or len(seen) == 2, 30, "both workers to answer")
        counts[k] = _fds_of_vassal(pid)
    (spare_master, spare_workers), (fork_master, fork_workers) = counts[1], counts[0]
    assert spare_master <= fork_master, counts
    assert max(spare_workers) <= max(fork_workers), counts


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


@pytest.mark.parametrize("k", [1, 0], ids=["from a spare", "forked"])
def test_a_worker_shares_no_socket_with_its_master_but_the_listener(emp, k):
    """The Emperor pipe and the config pipe are the master's alone: a worker
    holding them would hide the master's death from the Emperor, or read
    the config packets meant for the master. Besides the listener they share
    only the workers' queue of connections (both ends of its socket pair:
    the master keeps it for the workers it forks later)."""
    e = emp({"base": warm_base(k)}, base=False)
    if k:
        spares(e, 1)
    port = free_port()
    (e.dir / "sk.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\n")
    seen: set[str] = set()
    wait_for(lambda: seen.add(get(port)["pid"]) or len(seen) == 2, 30, "both workers to answer")
    master = e.vpid("sk")
    workers = [c.pid for c in psutil.Process(master).children()]
    assert len(workers) == 2, workers
    for w in workers:
        shared = _socket_inodes(w) & _socket_inodes(master)
        peers = {f"socket:[{a}]": f"socket:[{b}]" for a, b in unix_peers().items()}
        queue = {i for i in shared if peers.get(i) in shared}
        assert len(queue) == 2, f"worker {w}: the queue's socket pair in {shared}"
        assert len(shared - queue) == 1, f"worker {w} shares {shared} with its master {master}"


@pytest.mark.parametrize("k", [1, 0], ids=["from a spare", "forked"])
def test_a_vassal_that_drops_to_another_uid_still_counts_its_requests(emp, tmp_path, k):
    """The requests file (the status's REQS) is made before the vassal
    drops root, and made its uid's: as `nobody` it could create nothing in
    the run directory, and the status showed `-` for such a vassal."""
    e = emp({"base": warm_base(k)}, base=False)
    if k:
        spares(e, 1)
    port = free_port()
    (e.dir / "low.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\n"
                                   f"uid = nobody\ngid = {NOBODY.pw_gid}\ndisable-logging = true\n")
    wait_for(lambda: get(port), 30, "the vassal")
    for _ in range(20):
        assert int(get(port)["uid"]) == NOBODY.pw_uid
    wait_for(lambda: (e.status()["low"].get("requests") or 0) >= 21, 20, "the requests in the status")


@pytest.mark.parametrize("k", [1, 0], ids=["from a spare", "forked"])
def test_a_uid_vassal_counts_through_recycled_workers_and_a_reload(emp, k):
    """Its workers reopen the requests file by descriptor: the ones a
    max-requests recycle or a SIGHUP to the master forks count too, and its
    file is gone once it stops (nobody cannot unlink in the run directory)."""
    e = emp({"base": warm_base(k)}, base=False)
    if k:
        spares(e, 1)
    port = free_port()
    (e.dir / "rq.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\n"
                                  f"max-requests = 3\nuid = nobody\ngid = {NOBODY.pw_gid}\n"
                                  "disable-logging = true\n")
    wait_for(lambda: get(port), 30, "the vassal")
    master = e.vpid("rq")
    pids = set()
    for _ in range(20):
        pids.add(get(port)["pid"])
    assert len(pids) >= 4, pids
    wait_for(lambda: (e.status()["rq"].get("requests") or 0) >= 21, 20, "21 requests counted")
    before = set(c.pid for c in psutil.Process(master).children())
    os.kill(master, signal.SIGHUP)
    wait_for(lambda: not (set(c.pid for c in psutil.Process(master).children()) & before)
             and len(psutil.Process(master).children()) == 2, 30, "a new generation of workers")
    for _ in range(10):
        get(port)
    wait_for(lambda: (e.status()["rq"].get("requests") or 0) >= 31, 20, "31 requests counted")
    path = Path(os.environ["PSGI_FORKSERVER_RUN_DIR"]) / f"requests-{master}"
    assert path.exists()
    (e.dir / "rq.ini").unlink()
    wait_for(lambda: not psutil.pid_exists(master), 30, "the vassal to stop")
    wait_for(lambda: not path.exists(), 20, "its requests file to go")


def test_the_base_sleeps_while_a_refill_warms_up(emp, tmp_path):
    """After an adoption the pool refills once none came for a pause; while
    the spare it then makes warms up (slowly here: 3 x 0.4 s), the base
    waits in select() rather than spinning with a deadline already past (a
    CPU taken from the warm-up and the vassals just adopted)."""
    app = tmp_path / "slow.psgi"
    app.write_text("my $app = sub { select undef, undef, undef, 0.4 if $_[0]{PATH_INFO} eq '/slow';\n"
                   "  [200, ['Content-Type' => 'text/plain'], [\"pid=$$ uid=$<\\n\"]] };\n$app;\n")
    e = emp({"base": base_ini(app, "fs.sock", "early-warmup = /slow", "fork-server-spares = 2")}, base=False)
    spares(e, 2)
    base = psutil.Process(e.vpid("base"))
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        (e.dir / f"a{i}.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n")
    for port in ports:
        wait_for(lambda p=port: get(p), 30, f"port {port}")
    # both spares were taken: the first of the two refills warms up now
    wait_for(lambda: (sp := e.status()["base"].get("spares")) and sp["count"] >= 1, 30,
             "a refill")
    cpu = base.cpu_times()
    spares(e, 2)
    used = sum(base.cpu_times()[:2]) - sum(cpu[:2])
    # a spin through the 1.2 s of a warm-up costs about that in CPU, even on a
    # loaded machine; a base waiting in select() costs almost nothing
    assert used < 0.4, f"the base used {used:.2f} s of CPU while a spare warmed up"
