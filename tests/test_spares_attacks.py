"""Warm spares against what a hostile app, operator or local process does:
warm-ups that exit or hang, requesters gone, workers dying around an
adoption, deploys in a burst, the Emperor killed, descriptor limits."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import psutil
import pytest

from support import (
    PROGRAM, alive, app_ini, assert_no_zombies, base_ini, descendants, free_port, get, kill_all, reap_reparented,
    set_subreaper, stop_emperor, wait_for,
)
from support.spares import spare_masters, spares, warm_base

pytestmark = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)

HERE = Path(__file__).resolve().parent


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


def adopt_one(e, spare: int) -> int:
    """A new vassal `one`, and the base's answer: the spare's pid (which
    may be stopped: the base answers for it). Its port."""
    port = free_port()
    (e.dir / "one.ini").write_text(app_ini("one", port, processes=1))
    wait_for(lambda: e.vpids("one"), 30, "the base to answer with the spare's pid")
    assert e.vpid("one") == spare
    return port


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


def _gone(pid: int) -> bool:
    try:
        return not alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


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
    # a spare's vassal whose requester is gone sees end of file on its
    # Emperor pipe and stops, as a clone's does
    wait_for(lambda: len(e.lines("sending the pid reply")) + len(e.lines("reaped pid")) >= 100, 30,
             "the base to see every request")
    for pid in {int(m) for m in re.findall(r"vassal pid (\d+): sending the pid reply", e.text())}:
        wait_for(lambda: _gone(pid), 30, f"the vassal pid {pid} without a requester to stop")
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
